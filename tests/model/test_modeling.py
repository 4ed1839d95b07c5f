"""LUMModel: packing exactness, group-query dispatch, tied item table, init, checkpointing, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lum_dist.checkpoint import build_run_model, model_config_for
from lum_dist.config import ConfigError, LossConfig, ModelSpec, PretrainConfig
from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN, PackedBatch
from lum_dist.data.prepare import item_neighbour_ids, item_train_counts, prepare
from lum_dist.data.schema import PAD_ID
from lum_dist.model import LUMModel, enable_activation_checkpointing, load_preset, modeling
from lum_dist.ops.attention import varlen_attention
from lum_dist.testing.batches import random_packed_batch

TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, summation order only
VOCABS = [7, 5]


def tiny(**overrides) -> LUMModel:
    torch.manual_seed(0)
    return LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=2, **overrides)).eval()


def sequence(batch: PackedBatch, s: int) -> PackedBatch:
    """Sequence s of a packed batch as a batch of its own."""
    a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
    cut = lambda x: None if x is None else x[a:b]  # noqa: E731
    return PackedBatch(
        item_ids=cut(batch.item_ids), cond_ids=cut(batch.cond_ids), token_type=cut(batch.token_type),
        positions=cut(batch.positions), time_gaps=cut(batch.time_gaps), targets=cut(batch.targets),
        cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32), max_seqlen=b - a,
        num_queries=batch.num_queries[s : s + 1], row_splits=torch.tensor([0, 1], dtype=torch.int32),
        token_budget=b - a, user_ids=[batch.user_ids[s]], numeric=cut(batch.numeric),
    )


@pytest.mark.parametrize("backend,previous_item_slot", [("sdpa", False), ("reference", False), ("sdpa", True)])
def test_packed_batch_equals_each_user_alone(backend, previous_item_slot):
    model = tiny(attn_backend=backend, num_numeric=0, previous_item_slot=previous_item_slot)
    batch = random_packed_batch([9, 1, 14, 4], 60, VOCABS, num_queries=[1, 0, 1, 0], seed=3)
    with torch.no_grad():
        packed = model.forward_batch(batch)
        for s in range(batch.num_sequences):
            a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
            torch.testing.assert_close(packed[a:b], model.forward_batch(sequence(batch, s)), **TOL)


def test_previous_item_slot_fills_condition_tokens_with_the_previous_behaviours_item():
    # histories of 8, 0, 3, 4 and 2 tokens (condition, item, ...): the third ends on a condition token
    batch = random_packed_batch([9, 1, 6, 7, 3], 60, VOCABS, num_queries=[1, 1, 3, 3, 1], seed=4)
    got = modeling.previous_items(batch.item_ids, batch.token_type, batch.positions, batch.cu_seqlens)
    want, filled = batch.item_ids.clone(), 0
    for s, nq in enumerate(batch.num_queries.tolist()):  # walk each sequence
        a, b = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        for t in range(a, b):
            prev = min(t, b - nq) - 1  # a query's previous token is the history's last
            if batch.token_type[t] == COND_TOKEN and prev >= a and batch.token_type[prev] == ITEM_TOKEN:
                want[t], filled = batch.item_ids[prev], filled + 1
    # per sequence, history conditions after an item + queries after a history ending on an item
    assert torch.equal(got, want) and filled == (3 + 1) + 0 + (1 + 0) + (1 + 3) + (0 + 1)
    assert torch.equal(got[batch.token_type == ITEM_TOKEN], batch.item_ids[batch.token_type == ITEM_TOKEN])


def test_previous_item_dropout_blanks_a_share_of_the_slots_in_training_only():
    batch = random_packed_batch([60] * 40, 60, VOCABS, seed=2)
    full = modeling.previous_items(batch.item_ids, batch.token_type, batch.positions, batch.cu_seqlens)
    torch.manual_seed(0)
    dropped = modeling.previous_items(batch.item_ids, batch.token_type, batch.positions, batch.cu_seqlens, 0.5)
    filled, kept = full != batch.item_ids, dropped != batch.item_ids
    assert (kept <= filled).all() and torch.equal(dropped[kept], full[kept])  # a slot is the item or left PAD
    assert 0.4 < kept.sum() / filled.sum() < 0.6
    with torch.no_grad():  # evaluation: every slot filled, as without dropout
        a, b = tiny(previous_item_slot=True, previous_item_dropout=0.5), tiny(previous_item_slot=True)
        torch.testing.assert_close(a.forward_batch(batch), b.forward_batch(batch), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="previous_item_dropout needs previous_item_slot or previous_item_skip"):
        tiny(previous_item_dropout=0.5)


def test_numeric_features_are_used_and_checked():
    model = tiny(num_numeric=3)
    batch = random_packed_batch([6, 4], 60, VOCABS, num_numeric=3, seed=1)
    with torch.no_grad():
        out = model.forward_batch(batch)
        batch.numeric = batch.numeric + 1.0
        assert not torch.allclose(out, model.forward_batch(batch))
    batch.numeric = None
    with pytest.raises(ValueError, match="num_numeric = 3"):
        model.forward_batch(batch)


def _group_query_by_definition(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale=None, backend="auto"):
    """Each query token attends to its sequence's history and itself: one causal pass per query."""
    out = torch.empty_like(q)
    for s, nq in enumerate(num_queries.tolist()):
        a, b = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        hist = b - a - nq
        for j in [None] + list(range(nq)):  # None: the history itself
            idx = torch.arange(a, a + hist) if j is None else torch.cat([torch.arange(a, a + hist), torch.tensor([a + hist + j])])
            cu = torch.tensor([0, idx.numel()], dtype=torch.int32)
            y = varlen_attention(q[idx], k[idx], v[idx], cu, idx.numel(), backend="reference")
            if j is None:
                out[a : a + hist] = y
            else:
                out[a + hist + j] = y[-1]
    return out


