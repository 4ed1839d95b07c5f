"""Optimizer recipe: which parameters are decayed, and the warmup + cosine schedule down to its floor."""

from __future__ import annotations

import math

import pytest

from lum_dist.config import LossConfig
from lum_dist.losses import InfoNCE
from lum_dist.model import LUMModel, SASRecModel, load_preset
from lum_dist.parallel import lr_lambda, param_groups
from lum_dist.train.trainer import PretrainModule


def _names(module, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("arch", ["lum", "sasrec"])
def test_only_weight_matrices_are_decayed(arch):
    cfg = load_preset("lum-tiny" if arch == "lum" else "sasrec", 50, [6, 4])
    model = LUMModel(cfg) if arch == "lum" else SASRecModel(cfg)
    module = PretrainModule(model, InfoNCE(LossConfig(negatives="full", learnable_temperature=True), 50))
    decay, no_decay = (_names(module, g) for g in param_groups(module, 0.1))
    assert decay and no_decay and not decay & no_decay
    assert decay | no_decay == {n for n, _ in module.named_parameters()}
    assert "loss.log_temperature" in no_decay
    for name, p in module.named_parameters():
        is_table = name.endswith(("_emb.weight", "time_emb.weight")) or ".cond_embs." in name
        assert (name in decay) == (p.ndim >= 2 and not is_table), name
    with_tables = _names(module, param_groups(module, 0.1, decay_embeddings=True)[0])
    assert "model.item_emb.weight" in with_tables or "model.tokens.item_emb.weight" in with_tables


def test_schedule_warms_up_then_decays_to_the_floor():
    warmup, total, floor = 10, 110, 0.1
    assert lr_lambda(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_lambda(9, warmup, total, floor) == pytest.approx(1.0)
    assert lr_lambda(60, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_lambda(110, warmup, total, floor) == pytest.approx(floor)
    assert lr_lambda(500, warmup, total, floor) == pytest.approx(floor)  # past the horizon: stays at the floor
    assert lr_lambda(50, warmup, total, 1.0) == pytest.approx(1.0)  # floor 1: constant after warmup
