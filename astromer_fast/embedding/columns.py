"""Where the light curves are in a table: one small dataclass instead of seven keywords repeated
through ``embed``, ``Embedder``, the engines and the CLI.

The old keywords (``id_col``, ``time_col``, ``mag_col``, ``err_col``, ``band_col``,
``lightcurve_col``, ``layout``) are still taken by ``embed`` and the engines; ``columns_from``
maps them onto a ``Columns``, and the same check covers both spellings (each message names the
spelling the caller used).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa

from astromer_fast.data.layouts import LAYOUTS, Layout, detect_layout

# Old keyword -> Columns field.
COLUMN_KEYWORDS = {"id_col": "id", "time_col": "time", "mag_col": "mag", "err_col": "err",
                   "band_col": "band", "lightcurve_col": "lightcurve", "layout": "layout"}
# The columns that may be "" (use none).
OPTIONAL_COLUMNS = ("err", "band")


@dataclass(frozen=True)
class Columns:
    """Where the light curves are in a table (for ``to_parquet`` and tables given to
    ``embed``). ``None``: detected (``astromer_fast.data.layouts`` knows the common names);
    ``err=""`` / ``band=""``: use none. ``layout``: force "nested", "struct_of_lists", "lists"
    or "long". ``lightcurve``: the list<struct> or struct column holding the observations."""

    id: str | None = None
    time: str | None = None
    mag: str | None = None
    err: str | None = None
    band: str | None = None
    lightcurve: str | None = None
    layout: str | None = None

    def __post_init__(self):
        check_columns({f"Columns.{f.name}": getattr(self, f.name) for f in fields(self)})

    def detect(self, schema: pa.Schema, where: str = "input") -> Layout:
        """The layout of ``schema`` with these choices (``detect_layout``)."""
        return detect_layout(schema, where, **self.as_embed_kwargs())

    def as_embed_kwargs(self) -> dict:
        """The old keywords of :func:`astromer_fast.embed` these stand for."""
        return {old: getattr(self, new) for old, new in COLUMN_KEYWORDS.items()}


def check_columns(named: dict) -> None:
    """Check column choices given as {name the caller used: value}; the last part of each name
    (after a dot or as an old keyword) says which column it is."""
    for name, value in named.items():
        field_name = COLUMN_KEYWORDS.get(name, name.rsplit(".", 1)[-1])
        if field_name == "layout":
            if value is not None and value not in LAYOUTS:
                raise ValueError(f"{name} must be one of {LAYOUTS} (or None: detected), got "
                                 f"{value!r}")
            continue
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a column name (a string), got {value!r}")
        if value == "" and field_name not in OPTIONAL_COLUMNS:
            raise ValueError(f"{name} cannot be empty (only the err and band columns take '': "
                             f"none)")


def columns_from(columns: Columns | None = None, **old) -> Columns:
    """``columns``, or the old keywords (``id_col=...``, ``layout=...``; None = not given) as a
    ``Columns``; giving both is an error, as one would silently win."""
    unknown = sorted(set(old) - set(COLUMN_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}")
    given = {k: v for k, v in old.items() if v is not None}
    if columns is not None:
        if not isinstance(columns, Columns):
            raise ValueError(f"columns must be an astromer_fast.Columns, got {columns!r}")
        if given:
            raise ValueError(f"give the columns either as columns=Columns(...) or as "
                             f"{sorted(given)}, not both")
        return columns
    check_columns(given)
    return Columns(**{COLUMN_KEYWORDS[k]: v for k, v in given.items()})
