"""What ``embed`` promises about its output folder, and how each promise is kept.

* Nothing but our own outputs is replaced (``plan_outputs``, before any work): an output path
  that is an input of the run, that two inputs would both write, or that holds a Parquet file not
  written by astromer-fast stops the run with a message naming it.
* One run writes into a folder at a time: a lock file created atomically (``OutputFolderLock``).
* An output is written under a temporary name unique to its writer, flushed to disk and renamed
  into place, the rejects file first, then the folder is flushed (``commit``): a final name
  always holds a complete file.
* ``resume`` keeps an existing output only if both files open, their row counts are those
  recorded when they were committed, and they were made from the same input with the same
  options and weights (``why_not_reusable``); otherwise the input is embedded again, and the
  reason is reported.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

LOCK_NAME = ".astromer-fast.lock"
# Schema metadata: the run's settings (written by embed), and which input the output is of.
SETTINGS_KEY = b"astromer_fast"
INPUT_KEY = b"astromer_fast.input"
# Footer metadata added when the file is complete: its row count and its rejects file's.
COUNTS_KEY = b"astromer_fast.counts"
# Settings that may differ without changing a single number of the output.
NOT_COMPARED = ("version", "model_path")
# pyarrow adds footer metadata to an open writer from version 17 on; before, the row counts are
# not recorded and resume checks the rest.
CAN_RECORD_COUNTS = hasattr(pq.ParquetWriter, "add_key_value_metadata")


class OutputLockedError(OSError):
    """Another run holds (or a killed one left) the lock of the output folder."""


def output_paths(path: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{path.stem}.parquet", out_dir / f"{path.stem}.rejects.parquet"


def _file_id(path: Path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def written_by_astromer_fast(path: Path) -> bool | None:
    """True for an embeddings or rejects file of ours, False for another Parquet file, None when
    the file cannot be read as Parquet (nothing anyone could read would be lost)."""
    try:
        md = pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - any unreadable file is "not Parquet" here
        return None
    if SETTINGS_KEY in (md.metadata or {}):
        return True
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    return names == ["id", "band", "n_obs", "reason"]  # a rejects file of an older version


def plan_outputs(files: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """The (embeddings, rejects) paths of every input in ``out_dir``, after checking that writing
    them replaces no input, that no two inputs write the same file, and that no existing Parquet
    file there was written by anything else. Raises ``ValueError`` naming the culprit."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: the output must be a folder, and this is a file")
    inputs = {_file_id(p): p for p in files}
    claimed: dict[str, Path] = {}
    plans = []
    for p in files:
        pair = output_paths(p, out_dir)
        for q in pair:
            key = os.path.normcase(os.path.realpath(q))
            if key in claimed and claimed[key] != p:
                raise ValueError(f"{claimed[key]} and {p} would both write {q}; rename one of "
                                 f"them or embed them into different folders")
            claimed[key] = p
            if not q.exists():
                continue
            if _file_id(q) in inputs:
                raise ValueError(f"{q} is an input of this run, and embedding "
                                 f"{inputs[_file_id(q)]} into {out_dir} would overwrite it; "
                                 f"choose another output folder")
            if written_by_astromer_fast(q) is False:
                raise ValueError(f"{q} exists and was not written by astromer-fast embed; "
                                 f"refusing to replace it (move it, or choose another output "
                                 f"folder)")
        plans.append(pair)
    return plans


# ---------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------

