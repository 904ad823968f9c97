"""Writing one input's outputs: ``<stem>.parquet`` and ``<stem>.rejects.parquet`` written chunk
by chunk on a thread of their own, into temporary files that are renamed into place only when
complete (``outputs.commit``). ``embed`` and the engines' driver (``distributed._core.drive``)
both write through ``OutputFile``, so their files are made the same way.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from astromer_fast.embedding.batch import REJECTS_SCHEMA
from astromer_fast.embedding.inputs import PAGE_CHECKSUMS
from astromer_fast.embedding.outputs import (CAN_RECORD_COUNTS, COUNTS_KEY, INPUT_KEY, commit,
                                             input_identity, temp_path)


class WriterThread:
    """Writes an output's tables on a thread of its own, in order, so that compression and I/O
    overlap the model. At most ``depth`` tables wait (memory stays bounded); an error in the
    writer is raised by the next ``put`` or by ``finish``."""

    def __init__(self, write, depth: int = 2):
        self.write, self.error = write, None
        self.q = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="astromer-write", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def _raise(self):
        if self.error is not None:
            raise self.error

    def put(self, table, rejects):
        self._raise()
        self.q.put((table, rejects))

    def finish(self, raise_error: bool = True):
        self.q.put(None)
        self.thread.join()
        if raise_error:
            self._raise()


class OutputFile:
    """Writes one input's outputs incrementally: ParquetWriter on temporary files of names unique
    to this writer, with page checksums; ``commit`` records the row counts in both footers,
    flushes both files and renames them into place, rejects first (so an existing final output
    means both are complete). ``source``: the input file, recorded in the outputs' metadata so
    that resume can tell whether it changed. ``dest=None``: the tables are kept in memory
    (``tables``, ``rejects``) instead. ``curves``, ``rejected_curves``, ``filtered``: what the
    summary reports of this input."""

    def __init__(self, dest: Path | None, rdest: Path | None, schema: pa.Schema, source=None):
        self.dest, self.rdest, self.schema = dest, rdest, schema
        self.tables, self.rejects = [], []
        self.writer = self.rwriter = None
        self.thread = None  # writes (compression, I/O) off the model's thread
        self.rows = self.rejected = 0  # rows written, recorded in the footers
        self.curves = self.rejected_curves = self.filtered = 0
        if dest is not None:
            meta = dict(schema.metadata or {})
            if source is not None:
                meta[INPUT_KEY] = json.dumps(input_identity(source)).encode()
            self.schema = schema.with_metadata(meta)
            self.tmp, self.rtmp = temp_path(dest), temp_path(rdest)
            checksums = {"write_page_checksum": True} if PAGE_CHECKSUMS else {}
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", **checksums)
            self.rwriter = pq.ParquetWriter(self.rtmp, REJECTS_SCHEMA.with_metadata(meta),
                                            compression="zstd", **checksums)

    def write(self, table: pa.Table, rejects: pa.Table, n_curves: int, n_filtered: int = 0):
        """The tables of ``n_curves`` curves (embedded or rejected; ``n_filtered`` more were of
        bands not asked for)."""
        self.curves += n_curves
        self.rejected_curves += rejects.num_rows
        self.filtered += n_filtered
        if self.writer is None:
            self.tables.append(table)
            self.rejects.append(rejects)
            return
        if self.thread is None:
            self.thread = WriterThread(self._write_now)
        self.thread.put(table, rejects)

    def _write_now(self, table: pa.Table, rejects: pa.Table):
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows
        if rejects.num_rows:
            self.rwriter.write_table(rejects)
            self.rejected += rejects.num_rows

    def commit(self):
        if self.writer is None:
            return
        if self.thread is not None:
            self.thread.finish()  # every table written (or the writer's error raised)
        if CAN_RECORD_COUNTS:
            counts = {COUNTS_KEY: json.dumps({"rows": self.rows, "rejects": self.rejected})}
            self.writer.add_key_value_metadata(counts)
            self.rwriter.add_key_value_metadata(counts)
        self.writer.close()
        self.rwriter.close()
        commit([(self.rtmp, self.rdest), (self.tmp, self.dest)])

    def abort(self):
        if self.thread is not None:
            self.thread.finish(raise_error=False)
        for w in (self.writer, self.rwriter):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - cleaning up after an error already reported
                    pass
        if self.dest is not None:
            self.tmp.unlink(missing_ok=True)
            self.rtmp.unlink(missing_ok=True)