@pytest.mark.parametrize("op,options", [("definition", {}), ("lum_dist.ops.group_query", {}),
                                        ("lum_dist.ops.group_query", {"previous_item_slot": True}),
                                        ("lum_dist.ops.group_query", {"previous_item_skip": True})])
def test_group_queries_dispatch_and_each_query_equals_its_own_pass(monkeypatch, op, options):
    """num_queries > 1 goes to lum_dist.ops.group_query (the real op, or a stub doing it by definition);
    query j's output equals the history + query j alone, at position L."""
    if op == "definition":
        def stub(q, k, v, plan):
            cu, nq = (torch.tensor(x, dtype=torch.int32) for x in (plan.layout.cu, plan.layout.num_queries))
            return _group_query_by_definition(q, k, v, cu, nq, plan.layout.max_seqlen)

        monkeypatch.setattr(modeling, "group_query_attention_plan", stub)
    model = tiny(**options)
    if model.previous_item_skip is not None:  # a learned map, not its zero init
        torch.nn.init.normal_(model.previous_item_skip.weight)
    batch = random_packed_batch([8, 3], 60, VOCABS, num_queries=[3, 2], seed=5)
    with torch.no_grad():
        out = model.forward_batch(batch)
        for s, (hist, nq) in enumerate([(5, 3), (1, 2)]):
            one = sequence(batch, s)
            base = int(batch.cu_seqlens[s])
            for j in range(nq):
                keep = torch.cat([torch.arange(hist), torch.tensor([hist + j])])
                alone = random_packed_batch([hist + 1], 60, VOCABS, num_queries=[1])
                for name in ("item_ids", "cond_ids", "token_type", "positions", "time_gaps", "targets"):
                    setattr(alone, name, getattr(one, name)[keep])
                torch.testing.assert_close(out[base + hist + j], model.forward_batch(alone)[-1], **TOL)
            torch.testing.assert_close(out[base : base + hist], model.forward_batch(sequence(batch, s))[:hist], **TOL)


