"""Amazon reviews 2014 (McAuley) 5-core: JSON lines (optionally inside a .zip) or ``user,item,rating,ts`` csv.

JSON keys used: reviewerID, asin, overall (rating 1..5), unixReviewTime. With a ``meta`` file
(2014 ``meta_*.json``: one object per line, JSON or Python-literal, with ``asin`` and
``categories``: a list of category paths) the condition fields are ``category`` (item attribute: the
deepest level of the item's first category path) and ``rating``; without it only ``rating``.
All are MASK in evaluation queries.
"""

from __future__ import annotations

import ast
import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from lum_dist.data.errors import SKIP_BAD_HINT, DataError, RowChecker
from lum_dist.data.ingest.common import (
    GENERIC_EVAL,
    RawBehaviours,
    attach_item_attrs,
    decode,
    finish_table,
    input_path,
    read_delimited,
    require_file,
)

JSON_KEYS = {"user": "reviewerID", "item": "asin", "rating": "overall", "ts": "unixReviewTime"}


def _read_bytes(path: Path) -> tuple[bytes, str, str]:
    """(contents, name for messages, kind 'json'|'csv'), unpacking .zip / .gz."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [
                m for m in z.namelist() if m.endswith((".json", ".csv")) and not m.startswith("__MACOSX")
            ]
            if not members:
                raise FileNotFoundError(f"amazon-5core: {path} holds no .json or .csv file")
            return (
                z.read(members[0]),
                f"{path.name}:{members[0]}",
                "csv" if members[0].endswith(".csv") else "json",
            )
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    stem = path.name.removesuffix(".gz")
    return data, str(path), "csv" if stem.endswith(".csv") else "json"


def _json_columns(data: bytes, file: str, skip_bad: bool, skipped: dict[str, int]) -> tuple[dict, RowChecker]:
    schema = pa.schema(
        [
            (k, pa.string() if f in ("user", "item") else pa.float64() if f == "rating" else pa.int64())
            for f, k in JSON_KEYS.items()
        ]
    )
    if b"\n\n" not in data:
        try:
            t = pajson.read_json(
                pa.BufferReader(data),
                read_options=pajson.ReadOptions(use_threads=False),  # serial: see ingest/common.py
                parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
            )
            cols = {f: t.column(k).combine_chunks().cast(pa.string()) for f, k in JSON_KEYS.items()}
            return cols, RowChecker(file, np.arange(1, t.num_rows + 1, dtype=np.int64), skip_bad)
        except pa.ArrowInvalid:
            pass  # the line-by-line reader below names the bad line
    rows, lines = [], []
    for lineno, line in enumerate(decode(data, file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not skip_bad:
                raise DataError(file, lineno, None, f"not valid JSON: {e.msg} ({SKIP_BAD_HINT})") from e
            skipped["bad_json"] = skipped.get("bad_json", 0) + 1
            continue
        rows.append([None if obj.get(k) is None else str(obj[k]) for k in JSON_KEYS.values()])
        lines.append(lineno)
    cols = {f: pa.array([r[i] for r in rows], pa.string()) for i, f in enumerate(JSON_KEYS)}
    return cols, RowChecker(file, np.asarray(lines, dtype=np.int64), skip_bad)


def _categories(path: Path) -> pa.Table:
    items, cats = [], []
    text = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode("utf-8")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(line)  # the 2014 meta files are Python literals
            except (ValueError, SyntaxError) as e:
                raise DataError(path, lineno, None, "neither JSON nor a Python literal") from e
        if "asin" not in obj:
            raise DataError(path, lineno, "asin", "missing")
        paths = obj.get("categories") or [[]]
        items.append(str(obj["asin"]))
        cats.append(str(paths[0][-1]) if paths[0] else "unknown")
    return pa.table({"item": pa.array(items, pa.string()), "category": pa.array(cats, pa.string())})


def amazon_5core(source: dict) -> RawBehaviours:
    path = input_path(source, "amazon-5core")
    if path.is_dir():
        raise ValueError(
            f"amazon-5core: input must be a reviews file (.json, .json.gz, .zip or .csv), got {path}"
        )
    skip_bad, skipped = source.get("skip_bad", False), {}
    data, file, kind = _read_bytes(path)
    if kind == "csv":
        cols, check = read_delimited(data, file, ["user", "item", "rating", "ts"], ",", skip_bad, skipped)
    else:
        cols, check = _json_columns(data, file, skip_bad, skipped)
    check.non_empty(cols["user"], "user")
    check.non_empty(cols["item"], "item")
    rating = check.floats(cols["rating"], "rating", lo=1, hi=5)
    ts = check.integers(cols["ts"], "ts", lo=0)
    columns = {"user": cols["user"], "item": cols["item"], "ts": pa.array(ts, pa.int64())}
    fields, item_fields, attrs = ["rating"], [], None
    if source.get("meta"):
        meta_file = require_file(source["meta"], "amazon-5core", "the item metadata meta_*.json")
        attrs = _categories(meta_file)
        attach_item_attrs(columns, attrs, ["category"], check, str(meta_file))
        fields, item_fields = ["category", "rating"], ["category"]
    columns["cond_rating"] = pa.array(
        np.clip(np.ceil(rating), 1, 5).astype(np.int64).astype(str), pa.string()
    )
    return RawBehaviours(
        name=Path(file.split(":")[-1]).stem,
        table=finish_table(columns, check, skipped),
        cond_fields=fields,
        item_cond_fields=item_fields,
        item_attrs=attrs,
        eval_condition={f: GENERIC_EVAL for f in fields},
        skipped=skipped,
    )
