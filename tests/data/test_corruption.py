"""A prepared dataset damaged after ``prepare``: every read error names its file (DataError), and the shards
are checked against meta.json's fingerprint (once per process) with a message that says how to rebuild."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lum_dist.config import DataConfig
from lum_dist.data import prepare as P
from lum_dist.data.errors import DataError
from lum_dist.data.loader import PackedLoader, eval_batches
from lum_dist.data.report import dataset_report

SYN = {"format": "synthetic", "num_users": 90, "num_items": 60, "num_categories": 5, "seed": 7,
       "users_per_shard": 30}


def _cfg(path: Path) -> DataConfig:
    return DataConfig(path=str(path), max_seq_len=16, token_budget=64, rows_per_batch=2, shuffle_buffer=16)


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "ds"
    P.prepare(SYN, path)
    return path


def _scribble(file: Path, seed: int = 0) -> None:
    """Random bytes over the middle of ``file`` (a bad disk, a bad copy): same size, different content."""
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid - 200:mid + 200] = np.random.default_rng(seed).integers(0, 256, 400, dtype=np.uint8).tobytes()
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("open_dataset", [
    lambda p: PackedLoader(p, _cfg(p)),  # training
    lambda p: next(eval_batches(p, P.load_meta(p), "valid", 16, 64)),  # evaluation
    lambda p: P.read_users(p),  # group query, downstream
    lambda p: dataset_report(p),
], ids=["train", "eval", "read_users", "report"])
def test_random_bytes_in_a_shard_name_the_shard_and_how_to_rebuild(dataset, open_dataset):
    _scribble(dataset / "users" / "part-00001.parquet")
    with pytest.raises(DataError, match=r"part-00001\.parquet") as e:
        open_dataset(dataset)
    assert "launch/prepare.py --format synthetic" in str(e.value) and "--force" in str(e.value)


def test_a_changed_shard_that_still_reads_fails_the_fingerprint_and_the_hint_rebuilds_it(dataset):
    shard = dataset / "users" / "part-00002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)  # a valid parquet file, one user short
    with pytest.raises(DataError, match="changed since `prepare` wrote them") as e:
        PackedLoader(dataset, _cfg(dataset))
    command = shlex.split(str(e.value).split("`")[3])  # "... rebuild it with `python launch/prepare.py ...`"
    assert command[:2] == ["python", "launch/prepare.py"]
    meta = P.main(command[2:])  # the hint's command, as the user would run it
    assert meta.num_users == SYN["num_users"] and meta.split_params["source"] == P.normalize_source(SYN)
    assert next(iter(PackedLoader(dataset, _cfg(dataset)))).num_real_tokens > 0


def test_a_missing_shard_is_named(dataset):
    (dataset / "users" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match=r"shard users/part-00000\.parquet of the dataset .* is missing"):
        P.read_users(dataset)


def test_unreadable_vocabulary_items_and_meta_are_named(dataset):
    _scribble(dataset / "vocab" / "item.parquet")
    with pytest.raises(DataError, match=r"item\.parquet: cannot read"):
        P.load_vocab(dataset, "item")
    (dataset / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"items\.parquet: cannot read"):
        P.load_items(dataset)
    (dataset / "meta.json").write_text('{"name": "x"')
    with pytest.raises(DataError, match=r"meta\.json: not a valid meta\.json"):
        P.load_meta(dataset)


def test_the_fingerprint_is_hashed_once_per_process(dataset, monkeypatch):
    calls = []
    real = P.shards_fingerprint
    monkeypatch.setattr(P, "shards_fingerprint", lambda *a: calls.append(a) or real(*a))
    PackedLoader(dataset, _cfg(dataset))
    list(eval_batches(dataset, P.load_meta(dataset), "valid", 16, 64))
    P.read_users(dataset)
    assert len(calls) == 1


def test_meta_fingerprint_is_the_hash_of_the_shards(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["fingerprint"] == P.shards_fingerprint(dataset, meta["shards"])
