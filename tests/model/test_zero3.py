"""The model and the loss under DeepSpeed ZeRO-3 on 2 CPU ranks: build, re-init, train steps, tied table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lum_dist import parallel
from lum_dist.config import LossConfig, PretrainConfig
from lum_dist.data.schema import NUM_SPECIAL_IDS, PAD_ID
from lum_dist.losses import InfoNCE
from lum_dist.model import MODELS, LUMModel, SASRecConfig, enable_activation_checkpointing, load_preset
from lum_dist.testing.batches import random_packed_batch
from lum_dist.testing.distributed import run_distributed
from lum_dist.train import checkpoint
from lum_dist.train.trainer import PretrainModule

NUM_ITEMS, VOCABS = 100, [9, 5]


def _train_zero3(negatives: str) -> dict:
    parallel.init_distributed()  # joins the existing gloo group
    torch.manual_seed(0)  # rank 0 draws the initial weights (build_model), every rank its random negatives
    cfg = PretrainConfig()
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.train.max_steps = 1, 1e-3, 6
    cfg.loss = (LossConfig(learnable_temperature=True, num_random_negatives=8) if negatives == "in_batch"  # logQ
                # the item table gathered whole; a second forward of the sharded model for the view contrast
                else LossConfig(learnable_temperature=True, negatives="full", view_contrast_weight=0.1))
    log_q = torch.log_softmax(torch.randn(NUM_ITEMS, generator=torch.Generator().manual_seed(0)), 0)
    # The full softmax also scores items with their attribute embeddings (extra tables and a buffer under ZeRO-3).
    # and (full) its neighbours' id rows, gathered from the same sharded table.
    full = negatives == "full"
    model_cfg = load_preset("lum-tiny", NUM_ITEMS, VOCABS, num_layers=2, item_attr_vocab_sizes=VOCABS[:1],
                            attribute_targets=full, item_neighbours=3 * full, neighbour_gate=full)
    item_attrs = torch.arange(NUM_ITEMS)[:, None] % VOCABS[0] if full else torch.zeros(NUM_ITEMS, 0)
    nbrs = (torch.arange(NUM_ITEMS)[:, None] + torch.arange(1, 4)) % NUM_ITEMS if full else torch.zeros(NUM_ITEMS, 0)
    nbrs[:NUM_SPECIAL_IDS] = PAD_ID  # as the dataset's: reserved ids have no neighbours

    def make_module() -> PretrainModule:
        model = LUMModel(model_cfg)
        model.set_item_attributes(item_attrs.long())
        model.set_item_neighbours(nbrs.long(), 2 ** (torch.arange(NUM_ITEMS) % 16) if full else None)
        return PretrainModule(model, InfoNCE(cfg.loss, NUM_ITEMS, log_q))

    ds = parallel.deepspeed_config(cfg)
    module = parallel.build_model(make_module, ds)
    enable_activation_checkpointing(module.model)
    engine = parallel.build_engine(module, cfg, ds, cfg.train.max_steps)
    batch = random_packed_batch([10, 20, 6], NUM_ITEMS, VOCABS, seed=dist.get_rank())
    losses = []
    for _ in range(cfg.train.max_steps):
        loss, stats = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    with torch.no_grad():
        table = module.model.item_embeddings(None)
    return {"losses": losses, "count": float(stats["count"]), "shape": tuple(table.shape),
            "pad_norm": float(table[0].abs().sum()), "temperature": float(stats["temperature"]),
            "attr_rows": sum(t.ds_numel if hasattr(t, "ds_numel") else t.numel()
                             for t in module.model.attr_targets.parameters())}


@pytest.mark.parametrize("negatives", ["in_batch", "full"])
def test_model_and_loss_train_under_zero3(monkeypatch, negatives):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ranks = run_distributed(_train_zero3, 2, negatives, timeout=240)
    for r in ranks:
        assert r["count"] == 2 * 18  # both ranks see the global target count
        assert r["shape"] == (NUM_ITEMS, 64) and r["pad_norm"] == 0.0
        assert r["losses"][-1] < r["losses"][0]  # the same batch every step: the loss falls
        assert r["temperature"] != 0.05  # the learnable temperature is a trained ZeRO-3 parameter
        assert r["attr_rows"] == (VOCABS[0] * 64 if negatives == "full" else 0)


def _weights(module) -> dict[str, torch.Tensor]:
    import deepspeed  # picks its accelerator when imported: inside the ranks, after DS_ACCELERATOR is set

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _best_weights_round_trip(root: str) -> dict:
    parallel.init_distributed()
    cfg = PretrainConfig()
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.train.max_steps = 1, 1e-2, 4
    cfg.loss = LossConfig(negatives="full")
    model_cfg = load_preset("lum-tiny", NUM_ITEMS, VOCABS, num_layers=2)
    ds = parallel.deepspeed_config(cfg)
    module = parallel.build_model(lambda: PretrainModule(LUMModel(model_cfg), InfoNCE(cfg.loss, NUM_ITEMS)), ds)
    engine = parallel.build_engine(module, cfg, ds, cfg.train.max_steps)
    batch = random_packed_batch([10, 20, 6], NUM_ITEMS, VOCABS, seed=dist.get_rank())

    def train_step() -> None:
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    train_step()
    saved = _weights(module)
    best = checkpoint.save(engine, Path(root), 1, {"step": 1}, {}, keep_last=0, best=True)
    train_step()
    train_step()
    moved = max(float((w - saved[n]).abs().max()) for n, w in _weights(module).items())
    checkpoint.load_weights(engine, best)
    back = max(float((w - saved[n]).abs().max()) for n, w in _weights(module).items())
    return {"moved": moved, "back": back}


def test_best_checkpoint_weights_load_back_under_zero3(monkeypatch, tmp_path):
    """The final evaluation restores the best checkpoint's weights alone (no optimizer state) into a ZeRO-3
    engine that trained on past it: DeepSpeed finds them through the checkpoint's ``latest`` file."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for r in run_distributed(_best_weights_round_trip, 2, str(tmp_path), timeout=240):
        assert r["moved"] > 1e-4 and r["back"] == 0.0


