"""Taobao UserBehavior.csv (Alibaba Tianchi): ``user,item,category,behavior,ts`` without a header.

Condition fields: ``category`` (an item attribute; an item's first seen category) and ``behavior``
(pv/cart/fav/buy, a behaviour attribute). Both are MASK in evaluation queries.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lum_dist.data.ingest.common import GENERIC_EVAL, RawBehaviours, finish_table, input_path, read_delimited

BEHAVIORS = ["pv", "cart", "fav", "buy"]
FIELDS = ["category", "behavior"]


def taobao(source: dict) -> RawBehaviours:
    path = input_path(source, "taobao")
    if path.is_dir():
        path = path / "UserBehavior.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"taobao: expected UserBehavior.csv (user,item,category,behavior,ts) at {path}"
            )
    skipped: dict[str, int] = {}
    cols, check = read_delimited(
        path.read_bytes(),
        str(path),
        ["user", "item", "category", "behavior", "ts"],
        ",",
        source.get("skip_bad", False),
        skipped,
    )
    check.non_empty(cols["user"], "user")
    check.integers(cols["item"], "item", lo=0)
    check.integers(cols["category"], "category", lo=0)
    behavior = cols["behavior"]
    known = pc.fill_null(pc.is_in(behavior, value_set=pa.array(BEHAVIORS)), False).to_numpy(
        zero_copy_only=False
    )
    check.flag(
        ~known, "behavior", "unknown_behavior", lambda r: f"{behavior[r].as_py()!r} is not one of {BEHAVIORS}"
    )
    ts = check.integers(cols["ts"], "ts", lo=0)
    table = finish_table(
        {
            "user": cols["user"],
            "item": cols["item"],
            "ts": pa.array(ts, pa.int64()),
            "cond_category": cols["category"],
            "cond_behavior": behavior,
        },
        check,
        skipped,
    )
    items = table.column("item").combine_chunks()
    _, first = np.unique(
        pc.dictionary_encode(items).indices.to_numpy(zero_copy_only=False), return_index=True
    )
    attrs = pa.table(
        {
            "item": pc.take(items, pa.array(first)),
            "category": pc.take(table.column("cond_category"), pa.array(first)),
        }
    )
    # An item has one category: every behaviour carries its item's (first seen) category.
    table = table.set_column(
        table.schema.get_field_index("cond_category"),
        "cond_category",
        pc.take(attrs.column("category"), pc.index_in(items, value_set=attrs.column("item"))),
    )
    return RawBehaviours(
        name="taobao",
        table=table,
        cond_fields=FIELDS,
        item_cond_fields=["category"],
        item_attrs=attrs,
        eval_condition={f: GENERIC_EVAL for f in FIELDS},
        skipped=skipped,
    )