def test_item_embeddings_is_the_input_table_and_pad_rows_are_zero():
    model = tiny()
    ids = torch.tensor([0, 4, 59])
    torch.testing.assert_close(model.item_embeddings(ids), model.tokens.item_emb.weight[ids])
    assert model.item_embeddings(None).shape == (60, model.config.item_emb_dim)
    assert model.item_embeddings(torch.tensor([0])).abs().sum() == 0
    for emb in model.tokens.cond_embs:
        assert emb.weight[0].abs().sum() == 0


def test_attribute_targets_add_each_items_attribute_embeddings():
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, item_attr_vocab_sizes=[7, 4], attribute_targets=True)).eval()
    attrs = torch.randint(3, 7, (60, 2)) % torch.tensor([7, 4])
    attrs[:3] = 0  # reserved item ids have no attributes (PAD)
    model.set_item_attributes(attrs)
    ids = torch.tensor([0, 4, 59, 4])
    want = (model.tokens.item_emb.weight[ids] + model.attr_targets[0].weight[attrs[ids, 0]]
            + model.attr_targets[1].weight[attrs[ids, 1]])
    torch.testing.assert_close(model.item_embeddings(ids), want)
    torch.testing.assert_close(model.item_embeddings(None)[ids], want)
    assert model.item_embeddings(torch.tensor([0])).abs().sum() == 0  # PAD item, PAD attributes
    # Two items of one category share that row: a gradient through one item's target reaches the other's score.
    model.item_embeddings(torch.tensor([5]))[0].sum().backward()
    assert model.attr_targets[0].weight.grad[attrs[5, 0]].abs().sum() > 0
    with pytest.raises(ValueError, match="num_items x item-attribute fields"):
        model.set_item_attributes(attrs[:, :1])
    with pytest.raises(ConfigError, match="attribute_targets needs a dataset whose items have attributes"):
        load_preset("lum-tiny", 60, VOCABS, attribute_targets=True)
    # Off (the default), the scoring rows are the item table's and the attribute map is empty.
    assert tiny().item_attrs.shape == (60, 0)


def test_item_tags_add_the_mean_of_each_items_tag_embeddings():
    """An item's vector (its token's input and its InfoNCE target) is its id row plus the mean of its tags' rows,
    against a loop over the items; PAD items and PAD tag slots add nothing."""
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", 60, VOCABS, item_attr_vocab_sizes=[7], attribute_targets=True, item_tags=True,
                      num_item_tags=9, max_item_tags=3)
    model = LUMModel(cfg).eval()
    tags = torch.randint(3, 9, (60, 3))
    tags[torch.rand(60, 3) < 0.3] = 0  # ragged: some items have fewer tags, some none
    tags[:3] = 0
    attrs = torch.randint(3, 7, (60, 1))
    attrs[:3] = 0
    model.set_item_tags(tags)
    model.set_item_attributes(attrs)
    ids = torch.tensor([0, 4, 59, 4, 17])
    want = []
    for i in ids.tolist():
        real = [t for t in tags[i].tolist() if t != 0]
        tag_mean = model.tokens.tag_emb.weight[real].mean(0) if real else torch.zeros(cfg.item_emb_dim)
        want.append(model.tokens.item_emb.weight[i] + tag_mean + model.attr_targets[0].weight[attrs[i, 0]])
    torch.testing.assert_close(model.item_embeddings(ids), torch.stack(want), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.item_embeddings(None)[ids], torch.stack(want), rtol=1e-6, atol=1e-7)
    assert model.item_embeddings(torch.tensor([0])).abs().sum() == 0
    # The token encoder reads the same vectors: changing a tag's row changes the output of a token of an item
    # that carries it, not of one that does not.
    batch = random_packed_batch([9, 6, 12], 60, VOCABS, seed=1)
    before = model.forward_batch(batch)
    carried = tags[batch.item_ids].flatten().unique()
    unused = sorted(set(range(3, 9)) - set(carried.tolist()))
    with torch.no_grad():
        for t in unused:
            model.tokens.tag_emb.weight[t] += 1.0
    torch.testing.assert_close(model.forward_batch(batch), before)
    with torch.no_grad():
        model.tokens.tag_emb.weight[int(carried[carried > 0][0])] += 1.0
    assert not torch.allclose(model.forward_batch(batch), before)
    with pytest.raises(ValueError, match="num_items x max_item_tags"):
        model.set_item_tags(tags[:, :2])
    with pytest.raises(ConfigError, match="item_tags needs a dataset whose items have tags"):
        load_preset("lum-tiny", 60, VOCABS, item_tags=True)
    assert tiny().tokens.item_tags.shape == (60, 0) and tiny().tokens.tag_emb is None  # off by default


