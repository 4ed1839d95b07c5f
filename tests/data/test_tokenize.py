"""Token layout, truncation/windows, time buckets, eval/group-query tokens and leakage, cond dropout."""

from __future__ import annotations

import numpy as np
import pytest

from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN
from lum_dist.data.schema import MASK_ID, DatasetMeta
from lum_dist.data.tokenize import (
    NUM_TIME_BUCKETS,
    apply_cond_dropout,
    time_gap_buckets,
    tokenize_eval,
    tokenize_group_query,
    tokenize_train,
)

META = DatasetMeta(name="t", source_format="hand", cond_fields=["cat", "ctx"], numeric_fields=["rating"])


def hand_row(n: int = 5, train_end: int = 3) -> dict:
    return {
        "user_id": "alice",
        "item": np.arange(10, 10 + n),
        "cond_cat": np.arange(20, 20 + n),
        "cond_ctx": np.arange(30, 30 + n),
        "ts": np.array([0, 1, 4, 4, 1000][:n] + list(range(2000, 2000 + n - 5))),
        "num_rating": np.arange(n, dtype=np.float32) / 10,
        "train_end": train_end,
        "valid_end": min(train_end + 1, n),
    }


def test_hand_example_layout():
    (seq,) = tokenize_train(hand_row(), META, max_seq_len=100)
    np.testing.assert_array_equal(seq.item, [0, 10, 0, 11, 0, 12])
    np.testing.assert_array_equal(seq.cond, [[20, 30], [0, 0], [21, 31], [0, 0], [22, 32], [0, 0]])
    np.testing.assert_array_equal(seq.token_type, [COND_TOKEN, ITEM_TOKEN] * 3)
    np.testing.assert_array_equal(seq.targets, [10, 0, 11, 0, 12, 0])
    np.testing.assert_array_equal(seq.positions, np.arange(6))
    # gaps 1 s -> floor(log2 2) + 1 = 2; 3 s -> floor(log2 4) + 1 = 3; first behaviour unknown
    np.testing.assert_array_equal(seq.time_gaps, [0, 0, 2, 2, 3, 3])
    np.testing.assert_allclose(seq.numeric[:, 0], [0, 0, 0.1, 0.1, 0.2, 0.2])
    assert seq.num_queries == 0 and seq.user_id == "alice"


def test_time_buckets_capped_and_disabled():
    ts = np.array([0, 0, 1, 2**40, 2**40 - 5])
    got = time_gap_buckets(ts, True)
    np.testing.assert_array_equal(got, [0, 1, 2, NUM_TIME_BUCKETS - 1, 1])  # negative gap clamps to 0 s
    assert not time_gap_buckets(ts, False).any()


def test_truncate_keeps_most_recent_whole_behaviours():
    row = hand_row(n=10, train_end=8)
    (seq,) = tokenize_train(row, META, max_seq_len=7)  # 3 whole behaviours
    np.testing.assert_array_equal(seq.item[1::2], [15, 16, 17])
    np.testing.assert_array_equal(seq.positions, np.arange(6))
    # time gap of the first kept behaviour comes from the full history, not "first"
    np.testing.assert_array_equal(seq.time_gaps[::2], time_gap_buckets(row["ts"], True)[5:8])


def test_windows_cover_training_behaviours_newest_ending_at_train_end():
    seqs = tokenize_train(hand_row(n=10, train_end=8), META, max_seq_len=6, long_sequences="window")
    assert [s.item[1::2].tolist() for s in seqs] == [[10, 11], [12, 13, 14], [15, 16, 17]]
    assert all(s.positions[0] == 0 for s in seqs)
    with pytest.raises(ValueError, match="long_sequences"):
        tokenize_train(hand_row(), META, 6, long_sequences="bogus")


def test_no_training_behaviours_no_sequence():
    assert tokenize_train(hand_row(n=2, train_end=0), META, 10) == []


