"""The loader's vectorised fast paths against their plain references: numpy's generators, per-user
tokenization + condition dropout, per-sequence collate, and the whole loader against the documented
algorithm run one user and one sequence at a time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lum_dist.config import DataConfig
from lum_dist.data.fast_random import reference_uniform, seed_pool, uniform, uniform_at
from lum_dist.data.loader import PackedLoader
from lum_dist.data.packing import best_fit_reference, collate, collate_blocks, pad_rows
from lum_dist.data.tokenize import (
    apply_cond_dropout,
    cond_dropout_block,
    tokenize_block,
    tokenize_train,
    train_windows,
)
from lum_dist.testing.fixtures import edit_shard_column, write_tiny_dataset


def assert_same_batch(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


# -- numpy's default_rng(key).random(n), vectorised --------------------------------------------------

WORD = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(WORD, min_size=1, max_size=4), min_size=1, max_size=5).filter(
    lambda keys: len({len(k) for k in keys}) == 1), st.integers(1, 40))
def test_uniform_at_is_numpys_generator(keys, n):
    pool = seed_pool(np.array(keys, dtype=np.uint32))
    for key, row in zip(keys, pool, strict=True):
        np.testing.assert_array_equal(row, np.random.SeedSequence(key).pool)
    index = np.repeat(np.arange(len(keys)), n)
    draw = np.tile(np.arange(n), len(keys))
    got = uniform_at(np.array(keys), index, draw).reshape(len(keys), n)
    for key, row in zip(keys, got, strict=True):
        np.testing.assert_array_equal(row, reference_uniform(key, n))


def test_uniform_far_draws_and_fallback():
    keys = np.array([[0, 0, 0, 0], [7, 3, 1, 2**32 - 1]])
    draws = np.array([0, 5000, 12345, 3, 99999])
    idx = np.array([0, 0, 1, 1, 1])
    want = [reference_uniform([int(v) for v in keys[i]], int(d) + 1)[d] for i, d in zip(idx, draws, strict=True)]
    np.testing.assert_array_equal(uniform_at(keys, idx, draws), want)
    # a key word >= 2**32 (numpy splits it into two words): numpy's own generator answers
    big = np.array([[2**40 + 5, 1, 2, 3]])
    np.testing.assert_array_equal(uniform(big, np.zeros(4, np.int64), np.arange(4)),
                                  reference_uniform([2**40 + 5, 1, 2, 3], 4))
    with pytest.raises(ValueError):
        uniform_at(big, np.zeros(1, np.int64), np.zeros(1, np.int64))


# -- tokenization and collate ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast") / "ds"
    meta = write_tiny_dataset(path, num_users=40, num_items=30, cond_fields=("category", "brand"), num_shards=2,
                              numeric_fields=("rating",), max_len=25)
    # users without a training behaviour make no sequence
    edit_shard_column(path, meta, 0, "train_end", lambda ends: [0 if i % 5 == 1 else t for i, t in enumerate(ends)])
    return path, meta


@pytest.mark.parametrize("long_sequences,max_seq_len,item_attributes", [("truncate", 12, False),
                                                                        ("window", 6, True),
                                                                        ("window", 50, False)])
def test_tokenize_block_is_tokenize_train_with_dropout(tiny, long_sequences, max_seq_len, item_attributes):
    path, meta = tiny
    cfg = DataConfig(path=str(path), max_seq_len=max_seq_len, token_budget=64, long_sequences=long_sequences)
    users = PackedLoader(path, cfg).users
    user, lo, hi = train_windows(users.train_end, max_seq_len, long_sequences)
    assert (users.train_end == 0).any() and not np.isin(np.flatnonzero(users.train_end == 0), user).any()
    first_lo = lo[np.searchsorted(user, user)]
    block = tokenize_block(users.lists, user, lo, hi, np.array([str(users.user_id[u]) for u in user], object),
                           meta, item_attributes)
    keys = np.stack([np.full(len(user), 9), np.full(len(user), 2), np.zeros(len(user), np.int64), user], axis=1)
    cond_dropout_block(block, 0.4, keys, 2 * (lo - first_lo))
    want = []
    for u in range(len(users)):
        rng = np.random.default_rng([9, 2, 0, u])
        want += [apply_cond_dropout(s, 0.4, rng) for s in tokenize_train(users.row(u), meta, max_seq_len,
                                                                          long_sequences, item_attributes)]
    assert len(want) == len(block)
    assert max_seq_len > 6 or len(block) > 2 * len(set(user.tolist()))  # users of several windows
    for s, seq in enumerate(want):
        a, b = block.offsets[s], block.offsets[s + 1]
        for name in ("item", "cond", "time_gaps", "targets", "numeric"):
            np.testing.assert_array_equal(getattr(block, name)[a:b], getattr(seq, name), err_msg=name)
        assert block.user_ids[s] == seq.user_id
        np.testing.assert_array_equal(seq.token_type, np.arange(b - a) % 2)  # what collate_blocks assumes
    assert (block.cond == 2).all(axis=1).any()  # some condition tokens were dropped


@pytest.mark.parametrize("pad", [False, True])
def test_collate_blocks_is_collate(tiny, pad):
    path, meta = tiny
    users = PackedLoader(path, DataConfig(path=str(path), max_seq_len=16)).users
    user, lo, hi = train_windows(users.train_end, 16, "window")
    uids = np.array([str(users.user_id[u]) for u in user], object)
    halves = [tokenize_block(users.lists, user[part], lo[part], hi[part], uids[part], meta)
              for part in (slice(0, 20), slice(20, None))]
    seqs = [s for u in range(len(users)) for s in tokenize_train(users.row(u), meta, 16, "window")]
    rng = np.random.default_rng(0)
    budget = 40
    for _ in range(5):  # rows drawn from both blocks, in runs
        picks = []
        for _ in range(int(rng.integers(1, 6))):
            b = int(rng.integers(0, 2))
            lens = np.diff(halves[b].offsets)
            idx = rng.permutation(len(lens))[:int(rng.integers(1, 4))]
            idx = idx[np.cumsum(lens[idx]) <= budget] if not pad else idx[:1]
            picks.append((b, idx))
        got = collate_blocks([(halves[b], idx) for b, idx in picks], budget, pad=pad)
        offset = [0, len(halves[0])]
        flat = [seqs[offset[b] + i] for b, idx in picks for i in idx.tolist()]
        index, start = [], 0
        for _, idx in picks:
            index.append(list(range(start, start + len(idx))))
            start += len(idx)
        assert_same_batch(got, collate(flat, index, budget, pad=pad))
    with pytest.raises(ValueError, match="row 0 holds"):
        collate_blocks([(halves[0], np.arange(len(halves[0])))], budget)


# -- the whole loader against the plain algorithm ------------------------------------------------------


def reference_batches(loader: PackedLoader, n: int) -> list:
    """The loader's algorithm (module docstring), one user and one sequence at a time."""
    cfg, rank, world = loader.cfg, loader.rank, loader.world_size
    epoch = pos = buffers = 0
    queue: list = []
    out = []

    def order(e: int) -> np.ndarray:
        perm = np.random.default_rng([cfg.seed, e]).permutation(loader.num_users_total)
        return perm[perm % world == rank]

    while len(out) < n:
        while len(queue) < cfg.rows_per_batch:
            pool: list = []
            while len(pool) < cfg.shuffle_buffer:
                users = order(epoch)
                if pos == len(users):
                    epoch, pos = epoch + 1, 0
                    continue
                g = int(users[pos])
                pos += 1
                rng = np.random.default_rng([cfg.seed, epoch, rank, g])
                pool += [apply_cond_dropout(s, cfg.cond_dropout, rng) for s in tokenize_train(
                    loader.users.row(g // world), loader.meta, cfg.max_seq_len, cfg.long_sequences,
                    cfg.item_attributes)]
            rng = np.random.default_rng([cfg.seed, rank, buffers, 1])
            buffers += 1
            pool = [pool[i] for i in rng.permutation(len(pool))]
            pack = best_fit_reference if cfg.packing == "pack" else pad_rows
            rows = pack(np.array([len(s) for s in pool]), cfg.token_budget)
            queue += [[pool[i] for i in rows[r]] for r in rng.permutation(len(rows))]
        rows, queue = queue[:cfg.rows_per_batch], queue[cfg.rows_per_batch:]
        index, start = [], 0
        for row in rows:
            index.append(list(range(start, start + len(row))))
            start += len(row)
        out.append(collate([s for row in rows for s in row], index, cfg.token_budget, pad=cfg.packing == "pad"))
    return out


@pytest.mark.parametrize("kw", [
    dict(max_seq_len=12, token_budget=30, rows_per_batch=2, shuffle_buffer=10),
    dict(max_seq_len=6, token_budget=20, rows_per_batch=3, shuffle_buffer=25, long_sequences="window",
         item_attributes=True, seed=4),
    dict(max_seq_len=16, token_budget=16, rows_per_batch=4, shuffle_buffer=7, packing="pad", cond_dropout=0.0),
])
def test_loader_is_the_plain_algorithm(tiny, kw):
    path, _ = tiny
    loader = PackedLoader(path, DataConfig(path=str(path), **{"cond_dropout": 0.3, **kw}), rank=1, world_size=2)
    want = reference_batches(loader, 40)
    for b in want:
        assert_same_batch(next(loader), b)
    assert loader.epoch >= 2  # several epochs and buffers straddling them