def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputFolderLock:
    """``folder/.astromer-fast.lock``, created with O_CREAT | O_EXCL (so two runs cannot both
    get it) and holding the owner's pid, host, start time and command. Released on exit,
    whatever the exit. A lock whose process is gone (a run killed with SIGKILL, a crash of the
    machine) is not taken over: the next run refuses, says so, and gives the command that
    removes it, as only the user knows that no other machine writes there."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._inode = None

    def acquire(self) -> "OutputFolderLock":
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": " ".join(sys.argv)}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise OutputLockedError(self._why_held()) from None
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
            self._inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        return self

    def release(self) -> None:
        if self._inode is None:
            return
        try:  # only our own lock: someone may have removed it and another run taken the folder
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _why_held(self) -> str:
        remove = f"rm {shlex.quote(str(self.path))}"
        try:
            owner = json.loads(self.path.read_text())
            pid, host, started = int(owner["pid"]), str(owner["host"]), owner.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            return (f"{self.folder} is locked by {self.path}, which does not say by whom; if no "
                    f"astromer-fast embed is writing there, remove it and run again: {remove}")
        who = f"astromer-fast embed (pid {pid} on {host}, started {started})"
        if host != socket.gethostname():
            return (f"{self.folder} is in use by {who}; it runs on another machine, so this one "
                    f"cannot tell whether it still does. Wait for it, or if it has ended, remove "
                    f"its lock and run again: {remove}")
        if _pid_running(pid):
            return (f"{self.folder} is in use by {who}; wait for it to finish or write "
                    f"elsewhere (lock: {self.path})")
        return (f"{self.folder} is locked by {who}, which is no longer running (killed?). Remove "
                f"its stale lock and run again, with --resume to keep its finished outputs: "
                f"{remove}")


# ---------------------------------------------------------------------------------------------
# Temporary files and commits
# ---------------------------------------------------------------------------------------------

def temp_path(dest: Path) -> Path:
    """A name no other writer uses, hidden, beside ``dest`` (a rename stays in one folder)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_leftover_temps(dest: Path) -> None:
    """Temporary files of ``dest`` left by killed runs (the caller holds the folder's lock);
    ``NAME.tmp`` is the name older versions used."""
    pattern = str(dest.with_name(f".{glob.escape(dest.name)}.*.tmp"))
    for p in glob.glob(pattern) + [str(dest) + ".tmp"]:
        Path(p).unlink(missing_ok=True)


def _fsync(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot flush a folder; the renames are then as durable as they get.
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def commit(renames: list[tuple[Path, Path]]) -> None:
    """Flush each temporary file, rename them into place in order, then flush their folders,
    so that after a crash a final name holds either its complete new file or its old one."""
    for tmp, _ in renames:
        _fsync(tmp)
    for tmp, final in renames:
        os.replace(tmp, final)
    for folder in {final.parent for _, final in renames}:
        _fsync(folder, directory=True)


# ---------------------------------------------------------------------------------------------
# Resume: is an existing output the one this run would write?
# ---------------------------------------------------------------------------------------------

def input_identity(path) -> dict:
    """What identifies the input an output was made from: its name, size and row count."""
    return {"name": Path(path).name, "bytes": os.path.getsize(path),
            "rows": pq.read_metadata(path).num_rows}


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _differences(found, wanted, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(found) | set(wanted)):
        if not prefix and key in NOT_COMPARED:
            continue
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_show(a)} there, {_show(b)} now")
    return out


def why_not_reusable(dest: Path, rdest: Path, settings: bytes, source) -> str | None:
    """None when ``dest`` and ``rdest`` are a complete output of ``source`` made with
    ``settings`` (the schema metadata this run writes); else why not, in a few words."""
    files = {}
    for p in (dest, rdest):
        if not p.is_file():
            return f"{p.name} is missing"
        try:
            files[p] = pq.read_metadata(p)
        except Exception as e:  # noqa: BLE001 - whatever the damage, the file is redone
            return f"{p.name} cannot be read ({e})"
    counts = {}
    for p, md in files.items():
        meta = md.metadata or {}
        if SETTINGS_KEY not in meta:
            return f"{p.name} was not written by astromer-fast embed"
        if CAN_RECORD_COUNTS or COUNTS_KEY in meta:
            if COUNTS_KEY not in meta:
                return (f"{p.name} has no record of a completed write (an older version wrote "
                        f"it, or it was rewritten since)")
            counts[p] = json.loads(meta[COUNTS_KEY])
    if counts:
        if counts[dest] != counts[rdest]:
            return f"{dest.name} and {rdest.name} were not written together"
        for p, n in ((dest, counts[dest]["rows"]), (rdest, counts[dest]["rejects"])):
            if files[p].num_rows != n:
                return f"{p.name} holds {files[p].num_rows} rows, {n} were written"
    wanted = json.loads(settings)
    now = input_identity(source)
    for p, md in files.items():
        meta = md.metadata
        diff = _differences(json.loads(meta[SETTINGS_KEY]), wanted)
        if diff:
            return f"{p.name} was made with other settings ({'; '.join(diff[:3])})"
        made_from = json.loads(meta.get(INPUT_KEY, b"null"))
        if made_from != now:
            return f"{p.name} was made from another version of {now['name']} ({made_from} there)"
    return None
