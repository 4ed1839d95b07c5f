"""S3-Rec sequences (Amazon Beauty/Sports/Toys, Yelp, LastFM): ``NAME.txt`` + ``NAME_item2attributes.json``.

``NAME.txt`` holds one user a line, ``user item item ...`` in chronological order, without
timestamps: ts is the behaviour's ordinal and ``has_timestamps`` is False. Condition field
``category`` = the item's first attribute (an item attribute; "none" if it has none); MASK in
evaluation queries. Item tags (``model.overrides.item_tags``): all of the item's attributes.
Checked: a line with no items (an empty user), a user on two lines, ids that are not integers >= 1,
items missing from the attribute file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lum_dist.data.errors import DataError, RowChecker
from lum_dist.data.ingest.common import (
    GENERIC_EVAL,
    RawBehaviours,
    attach_item_attrs,
    decode,
    finish_table,
    input_path,
    require_file,
)


def _attributes(path: Path) -> pa.Table:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"not valid JSON: {e.msg}") from e
    if not isinstance(raw, dict):
        raise DataError(path, None, None, "expected an object {item_id: [attribute_id, ...]}")
    items, first, tags = [], [], []
    for item, attrs in raw.items():
        if not isinstance(attrs, list):
            raise DataError(path, None, "attributes", f"item {item!r}: expected a list, got {attrs!r}")
        items.append(str(item))
        first.append(str(attrs[0]) if attrs else "none")  # a few Yelp items have no attribute
        tags.append([str(a) for a in attrs])
    return pa.table({"item": pa.array(items, pa.string()), "category": pa.array(first, pa.string()),
                     "tags": pa.array(tags, pa.list_(pa.string()))})


def s3rec(source: dict) -> RawBehaviours:
    seq_file = input_path(source, "s3rec")
    if seq_file.is_dir():
        raise ValueError(f"s3rec: input must be a NAME.txt file, got the folder {seq_file}")
    attr_file = Path(source.get("meta") or seq_file.with_name(seq_file.stem + "_item2attributes.json"))
    require_file(attr_file, "s3rec", "the item attributes NAME_item2attributes.json")
    skip_bad, skipped = source.get("skip_bad", False), {}
    data = seq_file.read_bytes()
    if not data.strip():
        raise DataError(seq_file, None, None, "the file is empty")
    decode(data, str(seq_file))  # names the line of a bad byte, which pyarrow would not
    lines_tab = (
        pacsv.read_csv(  # one string per line; '\x1f' never occurs in these files
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=["line"], use_threads=False),  # serial: see common.py
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
        )
        .column("line")
        .combine_chunks()
    )
    parts = pc.split_pattern_regex(pc.utf8_trim_whitespace(pc.fill_null(lines_tab, "")), r"\s+")
    lineno = np.arange(1, len(parts) + 1, dtype=np.int64)
    users = pc.list_element(parts, 0)
    n_items = pc.subtract(pc.list_value_length(parts), 1).to_numpy(zero_copy_only=False)
    check = RowChecker(str(seq_file), lineno, skip_bad)
    check.non_empty(users, "user")
    check.flag(n_items < 1, "items", "empty_user", lambda r: f"user {users[r].as_py()!r} has no items")
    codes = pc.dictionary_encode(users).indices.to_numpy(zero_copy_only=False)
    seen_before = np.ones(len(codes), dtype=bool)
    seen_before[np.unique(codes, return_index=True)[1]] = False
    check.flag(
        seen_before, "user", "duplicate_user", lambda r: f"user {users[r].as_py()!r} already had a line"
    )
    keep = check.finish(skipped)
    parts, lineno, n_items = parts.filter(pa.array(keep)), lineno[keep], n_items[keep]

    # One row per behaviour: the line's items, ts = ordinal within the user.
    items = pc.list_flatten(pc.list_slice(parts, 1))
    beh_line = np.repeat(lineno, n_items)
    starts = np.repeat(np.cumsum(n_items) - n_items, n_items)
    ts = np.arange(len(beh_line), dtype=np.int64) - starts
    check = RowChecker(str(seq_file), beh_line, skip_bad)
    check.integers(items, "item", lo=1)
    columns = {
        "user": pc.take(pc.list_element(parts, 0), pa.array(np.repeat(np.arange(len(parts)), n_items))),
        "item": items,
        "ts": pa.array(ts, pa.int64()),
    }
    attrs = _attributes(attr_file)
    attach_item_attrs(columns, attrs, ["category"], check, str(attr_file))
    return RawBehaviours(
        name=seq_file.stem,
        table=finish_table(columns, check, skipped),
        cond_fields=["category"],
        item_cond_fields=["category"],
        item_attrs=attrs,
        has_timestamps=False,
        eval_condition={"category": GENERIC_EVAL},
        skipped=skipped,
    )
