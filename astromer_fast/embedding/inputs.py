"""Reading inputs without trusting them: page checksums, and long tables checked to be grouped
by object before any of their curves is embedded."""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astromer_fast.data.layouts import NotGroupedError


# pyarrow reads and writes page checksums from version 15 on.
PAGE_CHECKSUMS = "page_checksum_verification" in inspect.signature(pq.ParquetFile).parameters


def open_parquet(path, metadata=None) -> pq.ParquetFile:
    """A Parquet file whose pages are verified against the CRC checksums its writer stored (a
    page corrupted on disk then fails to read, naming the file, instead of being decoded into
    wrong numbers). Files written without checksums (the pyarrow default) read as before.
    ``metadata``: the file's footer, already read (another handle on the same file)."""
    if not PAGE_CHECKSUMS:
        return pq.ParquetFile(path, metadata=metadata)
    return pq.ParquetFile(path, metadata=metadata, page_checksum_verification=True)


def _strings(column) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column if column.type == pa.string() else pc.cast(column, pa.string())


def check_grouped(id_batches, id_col: str, where: str) -> None:
    """Raise ``NotGroupedError`` at the first object whose rows are not contiguous.

    ``id_batches``: the id column of a long table (one row per observation), batch after batch,
    as arrays or one-column record batches. Decoding groups a batch's rows by id, so an object
    whose rows come back after another's would silently become one curve (or two, across
    batches); scanning the ids alone first finds it before any work. Memory grows with the
    number of objects, not of observations."""
    finished: set = set()
    nothing = object()
    current = nothing  # the object of the last row read
    row = 0
    for batch in id_batches:
        ids = _strings(batch.column(0) if isinstance(batch, pa.RecordBatch) else batch)
        if len(ids) == 0:
            continue
        codes = pc.dictionary_encode(ids).indices
        codes = pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.flatnonzero(codes[1:] != codes[:-1]) + 1])
        for k, obj in zip(starts.tolist(), ids.take(pa.array(starts)).to_pylist()):
            if obj == current:  # the previous batch's last object goes on
                continue
            if obj in finished:
                raise NotGroupedError(
                    f"{where}: rows of object {obj!r} are not contiguous (row {row + k} comes "
                    f"back to it after other objects); sort or group the table by {id_col!r} "
                    f"first")
            if current is not nothing:
                finished.add(current)
            current = obj
        row += len(ids)


def check_long_table_grouped(source, id_col: str, where: str, batch_rows: int) -> None:
    """``check_grouped`` on a Parquet file (``pq.ParquetFile``) or an Arrow table."""
    if isinstance(source, pq.ParquetFile):
        check_grouped(source.iter_batches(batch_size=batch_rows, columns=[id_col]), id_col, where)
    else:
        check_grouped(source.column(id_col).chunks, id_col, where)
