"""Ingest adapter for the embedded synthetic datasets (generators: :mod:`lum_dist.data.synthetic`).

``kind`` picks the generator: ``planted`` (the default: :func:`synthetic_arrays`, short histories with
planted interests) or ``longrange`` (:func:`longrange_arrays`, a 100k+ item catalogue and histories whose
next item depends on behaviours hundreds of steps back). Other keys are that generator's keywords.
Condition fields ``category`` (item attribute) and ``behavior`` (click/cart/buy); MASK in evaluation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lum_dist.data.ingest.common import GENERIC_EVAL, RawBehaviours
from lum_dist.data.synthetic import BEHAVIORS, longrange_arrays, synthetic_arrays

GENERATORS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "planted": synthetic_arrays,
    "longrange": longrange_arrays,
}
# Every source key some generator reads (prepare rejects others as typos; the adapter checks the kind's).
OPTIONS: set[str] = {"kind"}.union(*(inspect.signature(f).parameters for f in GENERATORS.values()))


def generator_kwargs(source: dict) -> tuple[str, dict]:
    """The generator kind of ``source`` and its keyword arguments; a key of another kind is an error."""
    kind = source.get("kind", "planted")
    if kind not in GENERATORS:
        raise ValueError(f"synthetic: kind={kind!r}: expected one of {sorted(GENERATORS)}")
    params = set(inspect.signature(GENERATORS[kind]).parameters)
    foreign = sorted(k for k in source if k in OPTIONS - params - {"kind"})
    if foreign:
        raise ValueError(
            f"synthetic: option(s) {foreign} do not apply to kind={kind!r}; its options: {sorted(params)}"
        )
    return kind, {k: source[k] for k in params if k in source}


def synthetic(source: dict) -> RawBehaviours:
    """Ingest adapter: ``kind`` (planted | longrange) and that generator's keywords (num_users, seed...)."""
    kind, kwargs = generator_kwargs(source)
    a = GENERATORS[kind](**kwargs)
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
        name="synthetic" if kind == "planted" else f"synthetic-{kind}",
        table=table,
        cond_fields=["category", "behavior"],
        item_cond_fields=["category"],
        item_attrs=attrs,
        eval_condition={f: GENERIC_EVAL for f in ["category", "behavior"]},
    )


def _ids(prefix: str, values: np.ndarray) -> pa.Array:
    """Raw string ids like 'u17', built in Arrow (numpy string ops are slow at millions of rows)."""
    return pc.binary_join_element_wise(prefix, pa.array(values).cast(pa.string()), "")
