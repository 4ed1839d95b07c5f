"""best_fit_decreasing vs its plain reference, packing invariants, pad policy, collate layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lum_dist.data.batch import ITEM_TOKEN
from lum_dist.data.packing import best_fit_decreasing, best_fit_reference, collate, pad_rows
from lum_dist.data.schema import PAD_ID, DatasetMeta
from lum_dist.data.tokenize import tokenize_train
from lum_dist.testing.batches import random_packed_batch

META = DatasetMeta(name="t", source_format="hand", cond_fields=["cat"])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(1, 300), max_size=200))
def test_best_fit_matches_reference_and_invariants(budget, raw):
    lengths = np.array([min(x, budget) for x in raw], dtype=np.int64)
    rows = best_fit_decreasing(lengths, budget)
    assert rows == best_fit_reference(lengths, budget)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    assert all(lengths[row].sum() <= budget for row in rows)


def test_best_fit_never_opens_a_row_when_one_fits():
    rng = np.random.default_rng(0)
    for _ in range(50):
        budget = int(rng.integers(8, 100))
        lengths = rng.integers(1, budget + 1, size=int(rng.integers(1, 80)))
        rows = best_fit_decreasing(lengths, budget)
        order = np.argsort(-lengths, kind="stable")
        row_of = {i: r for r, row in enumerate(rows) for i in row}
        opened: set[int] = set()
        room: dict[int, int] = {}
        for i in order.tolist():  # replay the placements in decreasing-length order
            r = row_of[i]
            if r not in opened:
                assert all(v < lengths[i] for v in room.values()), "opened a row although one had room"
                opened.add(r)
                room[r] = budget
            else:  # best fit: the chosen row had the least room among those that fit
                fits = [v for v in room.values() if v >= lengths[i]]
                assert room[r] == min(fits)
            room[r] -= int(lengths[i])


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="sequence 1 has length 9"):
        best_fit_decreasing(np.array([3, 9]), 8)
    with pytest.raises(ValueError, match="length 0"):
        best_fit_decreasing(np.array([0]), 8)
    with pytest.raises(ValueError):
        pad_rows(np.array([9]), 8)


def test_pack_beats_pad_utilisation():
    lengths = np.random.default_rng(1).integers(2, 60, size=500)
    used = lengths.sum()
    pack, pad = best_fit_decreasing(lengths, 128), pad_rows(lengths, 128)
    assert len(pad) == 500 and used / (len(pack) * 128) > 0.95 > used / (len(pad) * 128)


def _row(uid: int, n: int) -> dict:
    return {"user_id": f"u{uid}", "item": np.arange(3, 3 + n) + uid, "cond_cat": np.full(n, 4 + uid),
            "ts": np.arange(n) * 10, "train_end": n, "valid_end": n}


def test_collate_layout():
    seqs = [tokenize_train(_row(u, n), META, 100)[0] for u, n in enumerate([3, 1, 5, 2])]
    rows = [[2, 1], [0], [3]]
    b = collate(seqs, rows, token_budget=12)
    lens = [10, 2, 6, 4]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == np.cumsum([0] + lens).tolist()
    assert b.row_splits.tolist() == [0, 2, 3, 4] and b.num_rows == 3 and b.max_seqlen == 10
    assert b.user_ids == ["u2", "u1", "u0", "u3"] and b.num_queries.tolist() == [0, 0, 0, 0]
    assert b.positions.tolist() == [*range(10), *range(2), *range(6), *range(4)]
    assert b.item_ids.tolist()[:4] == [0, 5, 0, 6] and b.cond_ids.shape == (22, 1)
    assert b.numeric is None and b.token_budget == 12
    assert b.utilization == pytest.approx(22 / 36)
    for s, i in enumerate([2, 1, 0, 3]):  # each sequence's tokens land in its own cu_seqlens slice
        sl = slice(int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1]))
        assert b.targets[sl].tolist() == seqs[i].targets.tolist()
    with pytest.raises(ValueError, match="row 0 holds 16 tokens"):
        collate(seqs, [[2, 1, 3]], token_budget=12)


def test_pad_policy_really_pads_and_padding_changes_no_real_output():
    from lum_dist.config import LossConfig
    from lum_dist.losses import InfoNCE
    from lum_dist.model import LUMModel, load_preset
    from lum_dist.train.trainer import PretrainModule

    seqs = [tokenize_train(_row(u, n), META, 100)[0] for u, n in enumerate([3, 1, 5])]
    rows = pad_rows(np.array([len(s) for s in seqs]), 12)
    padded, plain = collate(seqs, rows, 12, pad=True), collate(seqs, rows, 12)
    assert padded.num_tokens == 3 * 12 and padded.num_real_tokens == plain.num_tokens == 18
    assert padded.num_pad_tokens == 18 and padded.utilization == plain.utilization == pytest.approx(18 / 36)
    for s in range(3):  # each sequence keeps its tokens, then PAD items with no target up to the budget
        a, b = int(padded.cu_seqlens[s]), int(padded.cu_seqlens[s + 1])
        n = len(seqs[rows[s][0]])
        assert b - a == 12 and padded.positions[a:b].tolist() == list(range(12))
        assert (padded.item_ids[a + n:b] == 0).all() and (padded.targets[a + n:b] == 0).all()
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 20, [12], num_layers=2)).eval()
    real = torch.cat([torch.arange(int(padded.cu_seqlens[s]), int(padded.cu_seqlens[s]) + len(seqs[rows[s][0]]))
                      for s in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_batch(padded)[real], model.forward_batch(plain), rtol=1e-5, atol=1e-5)
        module = PretrainModule(model, InfoNCE(LossConfig(logq_correction=False), 20))
        torch.testing.assert_close(module(padded)[0], module(plain)[0], rtol=1e-5, atol=1e-6)


def test_items_before_are_each_targets_earlier_items_of_its_own_sequence():
    # 6 item ids in sequences of up to 6 behaviours: repeats, repeated targets and a 1-token sequence
    b = random_packed_batch([13, 1, 12, 4, 9], num_items=9, cond_vocab_sizes=[4], seed=3)
    tokens = (b.targets > 0).nonzero().squeeze(1)
    rows, items = b.items_before(tokens)
    starts, seq = b.cu_seqlens.long(), b.seq_index()
    expected = []  # one pair per earlier occurrence
    for k, t in enumerate(tokens.tolist()):
        for j in range(int(starts[seq[t]]), t):
            item = int(b.item_ids[j])
            if b.token_type[j] == ITEM_TOKEN and item != PAD_ID and item != int(b.targets[t]):
                expected.append((k, item))
    assert rows.tolist() == sorted(rows.tolist())  # sorted by row: the loss takes them in row chunks
    assert sorted(zip(rows.tolist(), items.tolist(), strict=True)) == sorted(expected)
    assert len(expected) > len(set(expected))  # the batch has repeated items...
    assert any(int(b.targets[t]) in b.item_ids[int(starts[seq[t]]) : t].tolist() for t in tokens.tolist())  # ...and targets
    assert b.items_before(tokens[:0])[0].numel() == 0
