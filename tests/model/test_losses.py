"""InfoNCE: a plain per-row reference, and 2 gloo ranks equal one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lum_dist.config import ConfigError, LossConfig
from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.losses import InfoNCE, linear_cross_entropy, view_contrast
from lum_dist.testing.distributed import run_distributed

NUM_ITEMS, DIM = 12, 8
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(n, DIM, generator=g)
    ids = torch.randint(NUM_SPECIAL_IDS, NUM_ITEMS, (n,), generator=g)  # small vocab: repeats are false negatives
    table = torch.randn(NUM_ITEMS, DIM, generator=g)
    log_q = torch.log_softmax(torch.randn(NUM_ITEMS, generator=g), 0)
    return user, ids, table, log_q


def seen_pairs(ids: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs as ``PackedBatch.items_before`` makes them: sorted by row, never the row's own target;
    about a third of the real items for each row."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(len(ids), NUM_ITEMS, generator=g) < 0.35
    keep[:, :NUM_SPECIAL_IDS] = False
    keep[torch.arange(len(ids)), ids] = False
    return keep.nonzero(as_tuple=True)


def excluded_items(exclude, row: int) -> set[int]:
    return set() if exclude is None else set(exclude[1][exclude[0] == row].tolist())


def reference_loss(cfg: LossConfig, user, ids, table, log_q, extra_ids=(), exclude=None):
    """Mean over rows of -log softmax, one row at a time, candidates = all positives + extra ids (less the row's
    excluded items)."""
    cand_ids = torch.cat([ids, torch.as_tensor(extra_ids, dtype=torch.long)])
    total = 0.0
    for i in range(len(ids)):
        u, c = user[i], table[cand_ids]
        if cfg.similarity == "cosine":
            u, c = u / u.norm(), c / c.norm(dim=1, keepdim=True)
        logits = c @ u / cfg.temperature
        if cfg.logq_correction:  # expected draws: len(ids) in-batch by frequency + uniform extras
            expected = len(ids) * log_q[cand_ids].exp() + len(extra_ids) / (NUM_ITEMS - NUM_SPECIAL_IDS)
            logits = logits - expected.log()
        keep = [j for j in range(len(cand_ids)) if j == i or cand_ids[j] != ids[i] or not cfg.mask_false_negatives]
        keep = [j for j in keep if int(cand_ids[j]) not in excluded_items(exclude, i)]
        pos = keep.index(i)
        total = total - torch.log_softmax(logits[keep], 0)[pos]
    return total / len(ids)


CONFIGS = {
    "cosine": LossConfig(),
    "dot-logq": LossConfig(similarity="dot", temperature=0.7, logq_correction=True),
    "no-logq": LossConfig(logq_correction=False),
    "no-mask": LossConfig(mask_false_negatives=False, temperature=0.2),
    "random-negatives": LossConfig(num_random_negatives=5, logq_correction=True),
}


@pytest.mark.parametrize("exclude_seen", [False, True], ids=["all", "exclude-seen"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_process_equals_reference(name, exclude_seen):
    cfg = CONFIGS[name]
    user, ids, table, log_q = inputs(9)
    loss_fn = InfoNCE(cfg, NUM_ITEMS, log_q)
    extra = loss_fn.random_negative_ids(torch.device("cpu")).tolist() if cfg.num_random_negatives else []
    exclude = seen_pairs(ids) if exclude_seen else None
    loss, stats = loss_fn(user, ids, lambda i: table[i], exclude)
    torch.testing.assert_close(loss, reference_loss(cfg, user, ids, table, log_q, extra, exclude), **TOL)
    if exclude_seen:  # the exclusion changes the loss
        assert not torch.allclose(loss, reference_loss(cfg, user, ids, table, log_q, extra))
    assert stats["count"] == 9
    assert stats["temperature"] == pytest.approx(cfg.temperature)
    if extra:
        assert min(extra) >= NUM_SPECIAL_IDS


def test_learnable_temperature_is_clamped_and_trained():
    cfg = LossConfig(learnable_temperature=True, temperature=0.05, min_temperature=0.01, max_temperature=1.0,
                     logq_correction=False)
    loss_fn = InfoNCE(cfg, NUM_ITEMS)
    user, ids, table, _ = inputs(6)
    loss, _ = loss_fn(user, ids, lambda i: table[i])
    loss.backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad != 0
    with torch.no_grad():
        loss_fn.log_temperature.fill_(5.0)
    assert loss_fn(user, ids, lambda i: table[i])[1]["temperature"] == pytest.approx(1.0)


def full_softmax_reference(cfg: LossConfig, user, ids, table, exclude=None):
    """Mean over rows of -log softmax over every real item (reserved and the row's excluded ids are never
    candidates), smoothed over the same candidates."""
    total = 0.0
    for i in range(len(ids)):
        items = [j for j in range(NUM_SPECIAL_IDS, NUM_ITEMS) if j not in excluded_items(exclude, i)]
        u, c = user[i], table[items]
        if cfg.similarity == "cosine":
            u, c = u / u.norm(), c / c.norm(dim=1, keepdim=True)
        log_p = torch.log_softmax(c @ u / cfg.temperature, 0)
        s = cfg.label_smoothing
        total = total - (1 - s) * log_p[items.index(int(ids[i]))] - s * log_p.mean()
    return total / len(ids)


FULL = {"full-cosine": LossConfig(negatives="full", temperature=0.1),
        "full-dot": LossConfig(negatives="full", similarity="dot", temperature=1.0)}  # SASRec's cross-entropy


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_softmax_equals_reference(name):
    user, ids, table, _ = inputs(9)
    loss, stats = InfoNCE(FULL[name], NUM_ITEMS)(user, ids, lambda i=None: table if i is None else table[i])
    torch.testing.assert_close(loss, full_softmax_reference(FULL[name], user, ids, table), **TOL)
    assert stats["count"] == 9


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_excluded_items_are_no_candidates_in_the_full_softmax(smoothing):
    cfg = LossConfig(negatives="full", temperature=0.1, label_smoothing=smoothing)
    user, ids, table, _ = inputs(9)
    exclude = seen_pairs(ids)
    loss, _ = InfoNCE(cfg, NUM_ITEMS)(user, ids, lambda i=None: table if i is None else table[i], exclude)
    torch.testing.assert_close(loss, full_softmax_reference(cfg, user, ids, table, exclude), **TOL)
    assert not torch.allclose(loss, full_softmax_reference(cfg, user, ids, table))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_linear_cross_entropy_with_exclusions_equals_masked_torch(smoothing):
    """Excluded logits are -inf and smoothing spreads over what is left; chunks of 2 rows cut the pairs; a pair
    listed twice counts once."""
    g = torch.Generator().manual_seed(4)
    user, cand = torch.randn(37, DIM, generator=g), torch.randn(50, DIM, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    mask = torch.rand(37, 50, generator=g) < 0.3
    mask[torch.arange(37), labels] = False
    mask[5] = False  # a row with nothing excluded
    grads = []
    for fused in (True, False):
        u, c = user.clone().requires_grad_(), cand.clone().requires_grad_()
        if fused:  # every pair of row 7 twice: an item the user had twice
            rows, cols = mask.nonzero(as_tuple=True)
            twice = torch.cat([torch.arange(len(rows)), (rows == 7).nonzero().squeeze(1)]).sort(stable=True).values
            loss = linear_cross_entropy(u, c, labels, chunk_elements=100, label_smoothing=smoothing,
                                        exclude=(rows[twice], cols[twice]))
        else:
            logits = (u @ c.T).masked_fill(mask, float("-inf"))
            log_p = logits.log_softmax(-1)
            kept_mean = log_p.masked_fill(mask, 0.0).sum(-1) / (~mask).sum(-1)
            loss = -((1 - smoothing) * log_p.gather(1, labels[:, None]).squeeze(1) + smoothing * kept_mean).sum()
        (2.0 * loss).backward()
        grads.append((loss.detach(), u.grad, c.grad))
    for fused, plain in zip(*grads, strict=True):  # gradients: sums of ~50 float32 terms of size ~2
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_linear_cross_entropy_and_its_gradients_equal_torch(smoothing):
    g = torch.Generator().manual_seed(3)
    user, cand = torch.randn(37, DIM, generator=g), torch.randn(50, DIM, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    grads = []
    for fused in (True, False):
        u, c = user.clone().requires_grad_(), cand.clone().requires_grad_()
        if fused:  # 100 logits per chunk: 2 rows, so 19 chunks and a short last one
            loss = linear_cross_entropy(u, c, labels, chunk_elements=100, label_smoothing=smoothing)
        else:
            loss = torch.nn.functional.cross_entropy(u @ c.T, labels, reduction="sum", label_smoothing=smoothing)
        (2.0 * loss).backward()  # an upstream gradient other than 1
        grads.append((loss.detach(), u.grad, c.grad))
    for fused, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fused, plain, **TOL)


def test_label_smoothing_needs_the_full_softmax():
    with pytest.raises(ConfigError, match="label_smoothing"):
        LossConfig(negatives="in_batch", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="label_smoothing"):
        LossConfig(negatives="full", label_smoothing=1.0)


def test_full_softmax_two_ranks_equal_one_process():
    cfg, split = LossConfig(negatives="full", learnable_temperature=True), [5, 3]
    ranks = run_distributed(_rank_step, 2, cfg, split)
    loss, _, user_grad, table_grad, temp_grad = one_step(cfg, *inputs(sum(split)))
    torch.testing.assert_close(sum(r[0] for r in ranks) / 2, loss, **TOL)
    torch.testing.assert_close(sum(r[3] for r in ranks) / 2, table_grad, **TOL)
    torch.testing.assert_close(sum(r[4] for r in ranks) / 2, temp_grad, **TOL)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, user_grad, **TOL)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="item_log_prob"):
        InfoNCE(LossConfig(logq_correction=True), NUM_ITEMS)
    with pytest.raises(ValueError, match="similarity"):
        InfoNCE(LossConfig(similarity="l2"), NUM_ITEMS)
    with pytest.raises(ValueError, match="negatives"):
        InfoNCE(LossConfig(negatives="sampled"), NUM_ITEMS)
    with pytest.raises(ValueError, match="num_random_negatives"):
        InfoNCE(LossConfig(negatives="full", num_random_negatives=8), NUM_ITEMS)
    InfoNCE(LossConfig(negatives="full"), NUM_ITEMS)  # no item_log_prob needed: nothing is sampled


DIST_CFG = LossConfig(learnable_temperature=True, logq_correction=True, num_random_negatives=4)


def one_step(cfg: LossConfig, user, ids, table, log_q, exclude=None):
    """Loss, stats and gradients of user outputs, item table and temperature (what the trainer backprops)."""
    user = user.clone().requires_grad_()
    emb = torch.nn.Embedding.from_pretrained(table.clone(), freeze=False)
    loss_fn = InfoNCE(cfg, NUM_ITEMS, log_q)
    loss, stats = loss_fn(user, ids, lambda i=None: emb(torch.arange(NUM_ITEMS) if i is None else i), exclude)
    loss.backward()
    temp_grad = loss_fn.log_temperature.grad if loss_fn.log_temperature is not None else torch.zeros(1)
    return loss.detach(), stats, user.grad, emb.weight.grad, temp_grad


def _rank_step(cfg: LossConfig, split: list[int], exclude_seen: bool = False):
    rank = dist.get_rank()
    user, ids, table, log_q = inputs(sum(split))
    a, b = sum(split[:rank]), sum(split[: rank + 1])
    exclude = None
    if exclude_seen:  # this rank's rows of the global pairs, numbered from 0
        rows, items = seen_pairs(ids)
        mine = (rows >= a) & (rows < b)
        exclude = (rows[mine] - a, items[mine])
    return one_step(cfg, user[a:b], ids[a:b], table, log_q, exclude)


@pytest.mark.parametrize(
    "cfg,split,exclude_seen",
    [(DIST_CFG, [5, 3], False), (LossConfig(), [5, 3], False), (DIST_CFG, [4, 0], False),  # uneven; no targets
     (DIST_CFG, [5, 3], True), (LossConfig(negatives="full", label_smoothing=0.1), [5, 3], True)],
    ids=["full", "default", "empty-rank", "exclude-seen", "exclude-seen-full-softmax"],
)
def test_two_ranks_equal_one_process(cfg, split, exclude_seen):
    world = len(split)
    ranks = run_distributed(_rank_step, world, cfg, split, exclude_seen)
    user, ids, table, log_q = inputs(sum(split))
    loss, stats, user_grad, table_grad, temp_grad = one_step(cfg, user, ids, table, log_q,
                                                             seen_pairs(ids) if exclude_seen else None)
    # DeepSpeed averages parameter gradients over ranks: the mean of the ranks' losses and grads is the global one.
    torch.testing.assert_close(sum(r[0] for r in ranks) / world, loss, **TOL)
    torch.testing.assert_close(sum(r[3] for r in ranks) / world, table_grad, **TOL)
    torch.testing.assert_close(sum(r[4] for r in ranks) / world, temp_grad, **TOL)
    # A user output lives on one rank only: its gradient there is world x its share of the global mean.
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / world, user_grad, **TOL)
    for r in ranks:
        assert r[1]["count"] == sum(split)


def reference_view_contrast(view, other, ids, temperature):
    """Mean over rows of -log softmax of cos(view_i, other_j) / t over j = i and every j with another target."""
    total = 0.0
    for i in range(len(ids)):
        keep = [j for j in range(len(ids)) if j == i or ids[j] != ids[i]]
        logits = torch.stack([torch.cosine_similarity(view[i], other[j], dim=0) for j in keep]) / temperature
        total = total - torch.log_softmax(logits, 0)[keep.index(i)]
    return total / len(ids)


def view_contrast_step(view, other, ids, temperature=0.5):
    view, other = view.clone().requires_grad_(), other.clone().requires_grad_()
    loss = view_contrast(view, other, ids, temperature)
    loss.backward()
    return loss.detach(), view.grad, other.grad


def test_view_contrast_equals_reference():
    view, ids, _, _ = inputs(9)  # 9 targets among 10 real items: some repeat, and those pairs are no negatives
    other = torch.randn(9, DIM, generator=torch.Generator().manual_seed(3))
    assert len(set(ids.tolist())) < len(ids)
    loss, view_grad, other_grad = view_contrast_step(view, other, ids)
    v, o = view.clone().requires_grad_(), other.clone().requires_grad_()
    reference = reference_view_contrast(v, o, ids, 0.5)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), **TOL)
    torch.testing.assert_close(view_grad, v.grad, **TOL)
    torch.testing.assert_close(other_grad, o.grad, **TOL)
    # identical views of distinct targets score better than unrelated ones
    assert view_contrast(view, view, ids, 0.5) < loss


def _rank_view_contrast(split: list[int]):
    rank = dist.get_rank()
    view, ids, _, _ = inputs(sum(split))
    other = torch.randn(sum(split), DIM, generator=torch.Generator().manual_seed(3))
    a, b = sum(split[:rank]), sum(split[: rank + 1])
    return view_contrast_step(view[a:b], other[a:b], ids[a:b])


@pytest.mark.parametrize("split", [[5, 3], [4, 0]], ids=["uneven", "empty-rank"])
def test_view_contrast_two_ranks_equal_one_process(split):
    ranks = run_distributed(_rank_view_contrast, len(split), split)
    view, ids, _, _ = inputs(sum(split))
    other = torch.randn(sum(split), DIM, generator=torch.Generator().manual_seed(3))
    loss, view_grad, other_grad = view_contrast_step(view, other, ids)
    torch.testing.assert_close(sum(r[0] for r in ranks) / 2, loss, **TOL)
    # each row lives on one rank: its gradient there is world x its share of the global mean
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / 2, view_grad, **TOL)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, other_grad, **TOL)


def test_view_contrast_config_is_checked():
    with pytest.raises(ConfigError, match="view_contrast_weight"):
        LossConfig(view_contrast_weight=-1.0)
    with pytest.raises(ConfigError, match="view_contrast_temperature"):
        LossConfig(view_contrast_temperature=0.0)
