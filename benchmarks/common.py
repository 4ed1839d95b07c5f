"""Shared benchmark plumbing: a plain-text table and a JSON result with the run's provenance.

Every benchmark writes ``benchmarks/results/<name>.json`` (or ``$LUM_BENCH_RESULTS/<name>.json``) = ``{"meta": {...}, "rows": [...]}``, where
meta holds what the caller passes (shapes, FLOP formula, ...) plus device, git commit, torch version
and a UTC timestamp, so a number can always be traced to the code and machine that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lum_dist.utils import atomic_write_text, format_number, git_commit, provenance  # noqa: F401 (re-exported)

# $LUM_BENCH_RESULTS redirects the output (the CI smoke tests write to a temporary folder).
RESULTS = Path(os.environ.get("LUM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def write_result(name: str, rows: list[dict[str, Any]], meta: dict[str, Any], markdown: str | None = None) -> Path:
    """Write rows + provenance to benchmarks/results/<name>.json (atomically), and ``markdown`` (the rows as a
    table for people) to <name>.md beside it; return the JSON's path."""
    full = {**meta, **provenance()}
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps({"meta": full, "rows": rows}, indent=2) + "\n")
    if markdown is not None:
        atomic_write_text(path.with_suffix(".md"), markdown)
    return path


def print_table(rows: list[dict[str, Any]]) -> str:
    """Print rows (dicts sharing keys) as an aligned table; return the text."""
    if not rows:
        print("(no rows)")
        return "(no rows)"
    cols = list(rows[0])
    cells = [[format_number(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=False)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=False)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