def test_eval_query_generic_and_no_leakage():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        row = hand_row(n=n, train_end=n - 1)
        row["item"] = rng.integers(3, 1000, size=n)
        end, max_len = int(rng.integers(0, n)), int(rng.integers(1, 20))
        seq = tokenize_eval(row, META, max_len, end)
        assert len(seq) <= max_len and seq.num_queries == 1
        q = len(seq) - 1
        assert (seq.cond[q] == MASK_ID).all() and seq.item[q] == 0 and seq.token_type[q] == COND_TOKEN
        assert seq.targets[q] == row["item"][end] and seq.targets[:q][::2].tolist() == seq.item[1:q:2].tolist()
        assert seq.positions[q] == q and seq.time_gaps[q] == 0 and (seq.numeric[q] == 0).all()
        hist = seq.item[1:q:2].tolist()
        k = len(hist)
        assert hist == row["item"][end - k:end].tolist()  # exactly the most recent behaviours before end
        assert k == min(end, (max_len - 1) // 2)
        # the ranking excludes the whole history, also what max_seq_len cut off
        assert seq.seen_items.tolist() == sorted(set(row["item"][:end].tolist()))


def test_eval_target_out_of_range():
    with pytest.raises(ValueError, match="alice"):
        tokenize_eval(hand_row(n=5), META, 10, end=5)


def test_group_query_tokens_share_position():
    queries = np.array([[5, 6], [7, 8], [2, 2]])
    seq = tokenize_group_query(hand_row(n=5), META, max_seq_len=4, end=4, queries=queries)
    assert seq.num_queries == 3 and len(seq) == 4 + 3
    np.testing.assert_array_equal(seq.item[1:4:2], [12, 13])
    np.testing.assert_array_equal(seq.positions, [0, 1, 2, 3, 4, 4, 4])
    np.testing.assert_array_equal(seq.cond[4:], queries)
    assert not seq.targets[4:].any() and (seq.token_type[4:] == COND_TOKEN).all()
    with pytest.raises(ValueError, match="queries"):
        tokenize_group_query(hand_row(), META, 4, 4, np.zeros((2, 3)))


def test_cond_dropout_only_masks_whole_condition_tokens():
    row = hand_row(n=200, train_end=200)
    (seq,) = tokenize_train(row, META, 400)
    out = apply_cond_dropout(seq, 0.3, np.random.default_rng(0))
    masked = (out.cond == MASK_ID).all(axis=1)
    assert (out.cond[~masked] == seq.cond[~masked]).all()
    assert (seq.token_type[masked] == COND_TOKEN).all()
    # a dropped condition token is the generic query of evaluation: unknown time gap too
    assert (out.time_gaps[masked] == 0).all() and (out.time_gaps[~masked] == seq.time_gaps[~masked]).all()
    assert (seq.time_gaps[masked] > 0).any()
    assert (out.numeric[masked] == 0).all() and (out.numeric[~masked] == seq.numeric[~masked]).all()
    assert 0.2 < masked.sum() / 200 < 0.4
    assert (seq.cond != MASK_ID).any(axis=1).all()  # the input is not modified
    assert apply_cond_dropout(seq, 0.0, np.random.default_rng(0)) is seq


def test_eval_condition_query_is_the_held_out_behaviours_own_condition_token():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        row = hand_row(n=n, train_end=n - 1)
        end, max_len = int(rng.integers(1, n)), int(rng.integers(3, 40))
        extra = rng.integers(3, 9, size=(2, 2))
        plain = tokenize_eval(row, META, max_len, end)
        seq = tokenize_eval(row, META, max_len, end, extra_queries=extra, condition_query=True)
        q = len(plain) - 1  # the generic query's index; the history before it is unchanged
        assert seq.num_queries == 4 and len(seq) == len(plain) + 3
        for name in ("item", "cond", "token_type", "positions", "time_gaps", "targets", "numeric"):
            np.testing.assert_array_equal(getattr(seq, name)[: q + 1], getattr(plain, name), err_msg=name)
        # exactly the token training puts at behaviour `end` (all of its features), at the queries' position
        (full,) = tokenize_train({**row, "train_end": end + 1}, META, max_seq_len=2 * (end + 1))
        for name in ("item", "cond", "token_type", "time_gaps", "targets", "numeric"):
            np.testing.assert_array_equal(getattr(seq, name)[q + 1], getattr(full, name)[2 * end], err_msg=name)
        assert seq.positions[q + 1] == q and seq.targets[q + 1] == row["item"][end]
        np.testing.assert_array_equal(seq.cond[q + 2 :], extra)  # the extra queries follow, still generic in time
        assert (seq.time_gaps[q + 2 :] == 0).all() and (seq.numeric[q + 2 :] == 0).all()
