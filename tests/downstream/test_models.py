"""Downstream model pieces: DIN ignores padding, the in-batch softmax loss against a per-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from lum_dist.downstream.config import RankingConfig, RetrievalConfig
from lum_dist.downstream.ranking import DIN, DINSpec
from lum_dist.downstream.retrieval import TwoTower, in_batch_softmax_loss, target_log_freq
from lum_dist.downstream.train import fit, holdout_loss, make_accelerator, split_holdout


@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_din_ignores_padding(activation):
    torch.manual_seed(0)
    model = DIN(DINSpec(num_items=30, num_attrs=6, lum_dim=4, num_match=2), RankingConfig(activation=activation))
    model.train()
    model(_din_batch(torch.randint(3, 30, (16, 5)), 16))  # batch statistics for Dice's running stats
    model.eval()
    hist = torch.tensor([[0, 0, 7, 9], [0, 4, 5, 6]])
    short = {k: v for k, v in _din_batch(hist[:, 1:], 2, seed=1).items()}
    long = dict(short, hist_items=hist, hist_attrs=torch.cat([torch.zeros(2, 1, dtype=torch.long),
                                                              short["hist_attrs"]], 1))
    long["hist_attrs"][hist == 0] = 0
    short["hist_attrs"] = long["hist_attrs"][:, 1:]
    with torch.no_grad():
        torch.testing.assert_close(model(long), model(short), rtol=1e-5, atol=1e-6)
        assert model(long).shape == (2,)


def _din_batch(hist: torch.Tensor, b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hist_items": hist, "hist_attrs": torch.randint(3, 6, hist.shape, generator=g) * (hist != 0),
            "cand": torch.randint(3, 30, (b,), generator=g), "cand_attr": torch.randint(3, 6, (b,), generator=g),
            "lum_direct": torch.randn(b, 4, generator=g), "lum_match": torch.randn(b, 2, generator=g)}


def test_in_batch_softmax_matches_reference():
    torch.manual_seed(0)
    cfg = RetrievalConfig(temperature=0.1)
    model = TwoTower(num_users=10, num_items=20, num_attrs=5, lum_dim=0, cfg=cfg)
    b = {"user_idx": torch.arange(6), "hist_items": torch.randint(0, 20, (6, 4)),
         "hist_attrs": torch.randint(0, 5, (6, 4)), "target": torch.tensor([5, 6, 5, 7, 8, 6]),
         "target_attr": torch.randint(3, 5, (6,))}
    loss = in_batch_softmax_loss(model, b, cfg.temperature)
    users, items = model.encode_users(b), model.encode_items(b["target"], b["target_attr"])
    ref = 0.0
    for i in range(6):  # negatives: in-batch items other than the positive's item id
        negs = [j for j in range(6) if b["target"][j] != b["target"][i]]
        logits = torch.stack([users[i] @ items[j] for j in [i, *negs]]) / cfg.temperature
        ref += -(logits[0] - torch.logsumexp(logits, 0)).item()
    assert loss.item() == pytest.approx(ref / 6, rel=1e-5)
    assert math.isfinite(loss.item())
    # logQ: each candidate column j is shifted by -log q(item_j)
    log_q = target_log_freq(b["target"], 20)
    corrected = in_batch_softmax_loss(model, b, cfg.temperature, log_q)
    ref = 0.0
    for i in range(6):
        cols = [i, *[j for j in range(6) if b["target"][j] != b["target"][i]]]
        logits = torch.stack([users[i] @ items[j] / cfg.temperature - log_q[b["target"][j]] for j in cols])
        ref += -(logits[0] - torch.logsumexp(logits, 0)).item()
    assert corrected.item() == pytest.approx(ref / 6, rel=1e-5)
    assert log_q[5] > log_q[7] > log_q[0]  # 5 is a target twice, 7 once, 0 never


def test_fit_early_stops_and_restores_the_best_epoch():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    train = {"x": x, "label": (x[:, 0] > 0).float()}
    holdout = {"x": x[:32], "label": (x[:32, 0] <= 0).float()}  # the opposite rule: gets worse as training works
    model = torch.nn.Linear(3, 1)

    def loss_fn(m, b):
        return torch.nn.functional.binary_cross_entropy_with_logits(m(b["x"]).squeeze(-1), b["label"])

    result = fit(model, train, loss_fn, epochs=20, batch_size=16, lr=0.1, weight_decay=0.0, seed=0,
                 accelerator=make_accelerator(), holdout=holdout, patience=2)
    assert result.best_epoch == 1 and len(result.train_loss) == 3 == len(result.holdout_loss)
    assert result.holdout_loss[2] > result.holdout_loss[1] > result.holdout_loss[0]
    assert holdout_loss(model, holdout, loss_fn, 16, torch.device("cpu")) == pytest.approx(result.holdout_loss[0])


def test_split_holdout_keeps_groups_together():
    group = torch.arange(50).repeat_interleave(5)
    data = {"group": group, "v": torch.arange(250)}
    train, held = split_holdout(data, group, 0.1, seed=0)
    assert len(torch.unique(held["group"])) == 5 and len(held["v"]) == 25 and len(train["v"]) == 225
    assert not set(held["group"].tolist()) & set(train["group"].tolist())
    assert split_holdout(data, group, 0.0, seed=0) == (data, None)