def _initial_weights(stage: int, kind: str) -> dict[str, torch.Tensor]:
    parallel.init_distributed()
    cfg = PretrainConfig()
    cfg.train.zero_stage = stage
    torch.manual_seed(0)
    config = (SASRecConfig(num_items=NUM_ITEMS, hidden_size=64, num_layers=2) if kind == "sasrec" else
              load_preset("lum-tiny", NUM_ITEMS, VOCABS, num_layers=2, previous_item_skip=True, item_neighbours=3,
                          neighbour_gate=True))  # the gate starts at 1
    loss = LossConfig(negatives="full", future_weight=0.5, future_head=kind == "lum")  # the loss module's own layer
    module = parallel.build_model(lambda: PretrainModule(MODELS[kind](config), InfoNCE(loss, NUM_ITEMS)),
                                  parallel.deepspeed_config(cfg))
    return _weights(module)


@pytest.mark.parametrize("kind", ["lum", "sasrec"])
def test_zero3_builds_the_model_initialised_as_without_it(monkeypatch, kind):
    """Under ZeRO-3 the layers are partitioned before the model's own init runs: build_model re-initialises them
    with their parameters gathered. Each parameter must come out as without ZeRO-3: the same constant where init
    writes one (norms, biases, PAD rows, the zero-initialised skip and future head), the same spread where it draws
    (within 15 %)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sharded = run_distributed(_initial_weights, 2, 3, kind, timeout=240)[0]
    whole = run_distributed(_initial_weights, 1, 0, kind, timeout=240)[0]
    assert sharded.keys() == whole.keys()
    for name, w in whole.items():
        if w.numel() < 64 or float(w.std()) == 0:
            torch.testing.assert_close(sharded[name], w, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert abs(float(sharded[name].std()) / float(w.std()) - 1) < 0.15, name
        if w.dim() == 2 and not w[0].any():  # a PAD row
            assert not sharded[name][0].any(), name


def test_initialisers_let_an_inner_model_claim_its_own_layers():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = LUMModel(load_preset("lum-tiny", NUM_ITEMS, VOCABS)), nn.Linear(4, 4)

        def _init_weights(self, module: nn.Module) -> None:
            nn.init.zeros_(module.weight)

    wrapper = Wrapper()
    owners = {id(m): fn for m, fn in parallel.initialisers(wrapper)}
    assert owners[id(wrapper.head)] == wrapper._init_weights
    assert owners[id(wrapper.model.tokens.item_emb)] == wrapper.model._init_weights
    assert len(owners) == sum(1 for m in wrapper.modules() if next(m.parameters(recurse=False), None) is not None)
