"""Ingest adapters: raw public formats -> :class:`RawBehaviours` (raw ids, one row per behaviour).

``ADAPTERS`` maps a source ``format`` name to ``adapter(source: dict) -> RawBehaviours``;
:func:`lum_dist.data.prepare.prepare` turns the result into a prepared UBS dataset.
"""

from __future__ import annotations

from collections.abc import Callable

from lum_dist.data.ingest.amazon import amazon_5core
from lum_dist.data.ingest.common import RawBehaviours
from lum_dist.data.ingest.movielens import movielens_1m, movielens_100k, movielens_csv
from lum_dist.data.ingest.s3rec import s3rec
from lum_dist.data.ingest.synthetic import OPTIONS as SYNTHETIC_OPTIONS
from lum_dist.data.ingest.synthetic import synthetic
from lum_dist.data.ingest.taobao import taobao

ADAPTERS: dict[str, Callable[[dict], RawBehaviours]] = {
    "movielens-100k": movielens_100k,
    "movielens-1m": movielens_1m,
    "movielens-csv": movielens_csv,
    "amazon-5core": amazon_5core,
    "s3rec": s3rec,
    "taobao": taobao,
    "synthetic": synthetic,
}

# Source-spec keys each adapter reads besides the common ones (split, min_behaviours, ...); others are typos.
ADAPTER_OPTIONS: dict[str, set[str]] = {
    "movielens-100k": {"input"},
    "movielens-1m": {"input"},
    "movielens-csv": {"input"},
    "amazon-5core": {"input", "meta"},
    "s3rec": {"input", "meta"},
    "taobao": {"input"},
    "synthetic": SYNTHETIC_OPTIONS,
}


def get_adapter(fmt: str) -> Callable[[dict], RawBehaviours]:
    if fmt not in ADAPTERS:
        raise ValueError(f"unknown source format {fmt!r}; known formats: {sorted(ADAPTERS)}")
    return ADAPTERS[fmt]


__all__ = ["ADAPTERS", "ADAPTER_OPTIONS", "RawBehaviours", "get_adapter"]
