"""The auxiliary targets, against per-sequence loops: loss.item_token_weight (every item token also predicts the
next behaviour's item) and loss.future_weight (every condition token also predicts an item further ahead)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lum_dist.config import ConfigError, LossConfig, PretrainConfig
from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN
from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.losses import InfoNCE
from lum_dist.model import LUMModel, load_preset
from lum_dist.testing.batches import random_packed_batch
from lum_dist.train.trainer import PretrainModule, future_targets, item_token_targets, pretrain

NUM_ITEMS, SEQ_LENS = 40, [9, 1, 6, 2, 11]  # odd and even lengths, a lone condition token, a single behaviour


def _full_softmax_ce(user: torch.Tensor, items: torch.Tensor, target: int, temperature: float,
                     excluded: frozenset[int] = frozenset()) -> torch.Tensor:
    logits = F.normalize(user, dim=-1) @ F.normalize(items[NUM_SPECIAL_IDS:], dim=-1).T / temperature
    drop = torch.tensor([i in excluded for i in range(NUM_SPECIAL_IDS, len(items))])
    return F.cross_entropy(logits.masked_fill(drop, float("-inf"))[None], torch.tensor([target - NUM_SPECIAL_IDS]))


def test_item_token_targets_pair_each_item_with_the_next_behaviour_of_its_sequence():
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=1)
    has_target = batch.targets >= NUM_SPECIAL_IDS
    source, target = item_token_targets(batch, has_target)
    expected = []  # (item token, next condition token) by walking each sequence
    for s in range(len(SEQ_LENS)):
        lo, hi = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        expected += [(t, t + 1) for t in range(lo, hi - 1)
                     if batch.token_type[t] == ITEM_TOKEN and has_target[t + 1]]
    assert list(zip(source.tolist(), target.tolist(), strict=True)) == expected
    assert len(expected) == 3 + 0 + 2 + 0 + 4  # complete behaviours after the first of each sequence
    assert (batch.token_type[target] == COND_TOKEN).all()


@pytest.mark.parametrize("weight,exclude_seen", [(0.0, False), (0.5, False), (0.5, True)])
def test_item_token_loss_matches_a_per_sequence_reference(weight, exclude_seen):
    """Also ``loss.exclude_seen``: the items of a sequence before a target, but the target, are no candidates."""
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", NUM_ITEMS, [5], hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2)
    loss_cfg = LossConfig(negatives="full", temperature=0.1, item_token_weight=weight, exclude_seen=exclude_seen)
    module = PretrainModule(LUMModel(cfg).eval(), InfoNCE(loss_cfg, NUM_ITEMS))
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)
    loss, _ = module(batch)

    out, items = module.model.forward_batch(batch), module.model.item_embeddings(None)
    condition, item = [], []
    for t in range(batch.num_tokens):
        target = int(batch.targets[t])
        if target < NUM_SPECIAL_IDS:
            continue
        start = t - int(batch.positions[t])
        seen = frozenset(batch.item_ids[start:t].tolist()) - {target} if exclude_seen else frozenset()
        condition.append(_full_softmax_ce(out[t], items, target, 0.1, seen))
        if batch.positions[t] > 0:  # the previous token is the item of the same user's previous behaviour
            item.append(_full_softmax_ce(out[t - 1], items, target, 0.1, seen))
    reference = torch.stack(condition).mean() + weight * torch.stack(item).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("offset", [1, 2])
def test_future_targets_pair_each_condition_token_with_one_offset_behaviours_later(offset):
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=1)
    has_target = batch.targets >= NUM_SPECIAL_IDS
    has_target[int(batch.cu_seqlens[4]) + 4] = False  # a behaviour without a target is neither source nor target
    source, target = future_targets(batch, has_target, offset)
    expected = []
    for s in range(len(SEQ_LENS)):
        lo, hi = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        expected += [(t, t + 2 * offset) for t in range(lo, hi - 2 * offset) if has_target[t] and has_target[t + 2 * offset]]
    assert list(zip(source.tolist(), target.tolist(), strict=True)) == expected
    assert len(expected) == {1: 3 + 0 + 2 + 0 + 2, 2: 2 + 0 + 1 + 0 + 1}[offset]
    assert (batch.token_type[source] == COND_TOKEN).all() and (batch.token_type[target] == COND_TOKEN).all()


@pytest.mark.parametrize("weight,offset,exclude_seen", [(0.0, 1, False), (0.5, 1, False), (0.5, 2, True)])
def test_future_loss_matches_a_per_sequence_reference(weight, offset, exclude_seen):
    """With ``loss.exclude_seen`` the items before the future target (the nearer next ones too), but the target, are
    no candidates for it."""
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", NUM_ITEMS, [5], hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2)
    loss_cfg = LossConfig(negatives="full", temperature=0.1, future_weight=weight, future_offset=offset,
                          exclude_seen=exclude_seen)
    module = PretrainModule(LUMModel(cfg).eval(), InfoNCE(loss_cfg, NUM_ITEMS))
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)
    loss, _ = module(batch)

    out, items = module.model.forward_batch(batch), module.model.item_embeddings(None)

    def seen_before(t: int) -> frozenset[int]:
        start = t - int(batch.positions[t])
        return frozenset(batch.item_ids[start:t].tolist()) - {int(batch.targets[t])} if exclude_seen else frozenset()

    own, future = [], []
    for t in range(batch.num_tokens):
        if batch.targets[t] < NUM_SPECIAL_IDS:
            continue
        own.append(_full_softmax_ce(out[t], items, int(batch.targets[t]), 0.1, seen_before(t)))
        ahead = t + 2 * offset
        if ahead < batch.num_tokens and batch.positions[ahead] == batch.positions[t] + 2 * offset \
                and batch.targets[ahead] >= NUM_SPECIAL_IDS:
            future.append(_full_softmax_ce(out[t], items, int(batch.targets[ahead]), 0.1, seen_before(ahead)))
    reference = torch.stack(own).mean() + weight * torch.stack(future).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reads_skip", [True, False])
def test_future_target_trains_the_previous_item_skip_only_when_it_reads_it(reads_skip):
    """``loss.future_reads_skip=False``: the future target scores the output without the skip's share, so the
    skip's gradient is the next-item loss's alone, while the rest of the model still learns from the future."""
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", NUM_ITEMS, [5], hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2,
                      previous_item_skip=True)
    model = LUMModel(cfg).eval()
    torch.nn.init.normal_(model.previous_item_skip.weight, std=0.3)  # zero at init: give it a say
    batch = random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)

    def grads(future_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss_cfg = LossConfig(negatives="full", temperature=0.1, future_weight=future_weight,
                              future_reads_skip=reads_skip)
        model.zero_grad()
        PretrainModule(model, InfoNCE(loss_cfg, NUM_ITEMS))(batch)[0].backward()
        return model.previous_item_skip.weight.grad.clone(), model.head.weight.grad.clone()

    (skip_next, head_next), (skip_both, head_both) = grads(0.0), grads(0.5)
    assert not torch.allclose(head_both, head_next, rtol=1e-3, atol=0)  # the future target trains the backbone
    if reads_skip:
        assert not torch.allclose(skip_both, skip_next, rtol=1e-3, atol=0)
    else:
        torch.testing.assert_close(skip_both, skip_next, rtol=1e-5, atol=1e-8)


def test_future_head_starts_as_the_output_and_scores_out_plus_its_map():
    """``loss.future_head``: the future target scores ``out + H out`` (H zero at init, so training starts as
    without it); the next-item target still scores ``out``."""
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", NUM_ITEMS, [5], hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2)
    model, batch = LUMModel(cfg).eval(), random_packed_batch(SEQ_LENS, NUM_ITEMS, [5], seed=2)
    plain = PretrainModule(model, InfoNCE(LossConfig(negatives="full", future_weight=0.5), NUM_ITEMS))
    headed = PretrainModule(model, InfoNCE(LossConfig(negatives="full", future_weight=0.5, future_head=True),
                                           NUM_ITEMS))
    assert not headed.future_head.weight.any()
    torch.testing.assert_close(headed(batch)[0], plain(batch)[0], rtol=0, atol=0)

    torch.nn.init.normal_(headed.future_head.weight, std=0.3)
    out, items = model.forward_batch(batch), model.item_embeddings(None)
    has_target = batch.targets >= NUM_SPECIAL_IDS
    future_source, future_target = future_targets(batch, has_target, 1)
    own = torch.stack([_full_softmax_ce(out[t], items, int(batch.targets[t]), 0.05)
                       for t in has_target.nonzero().squeeze(1).tolist()]).mean()
    moved = out + out @ headed.future_head.weight.T
    future = torch.stack([_full_softmax_ce(moved[s], items, int(batch.targets[t]), 0.05)
                          for s, t in zip(future_source.tolist(), future_target.tolist(), strict=True)]).mean()
    torch.testing.assert_close(headed(batch)[0], own + 0.5 * future, rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="future_head"):
        LossConfig(future_head=True)


@pytest.mark.parametrize("key,message", [("item_token_weight", "SASRec already predicts"),
                                         ("future_weight", "LUM's condition tokens only")])
def test_pretrain_refuses_an_auxiliary_loss_for_sasrec_before_reading_data(tmp_path, key, message):
    cfg = PretrainConfig()
    cfg.data.path, cfg.model.preset = str(tmp_path / "no-data-here"), "sasrec"
    setattr(cfg.loss, key, 0.5)
    with pytest.raises(ConfigError, match=f"loss.{key}: {message}") as err:
        pretrain(cfg)
    assert err.value.key == f"loss.{key}" and not (tmp_path / "no-data-here").exists()


def test_item_token_weight_must_not_be_negative():
    with pytest.raises(ConfigError, match="item_token_weight"):
        LossConfig(item_token_weight=-0.1)


@pytest.mark.parametrize("kwargs,key", [({"future_weight": -0.1}, "future_weight"), ({"future_offset": 0}, "future_offset")])
def test_future_loss_options_are_checked(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LossConfig(**kwargs)
