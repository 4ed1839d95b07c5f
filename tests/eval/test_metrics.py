"""Metrics against hand-computed cases, plain loop references and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.eval.metrics import (
    RankingAccumulator,
    attribute_query_scores,
    auc,
    gauc,
    log_loss,
    ndcg_at_k,
    rank_of_targets,
    recall_at_k,
    segment_logsumexp,
)


def rank_reference(scores: torch.Tensor, targets: torch.Tensor, exclude: list[torch.Tensor]) -> torch.Tensor:
    """One query at a time: stable descending sort of the candidates, position of the target."""
    b, n = scores.shape
    out = []
    for i in range(b):
        t = int(targets[i])
        if t < NUM_SPECIAL_IDS or t >= n or math.isnan(float(scores[i, t])):
            out.append(n)
            continue
        banned = set(exclude[i].tolist())
        if t in banned:  # a target the user already had is no candidate: a miss
            out.append(n)
            continue
        cands = [j for j in range(NUM_SPECIAL_IDS, n) if j not in banned]
        order = sorted(cands, key=lambda j: (-float(scores[i, j]), j))
        out.append(order.index(t))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(3))
def test_segment_logsumexp_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 30, generator=g) * 5
    x[0, :7] = -math.inf
    segment = torch.randint(0, 6, (30,), generator=g)
    segment[segment == 4] = 5  # segment 4 is empty
    got = segment_logsumexp(x, segment, 6)
    for v in range(6):
        want = torch.logsumexp(x[:, segment == v], 1) if (segment == v).any() else torch.full((4,), -math.inf)
        torch.testing.assert_close(got[:, v], want, rtol=1e-6, atol=1e-6)


def test_attribute_query_scores_weight_zero_is_the_generic_ranking_and_no_query_keeps_it():
    g = torch.Generator().manual_seed(0)
    generic, own = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    generic[:, :NUM_SPECIAL_IDS] = -math.inf
    attr = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1, 2, -1, 2, 0])
    torch.testing.assert_close(attribute_query_scores(generic, own, attr, 0.0)[:, NUM_SPECIAL_IDS:],
                               generic.log_softmax(1)[:, NUM_SPECIAL_IDS:], rtol=1e-6, atol=1e-6)
    full = attribute_query_scores(generic, own, attr, 1.0)
    assert torch.isneginf(full[:, :NUM_SPECIAL_IDS]).all()
    # Item 9 has no query: within the "no query" group its share is the generic one.
    log_p = generic.log_softmax(1)
    torch.testing.assert_close(full[:, 9], log_p[:, 9], rtol=1e-6, atol=1e-6)
    # Weight 1: the value's probability (generic) times the item's share under its own value's query.
    members = attr == 1
    want = torch.logsumexp(log_p[:, members], 1, keepdim=True) + own[:, members].log_softmax(1)
    torch.testing.assert_close(full[:, members], want, rtol=1e-6, atol=1e-6)


def test_rank_hand_case():
    scores = torch.tensor([[9.0, 9.0, 9.0, 0.1, 0.5, 0.9, 0.3],
                           [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]])
    targets = torch.tensor([3, 5])
    # row 0: candidates 3..6 minus {5}; 0.5 (id 4) > 0.3 (id 6) > 0.1 (target) -> rank 2; specials ignored
    # row 1: ties broken by id: 3 and 4 come before 5 -> rank 2
    ranks = rank_of_targets(scores, targets, [torch.tensor([5]), torch.tensor([6])])
    assert ranks.tolist() == [2, 2]


def test_rank_excluded_target_is_a_miss():
    # A scorer that puts every item of the user's history on top: were the excluded target still a candidate,
    # it would be the only history item left and rank first for free (the label leaking through the exclusion).
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.8, 0.1, 0.2],
                           [0.0, 0.0, 0.0, 0.9, 0.8, 0.1, 0.2]])
    history = [torch.tensor([3, 4]), torch.tensor([3, 4])]
    ranks = rank_of_targets(scores, torch.tensor([4, 6]), history)
    assert ranks.tolist() == [7, 0]  # row 0 repeats item 4: a miss; row 1's new item 6 ranks first


def test_rank_misses():
    scores = torch.randn(3, 10)
    scores[2, 7] = float("nan")
    ranks = rank_of_targets(scores, torch.tensor([0, 2, 7]), [torch.tensor([], dtype=torch.long)] * 3)
    assert ranks.tolist() == [10, 10, 10]


@pytest.mark.parametrize("seed", range(5))
def test_rank_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 16, 40
    # rounded scores produce many ties
    scores = torch.round(torch.randn(b, n, generator=g) * 2) / 2
    targets = torch.randint(0, n, (b,), generator=g)
    exclude = [torch.randint(0, n, (int(torch.randint(0, 10, (1,), generator=g)),), generator=g) for _ in range(b)]
    torch.testing.assert_close(rank_of_targets(scores, targets, exclude), rank_reference(scores, targets, exclude))


def test_rank_rejects_bad_exclude():
    with pytest.raises(ValueError, match=r"exclude\[1\]"):
        rank_of_targets(torch.zeros(2, 5), torch.tensor([3, 4]), [torch.tensor([3]), torch.tensor([9])])
    with pytest.raises(ValueError, match="batch size"):
        rank_of_targets(torch.zeros(2, 5), torch.tensor([3]), [torch.tensor([3])])


def test_accumulator_hand_case():
    acc = RankingAccumulator([1, 3])
    acc.update(torch.tensor([0, 2])).update(torch.tensor([5]))
    out = acc.compute()
    assert out["count"] == 3
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["hr@3"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)
    assert out["ndcg@1"] == pytest.approx(1 / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6) / 3)
    assert recall_at_k(torch.tensor([0, 2, 5]), 3) == pytest.approx(out["hr@3"])
    assert ndcg_at_k(torch.tensor([0, 2, 5]), 3) == pytest.approx(out["ndcg@3"])


def test_accumulator_empty_and_no_dist():
    acc = RankingAccumulator([10])
    out = acc.all_reduce().compute()
    assert out["count"] == 0 and math.isnan(out["hr@10"])
    with pytest.raises(ValueError):
        RankingAccumulator([0])


def _all_reduce_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    acc = RankingAccumulator([2])
    if rank == 0:
        acc.update(torch.tensor([0, 1, 4]))  # rank 1 sees no query at all
    q.put((rank, acc.all_reduce().compute()))
    dist.destroy_process_group()


def test_accumulator_all_reduce_gloo():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for r in range(2):
        assert results[r]["count"] == 3 and results[r]["hr@2"] == pytest.approx(2 / 3)


def test_auc_hand_case_with_ties():
    # pairs (pos, neg): (0.8,0.3)=1 (0.8,0.5)=1 (0.5,0.3)=1 (0.5,0.5)=0.5 -> 3.5 / 4
    assert auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.3]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="positive and one negative"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="sample 1 has label 2"):
        auc([1, 2], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y * 0.5, 1)  # ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    users = rng.choice(np.array(["a", "b", "c", "d", "e", "f"]), 300)
    y = rng.integers(0, 2, 300)
    y[users == "f"] = 1  # one-class user: skipped
    s = np.round(rng.normal(size=300) + y * 0.3, 1)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if len(np.unique(y[m])) == 2:
            num += roc_auc_score(y[m], s[m]) * m.sum()
            den += m.sum()
    assert gauc(users, y, s) == pytest.approx(num / den, abs=1e-12)


def test_gauc_hand_case():
    # user 1: AUC 1 over 2 impressions; user 2: AUC 0 over 3 impressions; user 3: one class, skipped
    value = gauc([1, 1, 2, 2, 2, 3], [1, 0, 0, 1, 1, 1], [0.9, 0.1, 0.9, 0.2, 0.3, 0.5])
    assert value == pytest.approx((1.0 * 2 + 0.0 * 3) / 5)


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = rng.uniform(0.01, 0.99, 200)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)
    assert log_loss([1, 0], [1.0, 0.0]) < 1e-6  # clipped, finite
