"""Bad-input errors of the ingest pipeline, and a vectorised row checker that raises them.

Every message names the file, the line (1-based, as an editor shows it) and the field, e.g.
``u.data line 17: field 'ts': 'abc' is not an integer``. With ``skip_bad`` the offending lines
are dropped instead and counted per reason, and the counts end up in ``meta.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# How to skip malformed lines, in the words of each interface (lum-prepare flag, pretraining config).
SKIP_BAD_HINT = "pass --skip-bad (or skip_bad: true in data.prepare) to skip such lines"
_INT_RE = r"^\s*-?\d+\s*$"
_FLOAT_RE = r"^\s*-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


class DataError(ValueError):
    """Malformed input: ``file``, ``line`` (1-based, or None) and ``field`` (or None) are attributes."""

    def __init__(self, file: str | Path, line: int | None, field: str | None, message: str):
        self.file, self.line, self.field, self.message = str(file), line, field, message
        where = Path(str(file)).name if "/" in str(file) else str(file)
        where += f" line {line}" if line is not None else ""
        where += f": field '{field}'" if field is not None else ""
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable across worker processes despite the custom signature
        return DataError, (self.file, self.line, self.field, self.message)


@dataclass
class RowChecker:
    """Collects per-row problems of one file; ``finish`` raises on the first or drops them all."""

    file: str
    lines: np.ndarray  # int64 [n]: the input line of each row
    skip_bad: bool = False
    bad: np.ndarray = field(init=False)
    _first: list[tuple[int, str, str, str]] = field(default_factory=list)  # (line, field, message, reason)
    _reasons: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bad = np.zeros(len(self.lines), dtype=bool)

    def flag(self, mask: np.ndarray, field_name: str, reason: str, describe) -> None:
        """Mark rows ``mask`` bad; ``describe(row) -> str`` words the message for one row."""
        mask = np.asarray(mask, dtype=bool) & ~self.bad  # count each row once, for its first problem
        if not mask.any():
            return
        row = int(np.argmax(mask))
        self._first.append((int(self.lines[row]), field_name, describe(row), reason))
        self._reasons.append((mask, reason))
        self.bad |= mask

    def integers(
        self, values: pa.Array, field_name: str, lo: int | None = None, hi: int | None = None
    ) -> np.ndarray:
        """Parse a string column as int64; non-integers and values outside [lo, hi] are flagged."""
        ok = pc.fill_null(pc.match_substring_regex(values, _INT_RE), False).to_numpy(zero_copy_only=False)
        clean = pc.if_else(pa.array(ok), pc.utf8_trim_whitespace(values), "0")
        out = pc.cast(clean, pa.int64()).to_numpy(zero_copy_only=False)
        self.flag(~ok, field_name, "not_an_integer", lambda r: f"{_show(values[r])} is not an integer")
        self._range(out, field_name, lo, hi, ok)
        return out

    def floats(
        self, values: pa.Array, field_name: str, lo: float | None = None, hi: float | None = None
    ) -> np.ndarray:
        ok = pc.fill_null(pc.match_substring_regex(values, _FLOAT_RE), False).to_numpy(zero_copy_only=False)
        clean = pc.if_else(pa.array(ok), pc.utf8_trim_whitespace(values), "0")
        out = pc.cast(clean, pa.float64()).to_numpy(zero_copy_only=False)
        self.flag(~ok, field_name, "not_a_number", lambda r: f"{_show(values[r])} is not a number")
        self._range(out, field_name, lo, hi, ok)
        return out

    def non_empty(self, values: pa.Array, field_name: str) -> None:
        empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), True)
        self.flag(empty.to_numpy(zero_copy_only=False), field_name, "empty_field", lambda r: "is empty")

    def _range(self, out: np.ndarray, field_name: str, lo, hi, ok: np.ndarray) -> None:
        low = ok & (out < lo) if lo is not None else np.zeros(len(out), bool)
        high = ok & (out > hi) if hi is not None else np.zeros(len(out), bool)
        rng = f"[{lo}, {hi if hi is not None else 'inf'}]"
        self.flag(low | high, field_name, "out_of_range", lambda r: f"{out[r]:g} is out of range {rng}")

    def finish(self, skipped: dict[str, int]) -> np.ndarray:
        """Raise on the earliest bad line, or (skip_bad) add counts to ``skipped``; returns the keep mask."""
        if not self._first:
            return ~self.bad
        if not self.skip_bad:
            line, field_name, message, _ = min(self._first)
            raise DataError(self.file, line, field_name, f"{message} ({SKIP_BAD_HINT})")
        for mask, reason in self._reasons:
            skipped[reason] = skipped.get(reason, 0) + int(mask.sum())
        return ~self.bad


def _show(value: pa.Scalar) -> str:
    v = value.as_py()
    return "missing" if v is None else repr(v)
