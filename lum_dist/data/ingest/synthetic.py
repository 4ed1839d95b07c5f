"""Ingest adapter for the embedded synthetic dataset (generator: :mod:`lum_dist.data.synthetic`).

Condition fields ``category`` (item attribute) and ``behavior`` (click/cart/buy); MASK in evaluation.
"""

from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lum_dist.data.ingest.common import GENERIC_EVAL, RawBehaviours
from lum_dist.data.synthetic import BEHAVIORS, synthetic_arrays


def synthetic(source: dict) -> RawBehaviours:
    """Ingest adapter: any keyword of :func:`synthetic_arrays` (num_users, num_items, seed, max_len...)."""
    a = synthetic_arrays(
        **{k: source[k] for k in inspect.signature(synthetic_arrays).parameters if k in source}
    )
    table = pa.table(
        {
            "user": _ids("u", a["user"]),
            "item": _ids("i", a["item"]),
            "ts": pa.array(a["ts"], pa.int64()),
            "cond_category": _ids("c", a["category"]),
            "cond_behavior": pa.array(BEHAVIORS[a["behavior"]], pa.string()),
        }
    )
    attrs = pa.table(
        {"item": _ids("i", np.arange(len(a["item_category"]))), "category": _ids("c", a["item_category"])}
    )
    return RawBehaviours(
        name="synthetic",
        table=table,
        cond_fields=["category", "behavior"],
        item_cond_fields=["category"],
        item_attrs=attrs,
        eval_condition={f: GENERIC_EVAL for f in ["category", "behavior"]},
    )


def _ids(prefix: str, values: np.ndarray) -> pa.Array:
    """Raw string ids like 'u17', built in Arrow (numpy string ops are slow at millions of rows)."""
    return pc.binary_join_element_wise(prefix, pa.array(values).cast(pa.string()), "")
