"""Optimizer recipe: which parameters are decayed, and the warmup + cosine schedule down to its floor."""

from __future__ import annotations

import math

import pytest

from lum_dist.config import ConfigError, LossConfig, OptimConfig
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


def test_width_base_scales_the_learning_rate_of_the_matrices_that_read_the_hidden_stream():
    """muP-style rule: lr x width_base / hidden_size on the blocks' matrices and the output head; the input
    projection (fan-in: the token features), the tables, norms and biases keep lr. Scale 1: the two plain
    decay groups, as without the option."""
    cfg = load_preset("lum-tiny", 50, [6, 4], hidden_size=128, intermediate_size=256)
    module = PretrainModule(LUMModel(cfg), InfoNCE(LossConfig(negatives="full"), 50))
    scale = OptimConfig(width_base=64).hidden_lr_scale(cfg.hidden_size)
    assert scale == 0.5 and OptimConfig().hidden_lr_scale(128) == 1.0
    groups = param_groups(module, 0.1, lr=2e-3, hidden_lr_scale=scale)
    lr_of = {n: g["lr"] for g in groups for n in _names(module, g)}
    assert lr_of.keys() == {n for n, _ in module.named_parameters()}
    for name, lr in lr_of.items():
        reads_hidden = name.endswith("weight") and any(k in name for k in (".qkv.", ".out.", ".gate_up.", ".down.",
                                                                           "model.head."))
        assert lr == pytest.approx(1e-3 if reads_hidden else 2e-3), name
    assert lr_of["model.tokens.proj.weight"] == 2e-3
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
    assert len(param_groups(module, 0.1, lr=2e-3)) == 2
    with pytest.raises(ConfigError, match="width_base"):
        OptimConfig(width_base=-1)
