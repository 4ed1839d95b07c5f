"""Ingest adapter for the embedded synthetic dataset (generator: :mod:`lum_dist.data.synthetic`).

Condition fields ``category`` (item attribute) and ``behavior`` (click/cart/buy); MASK in evaluation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lum_dist.data.ingest.common import GENERIC_EVAL, RawBehaviours
from lum_dist.data.synthetic import BEHAVIORS, synthetic_arrays


def synthetic(source: dict) -> RawBehaviours:
    """Ingest adapter: options num_users, num_items, num_categories, seed (see synthetic_arrays)."""
    keys = ("num_users", "num_items", "num_categories", "seed")
    a = synthetic_arrays(**{k: source[k] for k in keys if k in source})
    table = pa.table({
        "user": pa.array(np.char.add("u", a["user"].astype(str)), pa.string()),
        "item": pa.array(np.char.add("i", a["item"].astype(str)), pa.string()),
        "ts": pa.array(a["ts"], pa.int64()),
        "cond_category": pa.array(np.char.add("c", a["category"].astype(str)), pa.string()),
        "cond_behavior": pa.array(BEHAVIORS[a["behavior"]], pa.string()),
    })
    attrs = table.select(["item", "cond_category"]).rename_columns(["item", "category"]).group_by(
        ["item", "category"]).aggregate([])
    return RawBehaviours(name="synthetic", table=table, cond_fields=["category", "behavior"],
                         item_cond_fields=["category"], item_attrs=attrs,
                         eval_condition={f: GENERIC_EVAL for f in ["category", "behavior"]})
