"""Downstream samples: counts, negatives never interacted with, no leakage of later behaviours or outputs."""

from __future__ import annotations

import numpy as np
import pytest

from lum_dist.data.schema import NUM_SPECIAL_IDS, PAD_ID
from lum_dist.downstream.lum_features import open_query_dir, user_outputs
from lum_dist.downstream.run import lum_for_ctr
from lum_dist.downstream.samples import build_requests, ctr_samples, load_dataset, sample_negatives

from .conftest import write_fake_query_dir

N = 8


def test_requests_cut_history_at_the_target(tiny):
    data = load_dataset(tiny)
    rows = data.users.to_pylist()
    for split, end_col in (("train", "train_end"), ("eval", "valid_end")):
        req = build_requests(data, split, N)
        assert len(req.target) > 0
        for r, u in enumerate(req.user_idx):
            row = rows[u]
            end = row[end_col]
            assert req.target[r] == row["item"][end]
            recent = row["item"][max(0, end - N):end]  # nothing at or after the target's position
            assert req.hist_items[r][N - len(recent):].tolist() == recent
            assert (req.hist_items[r][:N - len(recent)] == PAD_ID).all()
            assert req.hist_attrs[r][N - len(recent):].tolist() == row["cond_category"][max(0, end - N):end]
            assert req.history[r].tolist() == row["item"][:end]


def test_request_counts(tiny):
    data = load_dataset(tiny)
    rows = data.users.to_pylist()
    expect_train = sum(r["train_end"] < r["valid_end"] and r["item"][r["train_end"]] >= NUM_SPECIAL_IDS for r in rows)
    expect_eval = sum(r["valid_end"] < len(r["item"]) and r["item"][r["valid_end"]] >= NUM_SPECIAL_IDS for r in rows)
    train, evaluation = build_requests(data, "train", N), build_requests(data, "eval", N)
    assert len(train.target) == expect_train and len(evaluation.target) == expect_eval
    assert train.dropped_unk + evaluation.dropped_unk == 2 * len(rows) - expect_train - expect_eval


def test_negatives_never_interacted_and_train_never_sees_test_targets(tiny):
    data = load_dataset(tiny)
    rows = data.users.to_pylist()
    for split in ("train", "eval"):
        req = build_requests(data, split, N)
        s = ctr_samples(req, data.num_items, 4, seed=0)
        assert len(s.label) == 5 * len(req.target) and s.label.sum() == len(req.target)
        assert (s.cand[s.label == 1] == req.target).all()
        for r, u in enumerate(req.user_idx):
            negs = s.cand[(s.request == r) & (s.label == 0)]
            assert len(set(negs.tolist())) == 4 and (negs >= NUM_SPECIAL_IDS).all()
            limit = rows[u]["valid_end"] + 1 if split == "train" else len(rows[u]["item"])
            assert not set(negs.tolist()) & set(rows[u]["item"][:limit])
            if split == "train":  # no training candidate or history item is the user's test target
                test_item = rows[u]["item"][rows[u]["valid_end"]] if rows[u]["valid_end"] < len(rows[u]["item"]) else -1
                assert test_item not in negs.tolist()
        # seeded: same draw twice
        assert (ctr_samples(req, data.num_items, 4, seed=0).cand == s.cand).all()


def test_sample_negatives_is_uniform_and_exhaustive():
    rng = np.random.default_rng(0)
    interacted = np.array([3, 4, 5])
    draws = np.concatenate([sample_negatives(rng, 13, interacted, 2) for _ in range(3000)])
    counts = np.bincount(draws, minlength=13)[6:]
    assert counts.sum() == 6000 and np.abs(counts / 6000 - 1 / 7).max() < 0.02
    assert sorted(sample_negatives(rng, 13, interacted, 7).tolist()) == list(range(6, 13))
    with pytest.raises(ValueError, match="only 7 items"):
        sample_negatives(rng, 13, interacted, 8)


def test_lum_features_come_from_the_matching_history(tiny, tmp_path):
    data = load_dataset(tiny)
    qv = write_fake_query_dir(tmp_path / "qv", tiny, "valid", fill=1.0)
    qt = write_fake_query_dir(tmp_path / "qt", tiny, "test", fill=-1.0)
    train_req, eval_req = build_requests(data, "train", N), build_requests(data, "eval", N)
    train = lum_for_ctr(data, train_req, ctr_samples(train_req, data.num_items, 4, 0), str(qv), "valid", 0)
    evaluation = lum_for_ctr(data, eval_req, ctr_samples(eval_req, data.num_items, 4, 0), str(qt), "test", 0)
    assert (train.conditional == 1).all() and (train.generic == 1).all()
    assert (evaluation.conditional == -1).all() and (evaluation.generic == -1).all()
    with pytest.raises(ValueError, match="split is 'test', this use needs 'valid'"):
        lum_for_ctr(data, train_req, ctr_samples(train_req, data.num_items, 4, 0), str(qt), "valid", 0)


