"""SASRec: the published block structure (a plain per-sequence reference), packing exactness, and how its
states line up with LUM's condition tokens (targets, evaluation queries)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lum_dist.data.batch import ITEM_TOKEN
from lum_dist.model import SASRecConfig, SASRecModel, build_model, load_preset
from lum_dist.testing.batches import random_packed_batch

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, summation order only
NUM_ITEMS, VOCABS = 40, [7, 5]


def tiny(**overrides) -> SASRecModel:
    torch.manual_seed(0)
    cfg = SASRecConfig(**{"hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_items": NUM_ITEMS,
                          "max_position": 30, "dropout": 0.0, **overrides})
    return SASRecModel(cfg).eval()


def reference_states(model: SASRecModel, items: torch.Tensor) -> torch.Tensor:
    """One sequence of item ids -> [n, d], written as the original (Kang & McAuley; pmixer/SASRec.pytorch):
    scaled embedding + positions; per block Q = LN(x), x = Q + MHA(Q, x, x) causal, x = LN(x), x = x + FFN(x);
    a last LayerNorm."""
    n, d, h = len(items), model.config.hidden_size, model.config.num_heads
    x = model.item_emb.weight[items] * math.sqrt(d) + model.pos_emb.weight[:n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for block in model.blocks:
        q_in = F.layer_norm(x, (d,), block.attn_norm.weight, block.attn_norm.bias, 1e-8)
        a = block.attn
        q = (q_in @ a.q.weight.T + a.q.bias).view(n, h, -1).transpose(0, 1)
        k, v = (x @ a.kv.weight.T + a.kv.bias).view(n, 2, h, -1).permute(1, 2, 0, 3)
        scores = (q @ k.transpose(1, 2) / math.sqrt(d // h)).masked_fill(~causal, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, d) @ a.out.weight.T + a.out.bias
        x = F.layer_norm(q_in + att, (d,), block.ffn_norm.weight, block.ffn_norm.bias, 1e-8)
        f = block.ffn
        x = x + (F.relu(x @ f.fc1.weight.T + f.fc1.bias) @ f.fc2.weight.T + f.fc2.bias)
    return F.layer_norm(x, (d,), model.norm.weight, model.norm.bias, 1e-8)


def test_states_at_condition_tokens_equal_the_reference_over_the_items_before_them():
    model = tiny(attn_backend="sdpa")
    batch = random_packed_batch([9, 1, 14, 4, 25], NUM_ITEMS, VOCABS, num_queries=[1, 0, 1, 0, 1], seed=3)
    with torch.no_grad():
        out = model.forward_batch(batch)
        ok = model.can_predict(batch)
    is_item = batch.token_type == ITEM_TOKEN
    for s in range(batch.num_sequences):
        a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        items = batch.item_ids[a:b][is_item[a:b]]
        ref = reference_states(model, items) if len(items) else None
        for t in range(a, b):
            seen = int(is_item[a : t + 1].sum())  # item tokens at or before t in this sequence
            assert bool(ok[t]) == (seen > 0)
            if seen:
                torch.testing.assert_close(out[t], ref[seen - 1], **TOL)
            else:
                assert out[t].abs().sum() == 0


def test_the_evaluation_query_reads_the_last_history_item():
    """The query token (last of an eval sequence) predicts from the state after the last item, whatever its
    condition fields say: SASRec ignores conditions."""
    model = tiny()
    batch = random_packed_batch([7], NUM_ITEMS, VOCABS, num_queries=[1], seed=1)
    with torch.no_grad():
        out = model.forward_batch(batch)
        batch.cond_ids = batch.cond_ids.flip(0)
        torch.testing.assert_close(model.forward_batch(batch), out, rtol=0, atol=0)
    torch.testing.assert_close(out[-1], out[-2], rtol=0, atol=0)  # query = state after the item before it


def test_dropout_in_training_only_and_positions_are_bounded():
    model = tiny(dropout=0.5)
    batch = random_packed_batch([12, 6], NUM_ITEMS, VOCABS, seed=2)
    with torch.no_grad():
        ref = model.forward_batch(batch)
        model.train()
        assert not torch.allclose(model.forward_batch(batch), ref)
    long = random_packed_batch([64], NUM_ITEMS, VOCABS, seed=2)  # 32 items > max_position = 30
    with pytest.raises(ValueError, match="max_position"):
        model.forward_batch(long)


def test_built_from_the_preset_and_trains():
    cfg = load_preset("sasrec", NUM_ITEMS, VOCABS, dropout=0.0)
    model = build_model(cfg).train()
    assert isinstance(model, SASRecModel) and model.config.item_emb_dim == 64 and model.config.num_layers == 2
    batch = random_packed_batch([20, 11, 30], NUM_ITEMS, VOCABS, seed=4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    mask = (batch.targets >= 3) & model.can_predict(batch)
    losses = []
    for _ in range(30):
        logits = model.forward_batch(batch)[mask] @ model.item_embeddings(None).T
        loss = F.cross_entropy(logits, batch.targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