def test_init_weights_reinitialises_every_module():
    model = tiny()
    for p in model.parameters():
        torch.nn.init.constant_(p, 0.5)
    for module in model.modules():
        model._init_weights(module)
    std = model.config.initializer_range
    assert abs(model.blocks[0].mlp.gate_up.weight.std().item() - std) < 0.3 * std
    assert torch.all(model.tokens.proj.bias == 0) and torch.all(model.norm.weight == 1)
    assert model.tokens.item_emb.weight[0].abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = random_packed_batch([7, 5], 60, VOCABS, seed=2)
    grads = []
    for checkpoint in (False, True):
        model = tiny().train()
        if checkpoint:
            enable_activation_checkpointing(model)  # as the trainer calls it
            assert all(block.gradient_checkpointing for block in model.blocks)
        model.forward_batch(batch).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(tiny().parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends_give_the_reference_model_output_bf16():
    from lum_dist.ops.attention import available_backends

    batch = random_packed_batch([40, 2, 130, 77], 60, VOCABS, seed=4).to("cuda")
    outs = {}
    for backend in available_backends("cuda"):
        model = tiny(attn_backend=backend).to("cuda", torch.bfloat16)
        with torch.no_grad():
            outs[backend] = model.forward_batch(batch).float()
    for backend, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=3e-2, atol=3e-2, msg=lambda m, b=backend: f"{b}: {m}")


@pytest.mark.parametrize("kind", ["feature_dropout", "attention_dropout", "residual_dropout"])
def test_each_dropout_acts_in_training_only(kind):
    model = tiny(**{kind: 0.3})
    batch = random_packed_batch([8, 5], 60, VOCABS, seed=2)
    with torch.no_grad():
        ref = model.forward_batch(batch)
        torch.testing.assert_close(model.forward_batch(batch), ref, rtol=0, atol=0)  # eval: deterministic
        model.train()
        assert not torch.allclose(model.forward_batch(batch), ref)
        model.eval()
        torch.testing.assert_close(model.forward_batch(batch), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=kind):
        tiny(**{kind: 1.0})


def test_scaled_init_shrinks_the_residual_output_projections_with_depth():
    layers = 8
    for scaled in (False, True):
        torch.manual_seed(0)
        model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=layers, hidden_size=256, num_heads=4,
                                     intermediate_size=512, scaled_init=scaled))
        std = model.config.initializer_range / ((2 * layers) ** 0.5 if scaled else 1.0)
        for block in model.blocks:
            for w in (block.attn.out.weight, block.mlp.down.weight):
                assert abs(w.std().item() / std - 1) < 0.05
            assert abs(block.attn.qkv.weight.std().item() / model.config.initializer_range - 1) < 0.05


