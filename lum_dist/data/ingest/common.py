"""What every ingest adapter returns, and the shared readers adapters are built from.

Big files (ratings, behaviour logs) are read with pyarrow.csv as strings and validated column-wise
(see :class:`lum_dist.data.errors.RowChecker`); only when pyarrow cannot split a file into rows (a
wrong field count, blank lines) does a plain Python reader take over, to name the exact line.

pyarrow's readers run serially here (``use_threads=False``; the bytes go in as a native ``pa.BufferReader``,
so no Arrow thread calls back into Python). With threads, a process that exits right after a read (a bad row
found at once) aborted at exit in 7 of 570 runs under CPU load ("terminate called without an active
exception", exit -6; apache/arrow#34314, #39862), serially in none of 550. Serial parsing costs nothing
measurable on 2 cores: 129 MB of tab-separated ratings in 0.37 s, threaded 0.32 to 0.50 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lum_dist.data.errors import SKIP_BAD_HINT, DataError, RowChecker

GENERIC_EVAL = "MASK (generic): the held-out behaviour's value would leak information about its item"


@dataclass
class RawBehaviours:
    """Behaviours in raw ids, one row each, in input order.

    ``table`` columns: user (string), item (string), ts (int64), cond_<f> (string) per condition
    field, optional num_<g> (float32). ``item_attrs`` maps item raw id -> attribute raw value for each
    field in ``item_cond_fields`` (columns: item, <f>...); the behaviour table already holds those
    values too. An optional ``item_attrs`` column ``tags`` (list<string>) holds every attribute of the item
    as a bag (all its genres, all its S3-Rec attributes): the item feature ``item_tags`` reads it.
    ``order_given``: the input order is the behaviour order (ts is an ordinal).
    """

    name: str
    table: pa.Table
    cond_fields: list[str]
    item_cond_fields: list[str] = field(default_factory=list)
    numeric_fields: list[str] = field(default_factory=list)
    item_attrs: pa.Table | None = None
    has_timestamps: bool = True
    eval_condition: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def require_file(path: str | Path, fmt: str, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fmt}: expected {what} at {path} (not found)")
    return path


def input_path(source: dict, fmt: str) -> Path:
    if not source.get("input"):
        raise ValueError(f"{fmt}: source needs 'input' (the raw file or folder)")
    path = Path(source["input"])
    if not path.exists():
        raise FileNotFoundError(f"{fmt}: input {path} does not exist")
    return path


def read_delimited(
    data: bytes,
    file: str,
    names: list[str],
    delimiter: str,
    skip_bad: bool,
    skipped: dict[str, int],
    header: bool = False,
    encoding: str = "utf8",
) -> tuple[dict[str, pa.Array], RowChecker]:
    """Split ``data`` into string columns ``names`` (no quoting); returns the columns and a checker
    holding each row's line number, with rows of the wrong field count already flagged or dropped."""
    if len(delimiter) > 1:  # e.g. MovieLens '::': pyarrow splits on one byte only
        data = data.replace(delimiter.encode(), b"\x1f")
        delimiter = "\x1f"
    if b"\n\n" not in data and b"\n\r\n" not in data and not data.startswith((b"\n", b"\r\n")):
        try:
            table = pacsv.read_csv(
                pa.BufferReader(data),
                read_options=pacsv.ReadOptions(
                    column_names=names, skip_rows=int(header), encoding=encoding, use_threads=False
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter, quote_char=False, ignore_empty_lines=False
                ),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
            )
            cols = {n: table.column(n).combine_chunks() for n in names}
            lines = np.arange(table.num_rows, dtype=np.int64) + 1 + int(header)
            return cols, RowChecker(file, lines, skip_bad)
        except pa.ArrowInvalid:
            pass  # fall through to the line-by-line reader, which names the bad line
    return _read_lines(decode(data, file, encoding), file, names, delimiter, skip_bad, skipped, header)


def decode(data: bytes, file: str, encoding: str = "utf8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            file, line, None, f"not valid {encoding} text (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from e


def _read_lines(
    text: str,
    file: str,
    names: list[str],
    delimiter: str,
    skip_bad: bool,
    skipped: dict[str, int],
    header: bool,
) -> tuple[dict[str, pa.Array], RowChecker]:
    rows, lines = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if (header and lineno == 1) or not line.strip():
            continue
        parts = line.split(delimiter)
        if len(parts) != len(names):
            missing = names[len(parts)] if len(parts) < len(names) else names[-1]
            if not skip_bad:
                raise DataError(
                    file,
                    lineno,
                    missing,
                    f"expected {len(names)} fields {names}, got {len(parts)} ({SKIP_BAD_HINT})",
                )
            skipped["wrong_field_count"] = skipped.get("wrong_field_count", 0) + 1
            continue
        rows.append(parts)
        lines.append(lineno)
    cols = {n: pa.array([r[i] for r in rows], pa.string()) for i, n in enumerate(names)}
    return cols, RowChecker(file, np.asarray(lines, dtype=np.int64), skip_bad)


def attach_item_attrs(
    columns: dict[str, pa.Array], attrs: pa.Table, fields: list[str], checker: RowChecker, attrs_file: str
) -> None:
    """Add cond_<f> = attribute of the behaviour's item; items missing from ``attrs`` are flagged."""
    items = columns["item"]
    idx = pc.index_in(items, value_set=attrs.column("item"))
    missing = pc.is_null(idx).to_numpy(zero_copy_only=False)
    checker.flag(
        missing, "item", "unknown_item", lambda r: f"{items[r].as_py()!r} is not in {Path(attrs_file).name}"
    )
    safe = pc.fill_null(idx, 0)
    for f in fields:
        columns[f"cond_{f}"] = pc.take(attrs.column(f), safe)


def finish_table(
    columns: dict[str, pa.Array | np.ndarray], checker: RowChecker, skipped: dict[str, int]
) -> pa.Table:
    """Raise on / drop the flagged rows and return the behaviour table."""
    keep = checker.finish(skipped)
    table = pa.table(columns)
    return table if keep.all() else table.filter(pa.array(keep))
