"""A tiny prepared dataset written directly in the :mod:`lum_dist.data.schema` format.

Tests of every stage use it so they do not depend on the ingest pipeline. Users have 3 to 20
behaviours with increasing timestamps; each item has one value per condition field (an item
attribute, like a category). Vocabularies follow the schema: training counts only, ids by descending
training frequency (ties: raw id ascending) after the reserved ids, values unseen in training -> UNK.
Vocabulary and items tables hold one row per id, reserved ids included, so ``id == row index``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lum_dist.data.prepare import shards_fingerprint
from lum_dist.data.schema import (
    COND_PREFIX,
    ITEM_FIELD,
    NUM_PREFIX,
    NUM_SPECIAL_IDS,
    PAD_ID,
    RESERVED_RAW,
    UNK_ID,
    VOCAB_SCHEMA,
    DatasetMeta,
    user_schema,
)
from lum_dist.utils import atomic_dir


def _vocab(raw_train: np.ndarray) -> tuple[dict[int, int], pa.Table]:
    """raw value -> dense id, and the vocabulary table, from the training occurrences."""
    values, counts = np.unique(raw_train, return_counts=True)
    order = np.lexsort((values, -counts))  # descending count, then raw ascending
    mapping = {int(values[j]): NUM_SPECIAL_IDS + k for k, j in enumerate(order)}
    table = pa.table({
        "id": pa.array(np.arange(NUM_SPECIAL_IDS + len(order)), pa.int32()),
        "raw": RESERVED_RAW + [str(int(values[j])) for j in order],
        "count": pa.array([0] * NUM_SPECIAL_IDS + [int(counts[j]) for j in order], pa.int64()),
    }, schema=VOCAB_SCHEMA)
    return mapping, table


def write_tiny_dataset(path: str | Path, num_users: int = 50, num_items: int = 40,
                       cond_fields: tuple[str, ...] = ("category",), seed: int = 0, split: str = "loo",
                       num_shards: int = 1, numeric_fields: tuple[str, ...] = (),
                       min_len: int = 3, max_len: int = 20) -> DatasetMeta:
    """Write a valid prepared dataset under ``path`` and return its meta."""
    root = Path(path)
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=num_users)
    raw_items = [rng.integers(0, num_items, size=n) for n in lens]
    item_attr = {f: rng.integers(0, max(2, num_items // 5), size=num_items) for f in cond_fields}
    ts = [np.cumsum(rng.integers(1, 100_000, size=n)).astype(np.int64) + 1_600_000_000 for n in lens]
    if split == "loo":
        bounds = [(n - 2, n - 1) for n in lens]
        split_params: dict = {}
    elif split == "temporal":
        t1, t2 = np.quantile(np.concatenate(ts), [0.8, 0.9]).astype(np.int64).tolist()
        bounds = [(int((t < t1).sum()), int((t < t2).sum())) for t in ts]
        split_params = {"temporal_cutoffs": [t1, t2]}
    else:
        raise ValueError(f"split={split!r}: expected 'loo' or 'temporal'")

    train_raw = np.concatenate([it[:te] for it, (te, _) in zip(raw_items, bounds, strict=False)])
    item_map, item_vocab = _vocab(train_raw)
    field_maps = {f: _vocab(item_attr[f][train_raw]) for f in cond_fields}

    def dense(mapping: dict[int, int], raw: np.ndarray) -> list[int]:
        return [mapping.get(int(v), UNK_ID) for v in raw]

    columns: dict[str, list] = {"user_id": [f"u{u}" for u in range(num_users)],
                                ITEM_FIELD: [dense(item_map, it) for it in raw_items]}
    for f in cond_fields:
        columns[COND_PREFIX + f] = [dense(field_maps[f][0], item_attr[f][it]) for it in raw_items]
    columns["ts"] = [t.tolist() for t in ts]
    for g in numeric_fields:
        columns[NUM_PREFIX + g] = [rng.random(n).astype(np.float32).tolist() for n in lens]
    columns["train_end"] = [b[0] for b in bounds]
    columns["valid_end"] = [b[1] for b in bounds]
    users = pa.table(columns, schema=user_schema(list(cond_fields), list(numeric_fields)))

    with atomic_dir(root) as tmp:  # a reader never sees half a dataset
        (tmp / "vocab").mkdir(parents=True, exist_ok=True)
        (tmp / "users").mkdir(parents=True, exist_ok=True)
        pq.write_table(item_vocab, tmp / "vocab" / f"{ITEM_FIELD}.parquet")
        for f in cond_fields:
            pq.write_table(field_maps[f][1], tmp / "vocab" / f"{f}.parquet")
        inverse = {v: k for k, v in item_map.items()}
        items = {"id": pa.array(np.arange(item_vocab.num_rows), pa.int32()), "raw": item_vocab.column("raw")}
        for f in cond_fields:
            attr = [PAD_ID] * NUM_SPECIAL_IDS
            attr += [field_maps[f][0].get(int(item_attr[f][inverse[i]]), UNK_ID)
                     for i in range(NUM_SPECIAL_IDS, item_vocab.num_rows)]
            items[f] = pa.array(attr, pa.int32())
        pq.write_table(pa.table(items), tmp / "items.parquet")

        shards, digest = [], hashlib.sha1()
        for s, chunk in enumerate(np.array_split(np.arange(num_users), num_shards)):
            rel = f"users/part-{s:05d}.parquet"
            pq.write_table(users.take(chunk), tmp / rel)
            digest.update((tmp / rel).read_bytes())
            shards.append(rel)
        meta = DatasetMeta(
            name="tiny", source_format="fixture", cond_fields=list(cond_fields), numeric_fields=list(numeric_fields),
            item_cond_fields=list(cond_fields), split=split, split_params=split_params, has_timestamps=True,
            num_users=num_users, num_behaviours=int(lens.sum()), num_train_behaviours=len(train_raw),
            vocab_sizes={ITEM_FIELD: item_vocab.num_rows, **{f: field_maps[f][1].num_rows for f in cond_fields}},
            shards=shards, fingerprint=digest.hexdigest(),
            eval_condition={f: "MASK (generic query)" for f in cond_fields},
        )
        meta.save(tmp / "meta.json")
    return meta


def edit_shard_column(path: str | Path, meta: DatasetMeta, shard: int, column: str,
                      edit: Callable[[list], list]) -> None:
    """Rewrite ``column`` of shard ``shard`` as ``edit(its values)`` (same Arrow type), then fingerprint the
    shards (:func:`record_shard_edit`): a dataset that still reads but holds the rows a test needs."""
    file = Path(path) / meta.shards[shard]
    table = pq.read_table(file)
    index = table.schema.get_field_index(column)
    values = pa.array(edit(table.column(column).to_pylist()), table.schema.field(index).type)
    pq.write_table(table.set_column(index, column, values), file)
    record_shard_edit(path, meta)


def drop_last_category_of_row_1(categories: list) -> list:
    """For :func:`edit_shard_column`: the second user's category list one short of its behaviours."""
    return [c[:-1] if i == 1 else c for i, c in enumerate(categories)]


def record_shard_edit(path: str | Path, meta: DatasetMeta) -> None:
    """Fingerprint hand-edited shards into meta.json, as a buggy writer would have: for tests of the row
    checks that come after the fingerprint check (tests/data/test_corruption.py tests that one)."""
    meta.fingerprint = shards_fingerprint(Path(path), meta.shards)
    meta.save(Path(path) / "meta.json")