def test_item_neighbours_add_the_mean_id_embedding_of_each_items_neighbours():
    """An item's vector is its id row plus the mean id row of its neighbours (against a loop; PAD slots add
    nothing), the same for its token and its InfoNCE target; a neighbour's id row learns from the item's score."""
    model = tiny(item_neighbours=3)
    nbrs = torch.randint(3, 60, (60, 3))
    nbrs[torch.rand(60, 3) < 0.3] = PAD_ID
    nbrs[:3] = PAD_ID
    model.set_item_neighbours(nbrs)
    table = model.tokens.item_emb.weight
    ids = torch.tensor([0, 4, 59, 4, 17])
    want = []
    for i in ids.tolist():
        real = [b for b in nbrs[i].tolist() if b != PAD_ID]
        want.append(table[i] + (table[real].mean(0) if real else 0))
    torch.testing.assert_close(model.item_embeddings(ids), torch.stack(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.tokens.item_vectors(ids), torch.stack(want), rtol=1e-6, atol=1e-6)
    item = int(torch.nonzero((nbrs != PAD_ID).any(-1))[0])
    model.item_embeddings(torch.tensor([item]))[0].sum().backward()
    assert table.grad[nbrs[item][nbrs[item] != PAD_ID]].abs().sum(-1).gt(0).all()
    with pytest.raises(ValueError, match="num_items x item_neighbours"):
        model.set_item_neighbours(nbrs[:, :2])
    # The gate: a learned weight per popularity bucket on the neighbours' mean, 1 at init.
    gated = tiny(item_neighbours=3, neighbour_gate=True)
    gated.load_state_dict(model.state_dict(), strict=False)
    counts = torch.randint(0, 2**17, (60,)) >> torch.randint(0, 18, (60,))  # every order of magnitude
    gated.set_item_neighbours(nbrs, counts)
    buckets = gated.tokens.item_count_bucket
    assert buckets.tolist() == [min(int(math.log2(1 + c)), 15) for c in counts.tolist()]
    with pytest.raises(ValueError, match="training count"):
        gated.set_item_neighbours(nbrs)
    torch.testing.assert_close(gated.item_embeddings(ids), torch.stack(want), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        gated.tokens.neighbour_gate.weight.copy_(torch.rand(16, 1))
    gate = gated.tokens.neighbour_gate.weight[buckets[ids], 0, None]
    torch.testing.assert_close(gated.item_embeddings(ids), table[ids] + gate * (torch.stack(want) - table[ids]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="item_neighbours"):
        tiny(item_neighbours=-1)
    assert tiny().tokens.item_nbrs.shape == (60, 0)  # off by default


def test_a_runs_model_reads_its_item_neighbours_and_popularity_buckets_from_the_dataset(tmp_path):
    meta = prepare({"format": "synthetic", "num_users": 40, "num_items": 50}, tmp_path / "d")
    cfg = PretrainConfig(model=ModelSpec(overrides={"item_neighbours": 4, "neighbour_window": 2,
                                                    "neighbour_gate": True}))
    model = build_run_model(model_config_for(cfg, meta), tmp_path / "d", meta)
    nbrs = item_neighbour_ids(tmp_path / "d", meta, 4, 2)
    assert (nbrs != PAD_ID).sum() > meta.num_items  # most items have neighbours
    assert torch.equal(model.tokens.item_nbrs, torch.from_numpy(nbrs))
    assert torch.equal(model.tokens.item_count_bucket,
                       modeling.popularity_bucket(torch.from_numpy(item_train_counts(tmp_path / "d", meta.num_items))))


def test_target_id_dropout_scores_a_share_of_the_items_without_their_ids_in_training_only():
    model = tiny(target_id_dropout=0.4, attribute_targets=True, item_attr_vocab_sizes=[8])
    model.set_item_attributes(torch.randint(1, 8, (60, 1)))
    full = model.item_embeddings()
    without_ids = full - model.tokens.item_emb.weight
    assert torch.equal(model.item_embeddings(), full)  # evaluation scores every id
    model.train()
    torch.manual_seed(0)
    table = model.item_embeddings()
    hidden = torch.isclose(table, without_ids, rtol=0, atol=1e-6).all(-1)
    kept = torch.equal(table[~hidden], full[~hidden])
    assert kept and 0.25 < hidden.float().mean() < 0.55  # each row whole or without its id, ~40 % without
    torch.testing.assert_close(model.item_embeddings(torch.arange(60)), full)  # rows looked up by id: all kept
    with pytest.raises(ConfigError, match="target_id_dropout"):
        tiny(target_id_dropout=1.0)
    with pytest.raises(ConfigError, match="target_id_dropout"):  # a sampled softmax never scores the full table
        PretrainConfig(model=ModelSpec(overrides={"target_id_dropout": 0.2}), loss=LossConfig(negatives="in_batch"))


def test_item_id_dropout_blanks_a_share_of_item_tokens_in_training_only():
    batch = random_packed_batch([60] * 40, 60, VOCABS, seed=3)
    torch.manual_seed(0)
    dropped = modeling.drop_item_ids(batch.item_ids, batch.token_type, 0.3)
    items, changed = batch.token_type == ITEM_TOKEN, dropped != batch.item_ids
    assert (changed <= items).all() and (dropped[changed] == PAD_ID).all()  # only item tokens, only to PAD
    assert 0.25 < changed.sum() / (items & (batch.item_ids != PAD_ID)).sum() < 0.35
    a, b = tiny(item_id_dropout=0.3), tiny()
    with torch.no_grad():  # evaluation reads every id
        torch.testing.assert_close(a.forward_batch(batch), b.forward_batch(batch), rtol=0, atol=0)
    a.train()
    torch.manual_seed(0)
    with torch.no_grad():  # training: a masked id changes the output (other dropout is 0 in tiny)
        assert not torch.allclose(a.forward_batch(batch), b.forward_batch(batch))
    with pytest.raises(ConfigError, match="item_id_dropout"):
        tiny(item_id_dropout=1.0)


def test_previous_item_skip_adds_the_previous_items_scored_vector_to_condition_tokens_only():
    batch = random_packed_batch([9, 1, 6, 7, 3], 60, VOCABS, num_queries=[1, 1, 3, 3, 1], seed=4)
    base, skip = tiny(), tiny(previous_item_skip=True)
    assert not skip.previous_item_skip.weight.any()  # zero at init: the same model as without it
    skip.load_state_dict(base.state_dict(), strict=False)  # the rest as base's (the skip drew random numbers)
    with torch.no_grad():
        torch.testing.assert_close(skip.forward_batch(batch), base.forward_batch(batch), rtol=0, atol=0)
        skip.previous_item_skip.weight.normal_()
        got = skip.forward_batch(batch) - base.forward_batch(batch)
        prev = modeling.previous_items(batch.item_ids, batch.token_type, batch.positions, batch.cu_seqlens)
        has_prev = (batch.token_type == COND_TOKEN) & (prev != batch.item_ids)
        mapped = skip.item_embeddings(prev) @ skip.previous_item_skip.weight.T
        want = torch.where(has_prev[:, None], mapped, torch.zeros(()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert has_prev.sum() == 10  # as in the previous-item-slot test: the rows that changed are those


def test_previous_item_dropout_leaves_the_skip_out_for_a_share_of_condition_tokens_in_training():
    batch = random_packed_batch([60] * 40, 60, VOCABS, seed=2)
    base, skip = tiny(), tiny(previous_item_skip=True, previous_item_dropout=0.5)
    skip.load_state_dict(base.state_dict(), strict=False)
    torch.nn.init.normal_(skip.previous_item_skip.weight)
    prev = modeling.previous_items(batch.item_ids, batch.token_type, batch.positions, batch.cu_seqlens)
    has_prev = (batch.token_type == COND_TOKEN) & (prev != batch.item_ids)
    with torch.no_grad():  # tiny has no other dropout: a token's output is base's exactly where its skip is left out
        skip.train()
        left_out = (skip.forward_batch(batch) == base.forward_batch(batch)).all(-1)
        assert 0.4 < (left_out & has_prev).sum() / has_prev.sum() < 0.6
        skip.eval()
        assert not ((skip.forward_batch(batch) == base.forward_batch(batch)).all(-1) & has_prev).any()
