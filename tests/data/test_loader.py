"""PackedLoader: budget, leakage, rank sharding, exact resume, fingerprint check; eval_batches; reports; fixture."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lum_dist.config import DataConfig
from lum_dist.data.errors import DataError
from lum_dist.data.loader import PackedLoader, eval_batches
from lum_dist.data.prepare import prepare
from lum_dist.data.schema import MASK_ID
from lum_dist.testing.fixtures import drop_last_category_of_row_1, edit_shard_column, write_tiny_dataset
from lum_dist.utils import data_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ds"
    meta = write_tiny_dataset(path, num_users=60, num_items=40, num_shards=3, numeric_fields=("rating",))
    return path, meta


def cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), max_seq_len=16, token_budget=40, rows_per_batch=3, shuffle_buffer=24, seed=3,
                cond_dropout=0.3)
    return DataConfig(**{**base, **kw})


def read_rows(path, meta) -> dict[str, dict]:
    return {r["user_id"]: r for s in meta.shards for r in pq.read_table(path / s).to_pylist()}


def assert_same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_batches_respect_budget_and_layout(tiny):
    path, meta = tiny
    users = read_rows(path, meta)
    loader = PackedLoader(path, cfg(path))
    for b in itertools.islice(loader, 30):
        assert b.num_rows == 3 and b.token_budget == 40
        lens = b.seq_lens()
        for r in range(b.num_rows):
            assert int(lens[b.row_splits[r]:b.row_splits[r + 1]].sum()) <= 40
        assert b.max_seqlen == int(lens.max()) <= 16
        starts = b.cu_seqlens[:-1].long()
        assert (b.positions[starts] == 0).all()
        assert torch.equal(b.positions, torch.arange(b.num_tokens) - b.cu_seqlens.long()[b.seq_index()])
        assert (b.targets[b.token_type == 0] >= 3).all() and (b.targets[b.token_type == 1] == 0).all()
        assert b.numeric.shape == (b.num_tokens, 1)
        for s, uid in enumerate(b.user_ids):  # no leakage: only the most recent training behaviours
            row = users[uid]
            items = b.item_ids[int(b.cu_seqlens[s]) + 1:int(b.cu_seqlens[s + 1]):2].tolist()
            assert items == row["item"][:row["train_end"]][-len(items):] and len(items) == min(8, row["train_end"])


def test_one_epoch_visits_every_training_sequence_once(tiny):
    path, meta = tiny
    # one truncated sequence per user, a buffer of exactly one epoch, one row per batch
    loader = PackedLoader(path, cfg(path, shuffle_buffer=60, rows_per_batch=1))
    seen = []
    while len(seen) < 60:
        seen += next(loader).user_ids
    assert sorted(seen) == sorted(f"u{u}" for u in range(60)) and loader.epoch == 0
    second = []
    while len(second) < 60:
        second += next(loader).user_ids
    assert sorted(second) == sorted(seen) and loader.epoch == 1 and second != seen  # reshuffled


def test_ranks_disjoint_and_cover(tiny):
    path, meta = tiny
    per_rank = [PackedLoader(path, cfg(path), rank=r, world_size=4).users.user_id for r in range(4)]
    flat = [u for ids in per_rank for u in ids]
    assert sorted(flat) == sorted(f"u{u}" for u in range(60)) and len(set(flat)) == 60
    assert {len(ids) for ids in per_rank} == {15}
    b = next(PackedLoader(path, cfg(path), rank=1, world_size=4))
    assert set(b.user_ids) <= set(per_rank[1])


@pytest.mark.parametrize("packing,window", [("pack", "truncate"), ("pad", "window")])
def test_exact_resume(tiny, packing, window):
    path, meta = tiny
    c = cfg(path, packing=packing, long_sequences=window, max_seq_len=10)
    ref = PackedLoader(path, c, rank=1, world_size=2)
    expected = list(itertools.islice(ref, 60))  # > 1 epoch on this rank
    assert ref.epoch >= 1
    for cut in (1, 17, 45):
        first = PackedLoader(path, c, rank=1, world_size=2)
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        resumed = PackedLoader(path, c, rank=1, world_size=2)
        resumed.load_state_dict(state)
        for want in expected[cut:cut + 10]:
            assert_same(next(resumed), want)


def test_resume_refuses_other_data(tiny, tmp_path):
    path, meta = tiny
    state = PackedLoader(path, cfg(path)).state_dict()
    other = tmp_path / "other"
    write_tiny_dataset(other, num_users=60, num_items=40, seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        PackedLoader(other, cfg(other)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        PackedLoader(path, cfg(path), rank=0, world_size=2).load_state_dict(state)


def test_bad_config(tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="max_seq_len"):
        PackedLoader(path, cfg(path, max_seq_len=50))
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(path, cfg(path), rank=2, world_size=2)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_batches(tiny, split):
    path, meta = tiny
    users = read_rows(path, meta)
    got = {}
    for rank in range(2):
        for b in eval_batches(path, meta, split, 12, 30, rank=rank, world_size=2):
            assert b.num_rows == 1 and b.num_tokens <= 30
            last = b.cu_seqlens[1:].long() - 1
            assert (b.cond_ids[last] == MASK_ID).all() and (b.num_queries == 1).all()
            for s, uid in enumerate(b.user_ids):
                assert uid not in got
                row = users[uid]
                t = row["train_end"] if split == "valid" else row["valid_end"]
                lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
                hist = b.item_ids[lo + 1:hi - 1:2].tolist()
                assert hist == row["item"][t - len(hist):t] and len(hist) == min(t, 5)  # no target, nothing later
                got[uid] = int(b.targets[hi - 1])
                assert got[uid] == row["item"][t]
                assert b.seen_items[s].tolist() == sorted(set(row["item"][:t]))  # whole history, for exclusion
    assert len(got) == 60  # loo: every user has a valid and a test target
    capped = [u for b in eval_batches(path, meta, split, 12, 30, max_users=7) for u in b.user_ids]
    assert sorted(capped) == sorted(f"u{u}" for u in range(7))


def test_reports(tiny):
    from lum_dist.data.report import dataset_report, format_report, packing_report

    path, meta = tiny
    d = dataset_report(path)
    assert (d["users"], d["behaviours"], d["train_behaviours"]) == (60, meta.num_behaviours, meta.num_train_behaviours)
    assert 3 <= d["seq_len_p50"] <= d["seq_len_p99"] <= d["seq_len_max"] <= 20
    p = packing_report(path, cfg(path, token_budget=64, max_seq_len=32), num_batches=10)
    assert 0 < p["pad"]["utilisation"] < p["pack"]["utilisation"] <= 1 and p["pad"]["seqs_per_row"] == 1
    assert p["pack"]["tokens"] == round(p["pack"]["utilisation"] * p["pack"]["rows"] * 64)
    text = format_report({"dataset": d, "packing": p})
    assert "== dataset" in text and "== packing" in text and text.count("\n  pa") == 2


def test_eval_batches_temporal_split_only_users_with_a_target(tmp_path):
    meta = write_tiny_dataset(tmp_path / "t", num_users=40, split="temporal", seed=2)
    rows = read_rows(tmp_path / "t", meta)
    for split, has in (("valid", lambda r: r["train_end"] < len(r["item"]) and r["valid_end"] > r["train_end"]),
                       ("test", lambda r: r["valid_end"] < len(r["item"]))):
        got = [u for b in eval_batches(tmp_path / "t", meta, split, 20, 64) for u in b.user_ids]
        want = [u for u, r in rows.items() if has(r)]
        assert sorted(got) == sorted(want) and 0 < len(want) < 40


def test_fixture_follows_the_schema(tiny):
    path, meta = tiny
    vocab = pq.read_table(path / "vocab" / "item.parquet").to_pydict()
    assert vocab["id"] == list(range(meta.num_items)) and vocab["raw"][:3] == ["[PAD]", "[UNK]", "[MASK]"]
    counts = vocab["count"][3:]
    assert counts == sorted(counts, reverse=True) and min(counts) > 0  # training counts, by frequency
    train = np.concatenate([r["item"][:r["train_end"]] for r in read_rows(path, meta).values()])
    np.testing.assert_array_equal(np.bincount(train, minlength=meta.num_items)[3:], counts)
    assert pq.read_table(path / "items.parquet").num_rows == meta.num_items


@pytest.mark.skipif(data_dir() is None or not (data_dir() / "s3rec-seq" / "Beauty.txt").is_file(),
                    reason="needs the real S3-Rec Beauty file under LUM_DATA_DIR")
def test_real_beauty_eval_and_resume(tmp_path):
    path = tmp_path / "beauty"
    meta = prepare({"format": "s3rec", "input": str(data_dir() / "s3rec-seq" / "Beauty.txt")}, path)
    users = [u for r in range(2) for b in eval_batches(path, meta, "test", 100, 8192, rank=r, world_size=2)
             for u in b.user_ids]
    assert len(users) == len(set(users)) == meta.num_users == 22363  # published S3-Rec count
    c = DataConfig(path=str(path), max_seq_len=100, token_budget=2048, rows_per_batch=2, shuffle_buffer=2048)
    ref = PackedLoader(path, c, rank=1, world_size=2)
    expected = list(itertools.islice(ref, 12))
    assert sum(b.num_tokens for b in expected) / (24 * 2048) > 0.9  # a buffer holds ~14 rows
    first = PackedLoader(path, c, rank=1, world_size=2)
    for _ in range(5):
        next(first)
    resumed = PackedLoader(path, c, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    for want in expected[5:]:
        assert_same(next(resumed), want)


def test_no_training_behaviours_is_an_error_not_a_hang(tmp_path):
    meta = write_tiny_dataset(tmp_path / "d", num_users=6)
    edit_shard_column(tmp_path / "d", meta, 0, "train_end", lambda ends: [0] * len(ends))
    with pytest.raises(ValueError, match="no user with a training behaviour"):
        next(PackedLoader(tmp_path / "d", cfg(tmp_path / "d")))


def test_bad_shard_row_names_file_row_and_field(tmp_path):
    meta = write_tiny_dataset(tmp_path / "d", num_users=6, num_shards=2)
    edit_shard_column(tmp_path / "d", meta, 1, "cond_category", drop_last_category_of_row_1)
    with pytest.raises(DataError, match=r"part-00001.parquet line 2: field 'cond_category'"):
        PackedLoader(tmp_path / "d", cfg(tmp_path / "d"))
    with pytest.raises(DataError, match="cond_category"):
        next(eval_batches(tmp_path / "d", meta, "valid", 16, 64))