def test_conditional_output_per_candidate_with_generic_fallback(tiny, tmp_path):
    data = load_dataset(tiny)
    q = write_fake_query_dir(tmp_path / "q", tiny, "test", seed=1)
    import pyarrow.parquet as pq

    table = pq.read_table(q / "part-00000.parquet").to_pylist()
    by_key = {(r["user_id"], r["condition"]): np.array(r["embedding"], np.float32) for r in table}
    req = build_requests(data, "eval", N)
    s = ctr_samples(req, data.num_items, 4, 0)
    lum = lum_for_ctr(data, req, s, str(q), "test", 0)
    for i in range(len(s.cand)):
        user, attr = req.user_id[s.request[i]], data.item_attr[s.cand[i]]
        cond = f"category={data.attr_raw[attr]}" if attr >= NUM_SPECIAL_IDS else "*"
        np.testing.assert_array_equal(lum.conditional[i], by_key.get((user, cond), by_key[(user, "*")]))
        np.testing.assert_array_equal(lum.generic[i], by_key[(user, "*")])
    has_cond = [data.item_attr[c] >= NUM_SPECIAL_IDS for c in s.cand]
    assert 0 < lum.coverage == pytest.approx(np.mean(has_cond))
    outputs = user_outputs(q, open_query_dir(q, "test", data.meta.name), req.user_id, req.position, data.item_raw)
    assert (outputs.item[:NUM_SPECIAL_IDS] == 0).all() and (np.abs(outputs.item[NUM_SPECIAL_IDS:]).sum(1) > 0).all()


def test_bad_embedding_names_file_row_and_field(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = load_dataset(tiny)
    q = write_fake_query_dir(tmp_path / "q", tiny, "test")
    part = pq.read_table(q / "part-00000.parquet")
    emb = part.column("embedding").to_pylist()
    emb[0] = emb[0][:3]  # u0, condition "*"
    pq.write_table(part.set_column(part.column_names.index("embedding"), "embedding", pa.array(emb, pa.list_(pa.float32()))), q / "part-00000.parquet")
    req = build_requests(data, "eval", N)
    user = part.column("user_id")[0].as_py()
    with pytest.raises(ValueError, match=r"part-00000.parquet: row 0, field 'embedding': 3 values, expected 8"):
        user_outputs(q, open_query_dir(q, "test", data.meta.name), [user] * 2 + req.user_id,
                     np.concatenate([[10**6] * 2, req.position]), data.item_raw)


def test_several_training_requests_per_user_each_cut_at_its_target(tiny):
    data = load_dataset(tiny)
    rows = data.users.to_pylist()
    req = build_requests(data, "train", N, per_user=3)
    one = build_requests(data, "train", N)
    assert len(one.target) < len(req.target) <= 3 * len(one.target)
    for r, u in enumerate(req.user_idx):
        row, t = rows[u], int(req.position[r])
        assert row["train_end"] - 3 < t <= row["train_end"] and t >= 1
        assert req.target[r] == row["item"][t] and req.history[r].tolist() == row["item"][:t]
        assert req.interacted[r].tolist() == row["item"][: row["valid_end"] + 1]  # no negative the user had later


def test_training_outputs_must_predate_every_training_request(tiny, tmp_path):
    """query_valid with too little lag (its history covers the earliest training requests) is refused, and a
    directory whose history_len column says an output has seen its request's behaviour is a leak error."""
    data = load_dataset(tiny)
    req = build_requests(data, "train", N, per_user=3)
    s = ctr_samples(req, data.num_items, 4, 0)
    fresh = write_fake_query_dir(tmp_path / "fresh", tiny, "valid", lag=0)
    with pytest.raises(ValueError, match="lag is 0"):
        lum_for_ctr(data, req, s, str(fresh), "valid", 2)
    lagged = write_fake_query_dir(tmp_path / "lagged", tiny, "valid", lag=2)
    lum = lum_for_ctr(data, req, s, str(lagged), "valid", 2)
    assert lum.generic.shape == (len(s.cand), 8)
    lying = write_fake_query_dir(tmp_path / "lying", tiny, "valid", lag=2, history_len=10**6)
    with pytest.raises(ValueError, match="field 'history_len'.*a leak"):
        lum_for_ctr(data, req, s, str(lying), "valid", 2)
