"""What ``embed`` guarantees, one test per way a user could break it: nothing is overwritten, one
run writes into a folder at a time, resume equals a full run, corrupt input is detected, bad
options are refused up front, every curve is embedded or rejected with a reason.
Tiny random-init models: the numbers do not matter, only what is written and when."""

import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import astromer_fast
from astromer_fast import Astromer, AstromerConfig
from astromer_fast.cli import main as cli_main
from astromer_fast.data import Curves, basic_clean
from astromer_fast.embedding import outputs
from astromer_fast.embedding.device import WindowEncoder
from astromer_fast.embedding.inputs import PAGE_CHECKSUMS
from astromer_fast.embedding.outputs import LOCK_NAME, OutputFolderLock, OutputLockedError

LC_TYPE = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))


def curves_table(n=12, seed=0, first=0):
    """``n`` nested curves of 3..260 observations (a few too short: rejected)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 260, n)
    curves = Curves(50000 + np.cumsum(rng.uniform(0.1, 2, lengths.sum())),
                    rng.normal(17, 0.3, lengths.sum()), rng.uniform(0.01, 0.1, lengths.sum()),
                    np.concatenate([[0], np.cumsum(lengths)]))
    return pa.table({"id": [f"c{first + i}" for i in range(n)], "lightcurve": curves.to_arrow()})


def write_curves(path, n=12, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(curves_table(n, seed), path, **kw)
    return path


@pytest.fixture
def kw(tiny_model_dir):
    return dict(model=str(tiny_model_dir), device="cpu", progress=False)


def count_model_calls(monkeypatch):
    calls = []
    real = WindowEncoder.run

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(WindowEncoder, "run", counted)
    return calls


def read_dir(d):
    return {p.name: pq.read_table(p) for p in sorted(d.glob("*.parquet"))}


# ---------------------------------------------------------------------------------------------
# 1. Nothing is overwritten
# ---------------------------------------------------------------------------------------------

def test_an_output_folder_holding_the_input_is_refused_before_any_work(kw, tmp_path,
                                                                        monkeypatch, capsys):
    src = write_curves(tmp_path / "c.parquet")
    before = src.read_bytes()
    calls = count_model_calls(monkeypatch)
    with pytest.raises(ValueError, match="c.parquet is an input of this run.*overwrite"):
        astromer_fast.embed(src, tmp_path, **kw)
    # The folder itself as input and output, from the command line, run in that folder.
    monkeypatch.chdir(tmp_path)
    assert cli_main(["embed", "c.parquet", "-o", ".", "--model", kw["model"], "-q"]) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert cli_main(["embed", str(tmp_path), "-o", str(tmp_path), "--model", kw["model"],
                     "-q"]) == 2
    assert src.read_bytes() == before and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]  # not even a lock left


def test_a_parquet_file_not_written_by_astromer_fast_is_never_replaced(kw, tmp_path):
    src = write_curves(tmp_path / "in" / "c.parquet")
    foreign = write_curves(tmp_path / "out" / "c.parquet", n=3, seed=9)  # someone's curves
    before = foreign.read_bytes()
    with pytest.raises(ValueError, match="not written by astromer-fast"):
        astromer_fast.embed(src, tmp_path / "out", **kw)
    assert foreign.read_bytes() == before
    # Our own outputs are replaced by a new run, as before.
    astromer_fast.embed(src, tmp_path / "ours", **kw)
    astromer_fast.embed(src, tmp_path / "ours", **kw)


# ---------------------------------------------------------------------------------------------
# 2. One run per output folder; unique temporary files; flushed commits
# ---------------------------------------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_completes(kw, tmp_path,
                                                                             monkeypatch):
    a = write_curves(tmp_path / "in" / "c.parquet", n=40)
    out = tmp_path / "out"
    reference = read_dir(_embedded(a, tmp_path / "ref", kw))

    inside, go_on = threading.Event(), threading.Event()
    real = WindowEncoder.run

    def paused(self, *args, **kwargs):
        inside.set()
        go_on.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WindowEncoder, "run", paused)
    errors = []
    first = threading.Thread(target=lambda: _catch(errors, astromer_fast.embed, a, out,
                                                   read_batch_rows=8, **kw))
    first.start()
    assert inside.wait(30)
    try:
        with pytest.raises(OutputLockedError, match=f"in use by astromer-fast embed.*{LOCK_NAME}"):
            astromer_fast.embed(a, out, **kw)
        with pytest.raises(OutputLockedError):
            astromer_fast.embed(a, out, resume=True, **kw)
    finally:
        go_on.set()
        first.join(60)
    assert errors == []
    got = read_dir(out)
    assert got.keys() == reference.keys()
    for name in got:
        assert got[name].equals(reference[name]), name
    assert sorted(p.name for p in out.iterdir()) == sorted(reference)  # no temp file, no lock


def _embedded(src, out, kw, **more):
    astromer_fast.embed(src, out, **kw, **more)
    return out


def _catch(errors, fn, *a, **k):
    try:
        fn(*a, **k)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_a_stale_lock_is_reported_with_the_command_that_clears_it(kw, tmp_path, capsys):
    src = write_curves(tmp_path / "c.parquet")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(OutputLockedError, match=f"no longer running.*rm {lock}"):
        astromer_fast.embed(src, out, **kw)
    assert cli_main(["embed", str(src), "-o", str(out), "--model", kw["model"], "-q"]) == 2
    assert f"rm {lock}" in capsys.readouterr().err
    lock.unlink()
    astromer_fast.embed(src, out, **kw)
    assert not lock.exists()  # released


def test_the_lock_is_released_whatever_ends_the_run(kw, tmp_path, monkeypatch):
    src = write_curves(tmp_path / "c.parquet")
    out = tmp_path / "out"

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(WindowEncoder, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        astromer_fast.embed(src, out, **kw)
    assert sorted(p.name for p in out.iterdir()) == []  # no lock, no temporary file


def test_temporary_files_are_unique_to_the_writer_and_commits_are_flushed(kw, tmp_path,
                                                                          monkeypatch):
    src = write_curves(tmp_path / "c.parquet")
    out = tmp_path / "out"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a), str(b))),
                                                     real_replace(a, b))[1])
    astromer_fast.embed(src, out, **kw)
    renames = [e for e in events if e[0] == "rename"]
    assert [Path(b).name for _, _, b in renames] == ["c.rejects.parquet", "c.parquet"]
    for _, tmp, final in renames:
        name = Path(tmp).name  # hidden, and unique to this process and writer
        assert name.startswith(f".{Path(final).name}.{os.getpid()}.") and name.endswith(".tmp")
        assert events.index(("fsync", tmp)) < events.index(renames[0])
    assert events[-1] == ("fsync", str(out.resolve()))  # the folder, after the renames
    assert outputs.temp_path(out / "c.parquet") != outputs.temp_path(out / "c.parquet")


# ---------------------------------------------------------------------------------------------
# 3. Resume keeps only what it can check
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def survey(tmp_path):
    src = tmp_path / "in"
    for k in range(2):
        write_curves(src / f"part{k}.parquet", n=10, seed=k)
    return src


def _resume(src, out, kw, **more):
    return astromer_fast.embed(src, out, resume=True, **kw, **more)


@pytest.mark.parametrize("change, says", [
    (dict(layers=True), "output.layers false there, true now"),
    (dict(min_obs=7), "preprocessing.min_obs 5 there, 7 now"),
    (dict(window_mode="nonoverlap"), "preprocessing.window_mode"),
    (dict(per_window=True), "output.per_window"),
    (dict(mag_col="magerr"), "layout.mag"),
    ("other weights", "weights_sha256"),
])
def test_resume_redoes_outputs_made_another_way(kw, survey, tmp_path, change, says):
    out = tmp_path / "out"
    astromer_fast.embed(survey, out, **kw)
    if change == "other weights":
        torch.manual_seed(7)
        other = tmp_path / "other"
        Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).save_pretrained(other)
        change = dict(model=str(other))
    run_kw = {**kw, **change}
    s = _resume(survey, out, run_kw)
    assert s.skipped == [] and len(s.redone) == 2 and all(says in why for _, why in s.redone), \
        s.redone
    want = read_dir(_embedded(survey, tmp_path / "full", run_kw))
    got = read_dir(out)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].equals(want[name], check_metadata=True), name
    # Now complete and made the same way: kept.
    s = _resume(survey, out, run_kw)
    assert len(s.skipped) == 2 and s.redone == []


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _fewer_rows(p):
    t = pq.read_table(p)  # the settings survive in the schema; the commit record does not
    pq.write_table(t.slice(0, t.num_rows - 1), p)


@pytest.mark.parametrize("damage, says", [
    (_truncate, "cannot be read"),
    (_empty, "cannot be read"),
    (lambda p: p.with_name("part1.rejects.parquet").unlink(), "part1.rejects.parquet is missing"),
    (_fewer_rows, "no record of a completed write" if outputs.CAN_RECORD_COUNTS else "rows"),
])
def test_resume_redoes_damaged_outputs(kw, survey, tmp_path, damage, says):
    out = tmp_path / "out"
    astromer_fast.embed(survey, out, **kw)
    want = read_dir(out)
    damage(out / "part1.parquet")
    s = _resume(survey, out, kw)
    assert s.skipped == [str(survey / "part0.parquet")]
    assert len(s.redone) == 1 and says in s.redone[0][1], s.redone
    got = read_dir(out)
    for name in want:
        assert got[name].equals(want[name], check_metadata=True), name


def test_resume_redoes_an_output_whose_input_changed(kw, survey, tmp_path, capsys):
    out = tmp_path / "out"
    astromer_fast.embed(survey, out, **kw)
    write_curves(survey / "part1.parquet", n=11, seed=5)
    assert cli_main(["embed", str(survey), "-o", str(out), "--model", kw["model"], "--resume",
                     "-q"]) == 0
    assert "another version of part1.parquet" in capsys.readouterr().err
    assert pq.read_metadata(out / "part1.parquet").num_rows + \
        pq.read_metadata(out / "part1.rejects.parquet").num_rows == 11


def test_resume_of_a_complete_run_does_no_work(kw, survey, tmp_path, monkeypatch):
    out = tmp_path / "out"
    astromer_fast.embed(survey, out, **kw)
    calls = count_model_calls(monkeypatch)
    s = _resume(survey, out, kw)
    assert len(s.skipped) == 2 and s.redone == [] and calls == []


# ---------------------------------------------------------------------------------------------
# 4. Corrupt input is detected
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not PAGE_CHECKSUMS, reason="pyarrow < 15 has no page checksums")
def test_a_corrupted_page_is_detected_where_the_file_has_checksums(kw, tmp_path):
    good = write_curves(tmp_path / "in" / "good.parquet", seed=1)
    bad = write_curves(tmp_path / "in" / "bad.parquet", write_page_checksum=True,
                       use_dictionary=False, compression="NONE")
    chunk = pq.read_metadata(bad).row_group(0).column(2)  # lightcurve.list.element.mag
    assert chunk.path_in_schema.endswith("mag")
    data = bytearray(bad.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 3] ^= 0x40  # inside a value
    bad.write_bytes(bytes(data))
    pq.read_table(bad)  # without verification, the damage reads as a different number
    with pytest.raises(ValueError, match="bad.parquet.*CRC checksum"):
        astromer_fast.embed(bad, **kw)
    s = astromer_fast.embed(tmp_path / "in", tmp_path / "out", continue_on_error=True, **kw)
    assert [src for src, _ in s.failed] == [str(bad)]
    assert sorted(read_dir(tmp_path / "out")) == ["good.parquet", "good.rejects.parquet"]
    assert good.exists()


@pytest.mark.skipif(not PAGE_CHECKSUMS, reason="pyarrow < 15 has no page checksums")
def test_outputs_are_written_with_page_checksums(kw, tmp_path):
    src = write_curves(tmp_path / "c.parquet")
    astromer_fast.embed(src, tmp_path / "out", **kw)
    out = tmp_path / "out" / "c.parquet"
    chunk = pq.read_metadata(out).row_group(0).column(4)  # embedding
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(out.read_bytes())
    data[start + chunk.total_compressed_size - 3] ^= 0x40
    out.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC"):
        pq.ParquetFile(out, page_checksum_verification=True).read()


# ---------------------------------------------------------------------------------------------
# 5. Bad settings are refused up front, naming them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("batch_size", -1), ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True),
    ("read_batch_rows", 0), ("long_batch_rows", -5), ("prefetch", 0), ("min_obs", 0),
    ("window_mode", "random"), ("layout", "wide"), ("bands", []), ("bands", [1]),
    ("layers", "yes"), ("resume", 1), ("id_col", ""), ("mag_col", 3),
    ("device", "foo"), ("device", "tpu"), ("device", 3),
])
def test_bad_options_are_refused_before_any_work(kw, tmp_path, option, value, monkeypatch):
    src = write_curves(tmp_path / "c.parquet")
    calls = count_model_calls(monkeypatch)
    with pytest.raises(ValueError, match=option if option != "device" else "device"):
        astromer_fast.embed(src, tmp_path / "out", **{**kw, option: value})
    assert not (tmp_path / "out").exists() and calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_message(kw, tmp_path, capsys):
    src = write_curves(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="device 'cuda'"):
        astromer_fast.embed(src, **{**kw, "device": "cuda"})
    assert cli_main(["embed", str(src), "-o", str(tmp_path / "o"), "--model", kw["model"],
                     "--device", "cuda", "-q"]) == 2
    assert "device 'cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "-1"], "--batch-size"), (["--batch-size", "0"], "--batch-size"),
    (["--read-rows", "0"], "--read-rows"), (["--min-obs", "0"], "--min-obs"),
    (["--device", "foo"], "device 'foo'"),
])
def test_bad_command_line_options_name_the_option(kw, tmp_path, capsys, argv, says):
    src = write_curves(tmp_path / "c.parquet")
    try:
        rc = cli_main(["embed", str(src), "-o", str(tmp_path / "o"), "--model", kw["model"],
                       "-q", *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "c.parquet" not in err


@pytest.mark.parametrize("field, value, says", [
    ("n_heads", 0, "n_heads must be between 1"), ("window", 0, "window must be between 1"),
    ("d_model", 10 ** 9, "d_model must be between"), ("dff", -1, "dff must be"),
    ("n_blocks", 0, "n_blocks must be"), ("n_heads", "2", "n_heads must be an integer"),
    ("dropout", 2.0, "dropout must be"), ("ln_eps", 0, "ln_eps must be"),
    ("use_leak", 1, "use_leak must be"),
])
def test_bad_config_fields_are_named(tiny_model_dir, tmp_path, capsys, field, value, says):
    with pytest.raises(ValueError, match=says):
        AstromerConfig(**{field: value})
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    doc = json.loads((model / "config.json").read_text())
    doc["config"][field] = value
    (model / "config.json").write_text(json.dumps(doc))
    src = write_curves(tmp_path / "c.parquet")
    assert cli_main(["embed", str(src), "-o", str(tmp_path / "o"), "--model", str(model),
                     "-q"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and says in err and "Traceback" not in err


def test_config_size_bound():
    with pytest.raises(ValueError, match="parameters"):
        AstromerConfig(n_blocks=1024, d_model=8192, n_heads=8, dff=8192)
    AstromerConfig.astromer1()
    AstromerConfig(pe_base=1000)  # an integer where a float is expected is fine


# ---------------------------------------------------------------------------------------------
# 6. Smaller ones
# ---------------------------------------------------------------------------------------------

def test_two_inputs_never_write_one_output(kw, tmp_path, monkeypatch):
    a = write_curves(tmp_path / "in" / "a.parquet")
    a_rej = write_curves(tmp_path / "in" / "a.rejects.parquet", seed=2)
    calls = count_model_calls(monkeypatch)
    with pytest.raises(ValueError, match="a.parquet and .*a.rejects.parquet would both write "
                                         ".*a.rejects.parquet"):
        astromer_fast.embed([a, a_rej], tmp_path / "out", **kw)
    other = write_curves(tmp_path / "in2" / "a.parquet", seed=3)
    with pytest.raises(ValueError, match="would both write"):
        astromer_fast.embed([a, other], tmp_path / "out", **kw)
    assert calls == [] and not (tmp_path / "out").exists()
    # The same file named twice is one input.
    s = astromer_fast.embed([a, str(a)], tmp_path / "out", **kw)
    assert len(s.files) == 1


def test_a_path_with_glob_characters_is_taken_literally(kw, tmp_path):
    src = write_curves(tmp_path / "x[1].parquet")
    write_curves(tmp_path / "x1.parquet", n=3)  # what the pattern x[1] would match
    assert astromer_fast.embed(str(src), **kw, return_rejects=True)[0]["id"].to_pylist()
    s = astromer_fast.embed(str(src), tmp_path / "out", **kw)
    assert [f[0] for f in s.files] == [str(src)]
    assert sorted(read_dir(tmp_path / "out")) == ["x[1].parquet", "x[1].rejects.parquet"]


def test_empty_inputs_and_a_table_with_an_output_folder_are_errors(kw, tmp_path, monkeypatch):
    write_curves(tmp_path / "c.parquet")
    monkeypatch.chdir(tmp_path)
    for source in ("", " ", []):
        with pytest.raises(ValueError, match="empty|no input"):
            astromer_fast.embed(source, **kw)
    with pytest.raises(ValueError, match="output= is for Parquet inputs"):
        astromer_fast.embed(curves_table(), output=tmp_path / "dir", **kw)
    assert not (tmp_path / "dir").exists()


def _long_table(pattern, rows_per_object=10):
    ids = [obj for obj in pattern for _ in range(rows_per_object)]
    n = len(ids)
    rng = np.random.default_rng(0)
    return pa.table({"objectId": ids, "mjd": 58000.0 + np.arange(n), "mag": rng.normal(18, .1, n),
                     "magerr": np.full(n, 0.05)})


@pytest.mark.parametrize("pattern, again", [("ABAC", "A"), ("ABAB", "A"),
                                            ("ABCDEFGHB", "B")])
def test_a_long_table_whose_objects_come_back_is_an_error_before_any_work(
        kw, tmp_path, monkeypatch, pattern, again):
    table = _long_table(pattern)
    path = tmp_path / "long.parquet"
    pq.write_table(table, path, row_group_size=15)
    calls = count_model_calls(monkeypatch)
    for source in (table, path):
        with pytest.raises(ValueError, match=f"object '{again}' are not contiguous"):
            astromer_fast.embed(source, **kw, long_batch_rows=1000)
    with pytest.raises(ValueError, match="long.parquet: rows of object"):
        astromer_fast.embed(path, tmp_path / "out", **kw, long_batch_rows=7)
    assert calls == []  # found before the model ran, even when the repeat is the last object
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".parquet"]
    # Grouped rows, objects in any order: fine.
    ok = _long_table("BAC")
    assert astromer_fast.embed(ok, **kw)["id"].to_pylist() == ["B", "A", "C"]


def test_a_string_magnitude_is_named_as_such(kw):
    table = _long_table("AB")
    table = table.set_column(2, "mag", pa.array([str(v) for v in table["mag"].to_pylist()]))
    with pytest.raises(ValueError, match=r"magnitude must be numbers.*mag \(string\)"):
        astromer_fast.embed(table, **kw)


def test_absurd_finite_values_are_dropped_with_a_reason_and_no_warning(kw, capfd):
    n = 60
    t = 50000 + np.arange(n, dtype=np.float64)
    rng = np.random.default_rng(0)
    m = rng.normal(18, 0.1, n)
    glitch_t = t.copy()
    glitch_t[5] = 1e20
    rows = {"times 1e20": (np.linspace(1e20, 2e20, n), m),
            "mags 1e29": (t, np.linspace(-1e29, 1e29, n)),
            "times 1e300": (np.linspace(1e300, 1.7e308, n), m),
            "one glitch": (glitch_t, m),
            "edge of range": (np.linspace(-1e7, 1e7, n), np.linspace(-1e3, 1e3, n)),
            "normal": (t, m)}
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float64()),
                              ("magerr", pa.float64())]))
    table = pa.table({"id": list(rows), "lightcurve": pa.array(
        [[{"time": a, "mag": b, "magerr": 0.05} for a, b in zip(*v)] for v in rows.values()],
        typ)})
    out, rej = astromer_fast.embed(table, **kw, return_rejects=True)
    assert out["id"].to_pylist() == ["one glitch", "edge of range", "normal"]
    assert out["n_obs"].to_pylist() == [n - 1, n, n]
    emb = np.asarray(out["embedding"].combine_chunks().flatten())
    assert np.isfinite(emb).all()
    reasons = dict(zip(rej["id"].to_pylist(), rej["reason"].to_pylist()))
    assert list(reasons) == ["times 1e20", "mags 1e29", "times 1e300"]
    assert all("out-of-range observation(s) (|time| > 1e+07 days or |mag| > 1e+03)" in r
               for r in reasons.values()), reasons
    assert not any("non-finite embedding" in r for r in reasons.values())
    err = capfd.readouterr().err
    assert "Warning" not in err and "overflow" not in err, err


def test_basic_clean_counts_out_of_range_observations_apart():
    curves = Curves.from_arrays([[1.0, 2e7, 3.0, np.nan], [1.0, 2.0]],
                                [[1.0, 2.0, 5e3, 4.0], [-1e3, 1e3]],
                                [[0.1, 0.1, 0.1, 0.1], [0.1, -0.1]])
    out, rep = basic_clean(curves)
    assert rep.nonfinite.tolist() == [1, 0]
    assert rep.out_of_range.tolist() == [2, 0]  # the bounds themselves are in range
    assert rep.nonpositive_err.tolist() == [0, 1]
    assert out.lengths.tolist() == [1, 1] and rep.totals()["out_of_range"] == 2
    assert "2 out-of-range observation(s)" in rep.describe(0)


# ---------------------------------------------------------------------------------------------
# The Ray and Dask engines write through the same driver: the same guarantees
# ---------------------------------------------------------------------------------------------

def test_the_engines_driver_keeps_the_same_guarantees(kw, survey, tmp_path):
    from astromer_fast.distributed._core import (DistributedSummary, TaskRunner, drive, plan,
                                                 prepare_outputs)

    options = {"model": kw["model"], "device": "cpu"}
    with pytest.raises(ValueError, match="would overwrite it"):
        prepare_outputs(survey, survey, False, options)
    out = tmp_path / "out"
    todo, skipped, out_dir = prepare_outputs(survey, out, False, options)
    runner = TaskRunner(options, read_batch_rows=4)
    tasks = plan(todo, 4, 2, 1, runner.columns)

    def run():
        return drive(tasks, (runner.run(t) for t in tasks), out_dir, DistributedSummary(),
                     progress=False)

    with OutputFolderLock(out):
        with pytest.raises(OutputLockedError):
            run()
    run()
    want = read_dir(_embedded(survey, tmp_path / "local", kw, read_batch_rows=4))
    got = read_dir(out)
    assert got.keys() == want.keys() and not list(out.glob(".*"))
    for name in got:
        assert got[name].equals(want[name], check_metadata=True), name
    todo, skipped, _ = prepare_outputs(survey, out, True, options)
    assert todo == [] and len(skipped) == 2
    (out / "part0.parquet").write_bytes(b"")
    todo, skipped, _ = prepare_outputs(survey, out, True, {**options, "layers": True})
    assert [p.name for p in todo] == ["part0.parquet", "part1.parquet"] and skipped == []
