"""InfoNCE over items: a full softmax over the catalogue, or in-batch negatives gathered from every rank.

For each target (the output at a condition token, paired with the item of the same behaviour):

    logit(c) = sim(user, item_c) / temperature [- log q(c) with the logQ correction]

over the candidates c:

* ``negatives="full"``: every real item. Exact cross-entropy over the catalogue (SASRec's loss with
  ``similarity="dot", temperature=1``); the logits are ``[targets, items]``, so it suits catalogues up to
  a few hundred thousand items. No sampling, so no logQ correction and nothing to gather.
* ``negatives="in_batch"``: the positives of ALL ranks (and ``num_random_negatives`` uniform ids shared
  by all ranks), with false negatives (same item id as the positive, other than the positive itself)
  masked out. For catalogues too large for the full softmax.

Either way, ``exclude`` (``loss.exclude_seen``) takes per-target items out of the candidates (-inf logits): the
items the user had before the target, which the evaluation's ranking leaves out too.

logQ correction (Yi et al., RecSys 2019): in-batch candidates are drawn in proportion to item
frequency, so an uncorrected softmax learns to push popular items down and ranks poorly over the
whole catalogue. ``q(c)`` is the expected number of times c is a candidate: ``B * p(c)`` for B
in-batch candidates plus ``R / num_real_items`` for R uniform negatives (one proposal mixing both).

``view_contrast`` is the regulariser of ``loss.view_contrast_weight``: two dropout views of each target's user
representation, contrasted against the other targets' views gathered from every rank.

The gather is autograd-aware: a candidate's gradient is summed over every rank whose loss used it and
returned to the rank that embedded it.

Normalisation: rank r returns ``local_sum * world / global_count``. DeepSpeed averages gradients
over ranks, so the step follows the gradient of the mean over all targets of all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lum_dist.config import LossConfig
from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.utils import dist_info

RANDOM_NEGATIVE_SEED = 0x1A5E  # random negatives of call n use seed + n on every rank


def all_gather_varlen(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; rank r holds ``counts[r]`` rows (padded for the gather)."""
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_varlen whose backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        return all_gather_varlen(x, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss used our rows: their gradients add up
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(user_i @ cand.T, labels_i), computed ``chunk`` rows at a time: the [N, C] logits never exist
    whole, and the gradients are made in the same pass while a chunk's logits are in cache (as the fused
    linear cross-entropy kernels of Liger and Apple's Cut Cross-Entropy do on GPUs; those have no CPU path).
    2.1x faster than ``F.cross_entropy(user @ cand.T)`` forward + backward on the CPU (2,048 x 12,068 x 64),
    and its memory is O(chunk x C), so the full softmax also fits large catalogues on an accelerator."""

    @staticmethod
    def forward(ctx, user: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor, chunk: int,
                smoothing: float, exclude: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        loss = user.new_zeros(())
        grad_user, grad_cand = torch.empty_like(user), torch.zeros_like(cand)
        rows = torch.arange(chunk, device=user.device)
        if exclude is not None:  # (row, column) pairs sorted by row: each chunk's are one slice
            ex_rows, ex_cols = exclude
            bounds = torch.searchsorted(ex_rows, torch.arange(0, user.shape[0] + chunk, chunk, device=ex_rows.device))
            bounds = bounds.tolist()
        for i, a in enumerate(range(0, user.shape[0], chunk)):
            u, lab = user[a : a + chunk], labels[a : a + chunk]
            logits = u @ cand.T
            if exclude is not None:
                r, c = ex_rows[bounds[i] : bounds[i + 1]] - a, ex_cols[bounds[i] : bounds[i + 1]]
                logits[r, c] = float("-inf")
            if smoothing and exclude is None:
                row_sum, num_cand = logits.sum(-1), logits.new_full((len(lab),), cand.shape[0])
            elif smoothing:  # the smoothed target spreads over the remaining candidates only
                kept = logits.isfinite()
                row_sum, num_cand = torch.where(kept, logits, 0.0).sum(-1), kept.sum(-1).to(logits.dtype)
            lse = logits.logsumexp(-1)
            target = (1.0 - smoothing) * logits.gather(1, lab[:, None]).squeeze(1)
            if smoothing:  # the target distribution puts smoothing / C on every candidate
                target += smoothing * row_sum / num_cand
            loss += (lse - target).sum()
            grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place (0 where excluded)
            grad_logits[rows[: len(lab)], lab] -= 1.0 - smoothing
            if smoothing:
                grad_logits -= (smoothing / num_cand)[:, None]
                if exclude is not None:
                    grad_logits[r, c] = 0.0
            grad_user[a : a + chunk] = grad_logits @ cand
            grad_cand.addmm_(grad_logits.T, u)
        ctx.save_for_backward(grad_user, grad_cand)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_user, grad_cand = ctx.saved_tensors
        return grad_user * grad, grad_cand * grad, None, None, None, None


def linear_cross_entropy(user: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = 1 << 22, label_smoothing: float = 0.0,
                         exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``F.cross_entropy(user @ cand.T, labels, reduction="sum", label_smoothing=label_smoothing)`` in float32, in
    row chunks of about ``chunk_elements`` logits (4M: 16 MB, cache-sized on a CPU). ``exclude``: (row, column)
    pairs sorted by row (repeats allowed) whose logits are -inf (never a row's label); label smoothing then spreads
    over each row's remaining columns."""
    chunk = max(1, chunk_elements // max(1, cand.shape[0]))
    return _LinearCrossEntropy.apply(user.float(), cand.float(), labels, chunk, label_smoothing, exclude)


def target_counts(n: int, device: torch.device) -> list[int]:
    """Targets on every rank (one all-gather of a scalar)."""
    _, world = dist_info()
    if world == 1:
        return [n]
    counts_t = torch.tensor([n], device=device)
    parts = [torch.empty_like(counts_t) for _ in range(world)]
    dist.all_gather(parts, counts_t)
    return [int(c) for c in torch.cat(parts).tolist()]


def gather_candidates(cand: torch.Tensor, cand_ids: torch.Tensor,
                      counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's candidate rows (autograd-aware) and ids in rank order, and the column of this rank's first."""
    rank, _ = dist_info()
    return _GatherWithGrad.apply(cand, counts, rank), all_gather_varlen(cand_ids, counts), sum(counts[:rank])


def mask_same_item(logits: torch.Tensor, cand_ids: torch.Tensor, target_ids: torch.Tensor,
                   pos_col: torch.Tensor) -> torch.Tensor:
    """-inf where a candidate holds a row's target item outside the row's own positive column: a false negative."""
    same = cand_ids[None, :] == target_ids[:, None]
    same[torch.arange(len(target_ids), device=logits.device), pos_col] = False
    return logits.masked_fill(same, float("-inf"))


def view_contrast(view: torch.Tensor, other_view: torch.Tensor, target_ids: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """InfoNCE of each row of ``view`` [N, E] against its own row of ``other_view`` (a second dropout pass of the
    same targets), the other rows of every rank's ``other_view`` as negatives; a row with the same target item is
    no negative (DuoRec's supervised positive). Cosine similarity / ``temperature``; normalised as ``InfoNCE``
    (rank r returns local_sum * world / global_count, so averaging over ranks gives the global mean)."""
    _, world = dist_info()
    counts = target_counts(view.shape[0], view.device)
    cand, cand_ids, offset = F.normalize(other_view.float(), dim=-1), target_ids, 0
    if world > 1:
        cand, cand_ids, offset = gather_candidates(cand, target_ids, counts)
    logits = F.normalize(view.float(), dim=-1) @ cand.T / temperature
    pos_col = offset + torch.arange(view.shape[0], device=view.device)
    loss_sum = F.cross_entropy(mask_same_item(logits, cand_ids, target_ids, pos_col), pos_col, reduction="sum")
    return loss_sum * world / max(sum(counts), 1)


class InfoNCE(nn.Module):
    def __init__(self, loss_cfg: LossConfig, num_items: int, item_log_prob: torch.Tensor | None = None):
        super().__init__()
        if loss_cfg.similarity not in ("cosine", "dot"):
            raise ValueError(f"loss.similarity: expected 'cosine' or 'dot', got {loss_cfg.similarity!r}")
        if loss_cfg.negatives not in ("full", "in_batch"):
            raise ValueError(f"loss.negatives: expected 'full' or 'in_batch', got {loss_cfg.negatives!r}")
        if loss_cfg.negatives == "full" and loss_cfg.num_random_negatives:
            raise ValueError("loss.num_random_negatives needs loss.negatives=in_batch (full already scores every item)")
        if loss_cfg.negatives == "in_batch" and loss_cfg.logq_correction and item_log_prob is None:
            raise ValueError("loss.logq_correction needs item_log_prob (log p(item) from training counts)")
        if item_log_prob is not None and item_log_prob.shape != (num_items,):
            raise ValueError(f"item_log_prob: expected shape ({num_items},), got {tuple(item_log_prob.shape)}")
        self.cfg, self.num_items = loss_cfg, num_items
        self.log_temperature = (
            # shape [1], not a scalar: ZeRO-3 cannot partition 0-dim parameters
            nn.Parameter(torch.tensor([math.log(loss_cfg.temperature)])) if loss_cfg.learnable_temperature else None
        )
        self.register_buffer("item_log_prob", item_log_prob.float() if item_log_prob is not None else None,
                             persistent=False)
        self.num_calls = 0  # seeds the shared random negatives; checkpointed by the trainer (exact resume)

    def _scores(self, user: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity / temperature logits in float32, the temperature). The temperature scales the
        [N, E] user side, not the [N, C] logits: the same numbers, a C/E-times smaller division."""
        user, cand = user.float(), cand.float()
        if self.cfg.similarity == "cosine":
            user, cand = F.normalize(user, dim=-1), F.normalize(cand, dim=-1)
        temperature = self.temperature().to(user.device)
        return (user / temperature) @ cand.T, temperature

    def _full_softmax(self, user_out, target_ids, item_embeddings, exclude):
        device = user_out.device
        _, world = dist_info()
        global_count = sum(target_counts(user_out.shape[0], device))
        # Column j scores item NUM_SPECIAL_IDS + j: reserved ids are never candidates.
        user, cand = user_out.float(), item_embeddings(None)[NUM_SPECIAL_IDS:].float()
        if self.cfg.similarity == "cosine":
            user, cand = F.normalize(user, dim=-1), F.normalize(cand, dim=-1)
        temperature = self.temperature().to(user.device)
        if exclude is not None:
            rows, items = exclude
            real = items >= NUM_SPECIAL_IDS
            exclude = (rows[real], items[real] - NUM_SPECIAL_IDS)
        loss = linear_cross_entropy(user / temperature, cand, target_ids - NUM_SPECIAL_IDS,
                                    label_smoothing=self.cfg.label_smoothing, exclude=exclude)
        return loss * world / max(global_count, 1), self._stats(global_count, temperature)

    @staticmethod
    def _stats(global_count: int, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"temperature": temperature.detach(), "count": torch.tensor(float(global_count))}

    def temperature(self) -> torch.Tensor:
        if self.log_temperature is None:
            return torch.tensor(self.cfg.temperature)
        return self.log_temperature.exp().clamp(self.cfg.min_temperature, self.cfg.max_temperature).squeeze(0)

    def random_negative_ids(self, device: torch.device) -> torch.Tensor:
        """The next call's uniform non-reserved ids, identical on every rank (same seed, same call count)."""
        g = torch.Generator().manual_seed(RANDOM_NEGATIVE_SEED + self.num_calls)
        ids = torch.randint(NUM_SPECIAL_IDS, self.num_items, (self.cfg.num_random_negatives,), generator=g)
        return ids.to(device)

    def log_expected_count(self, cand_ids: torch.Tensor, num_in_batch: int) -> torch.Tensor:
        """log q(c) of the logQ correction: expected draws of each candidate from both samplers."""
        in_batch = num_in_batch * self.item_log_prob[cand_ids].double().exp()
        uniform = self.cfg.num_random_negatives / max(1, self.num_items - NUM_SPECIAL_IDS)
        return (in_batch + uniform).log().float()

    def forward(
        self,
        user_out: torch.Tensor,
        target_ids: torch.Tensor,
        item_embeddings: Callable[[torch.Tensor], torch.Tensor],
        exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """user_out [N, E], target_ids [N] -> (loss, {"temperature", "count"}). ``exclude``: (target row, item id)
        pairs sorted by row, items that are no candidate for that row (``PackedBatch.items_before``)."""
        if self.cfg.negatives == "full":
            return self._full_softmax(user_out, target_ids, item_embeddings, exclude)
        device = user_out.device
        _, world = dist_info()
        gather = world > 1 and self.cfg.gather_negatives
        positives = item_embeddings(target_ids)
        n = user_out.shape[0]
        counts = target_counts(n, device)
        global_count = sum(counts)

        cand, cand_ids, offset = positives, target_ids, 0
        if gather:
            cand, cand_ids, offset = gather_candidates(positives, target_ids, counts)
        if self.cfg.num_random_negatives > 0:
            rand_ids = self.random_negative_ids(device)
            self.num_calls += 1
            cand = torch.cat([cand, item_embeddings(rand_ids)])
            cand_ids = torch.cat([cand_ids, rand_ids])

        logits, temperature = self._scores(user_out, cand)
        if self.cfg.logq_correction:
            logits = logits - self.log_expected_count(cand_ids, global_count if gather else n)[None, :]
        pos_col = offset + torch.arange(n, device=device)
        if self.cfg.mask_false_negatives:
            logits = mask_same_item(logits, cand_ids, target_ids, pos_col)
        if exclude is not None:  # a candidate column holding an item excluded for that row
            rows, items = exclude
            stride = self.num_items
            cand_keys = torch.arange(n, device=device)[:, None] * stride + cand_ids[None, :]
            logits = logits.masked_fill(torch.isin(cand_keys, rows * stride + items), float("-inf"))
        loss_sum = F.cross_entropy(logits, pos_col, reduction="sum")
        loss = loss_sum * world / max(global_count, 1)

        return loss, self._stats(global_count, temperature)
