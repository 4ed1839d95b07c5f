"""loss.view_contrast_weight: a second training pass with fresh dropout, its view contrasted with the first's."""

from __future__ import annotations

import torch

from lum_dist.config import LossConfig
from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.losses import InfoNCE, view_contrast
from lum_dist.model import LUMModel, load_preset
from lum_dist.testing.batches import random_packed_batch
from lum_dist.train.trainer import PretrainModule

NUM_ITEMS, SEQ_LENS = 40, [9, 6, 11]


def make_module(weight: float) -> PretrainModule:
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", NUM_ITEMS, [5], hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2,
                      feature_dropout=0.3, residual_dropout=0.3)
    loss_cfg = LossConfig(negatives="full", temperature=0.1, view_contrast_weight=weight, view_contrast_temperature=0.5)
    return PretrainModule(LUMModel(cfg), InfoNCE(loss_cfg, NUM_ITEMS))


def test_training_adds_the_contrast_of_two_dropout_views():
    module, batch = make_module(0.3).train(), random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)
    torch.manual_seed(7)
    loss, _ = module(batch)

    torch.manual_seed(7)  # the same dropout masks, drawn in the same order: first view, then second
    has_target = batch.targets >= NUM_SPECIAL_IDS
    first, second = (module.model.forward_batch(batch)[has_target] for _ in range(2))
    assert not torch.allclose(first, second)  # dropout made two different views
    main, _ = module.loss(first, batch.targets[has_target], module.model.item_embeddings)
    reference = main + 0.3 * view_contrast(first, second, batch.targets[has_target], 0.5)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in module.model.blocks.parameters())


def test_evaluation_makes_no_second_pass():
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)
    with_contrast, without = make_module(0.3).eval(), make_module(0.0).eval()
    torch.testing.assert_close(with_contrast(batch)[0], without(batch)[0], rtol=0, atol=0)
