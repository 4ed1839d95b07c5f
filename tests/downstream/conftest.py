"""Fixtures: a tiny prepared dataset and fake step-2 outputs in the query job's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lum_dist.data.schema import NUM_SPECIAL_IDS, DatasetMeta
from lum_dist.testing.fixtures import write_tiny_dataset


def write_fake_query_dir(out: Path, data_root: Path, split: str, dim: int = 8, seed: int = 0,
                         fill: float | None = None, user_emb: dict[str, np.ndarray] | None = None,
                         lag: int = 0, history_len: int | None = None) -> Path:
    """Every user x ("*" + every attribute value) with random (or constant ``fill``) embeddings, computed (as
    the history_len column says) from the history up to the split's target minus ``lag`` behaviours, or
    from ``history_len`` behaviours when given (to fake a leak).

    ``user_emb`` gives every condition of a user that embedding. The item table depends on ``dim`` only:
    both directories of one run come from the same model."""
    meta = DatasetMeta.load(data_root / "meta.json")
    rng = np.random.default_rng(seed)
    field = meta.item_cond_fields[0]
    values = pq.read_table(data_root / "vocab" / f"{field}.parquet").column("raw").to_pylist()[NUM_SPECIAL_IDS:]
    conditions = ["*"] + [f"{field}={v}" for v in values]
    shard = pq.read_table(data_root / meta.shards[0], columns=["user_id", "train_end", "valid_end"])
    users = shard.column("user_id").to_pylist()
    ends = np.maximum(shard.column("train_end" if split == "valid" else "valid_end").to_numpy() - lag, 0)
    if history_len is not None:
        ends = np.full(len(users), history_len)

    def emb(n: int) -> pa.Array:
        x = np.full((n, dim), fill, np.float32) if fill is not None else rng.normal(size=(n, dim)).astype(np.float32)
        return pa.array(list(x), pa.list_(pa.float32()))

    out.mkdir(parents=True)
    n = len(users) * len(conditions)
    rows = emb(n) if user_emb is None else pa.array([user_emb[u] for u in users for _ in conditions],
                                                    pa.list_(pa.float32()))
    pq.write_table(pa.table({"user_id": np.repeat(users, len(conditions)).tolist(),
                             "history_len": pa.array(np.repeat(ends, len(conditions)), pa.int32()),
                             "condition": conditions * len(users), "embedding": rows,
                             "model_version": ["fake"] * n}), out / "part-00000.parquet")
    items = pq.read_table(data_root / "vocab" / "item.parquet").column("raw").to_pylist()[NUM_SPECIAL_IDS:]
    pq.write_table(pa.table({"item_id": items, "embedding": list(fake_item_table(len(items) + NUM_SPECIAL_IDS, dim)[
        NUM_SPECIAL_IDS:])}), out / "items.parquet")
    manifest = {"model_version": "fake", "dataset": meta.name, "split": split, "lag": lag, "conditions": conditions,
                "embedding_dim": dim, "shards": ["part-00000.parquet"], "num_rows": n, "complete": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def fake_item_table(num_items: int, dim: int) -> np.ndarray:
    """The fake LUM item embeddings by dense item id (rows of reserved ids are unused)."""
    return np.random.default_rng(1234).normal(size=(num_items, dim)).astype(np.float32)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_tiny_dataset(root, num_users=60, num_items=60, seed=3, min_len=4, max_len=20)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: intra-op threads only contend (a test ran 60x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
