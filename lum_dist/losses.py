"""InfoNCE over items with in-batch negatives gathered from every data-parallel rank.

For each target (the output at a condition token, paired with the item of the same behaviour):

    logit(c) = sim(user, item_c) / temperature [- log q(c) with the logQ correction]

over the candidates c = the positives of ALL ranks (and ``num_random_negatives`` uniform ids shared
by all ranks), with false negatives (same item id as the positive, other than the positive itself)
masked out.

logQ correction (Yi et al., RecSys 2019): in-batch candidates are drawn in proportion to item
frequency, so an uncorrected softmax learns to push popular items down and ranks poorly over the
whole catalogue. ``q(c)`` is the expected number of times c is a candidate: ``B * p(c)`` for B
in-batch candidates plus ``R / num_real_items`` for R uniform negatives (one proposal mixing both).

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


class InfoNCE(nn.Module):
    def __init__(self, loss_cfg: LossConfig, num_items: int, item_log_prob: torch.Tensor | None = None):
        super().__init__()
        if loss_cfg.similarity not in ("cosine", "dot"):
            raise ValueError(f"loss.similarity: expected 'cosine' or 'dot', got {loss_cfg.similarity!r}")
        if loss_cfg.logq_correction and item_log_prob is None:
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
        self.num_calls = 0  # seeds the shared random negatives; restarts at 0 on resume (harmless)

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
        self, user_out: torch.Tensor, target_ids: torch.Tensor, item_embeddings: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """user_out [N, E], target_ids [N] -> (loss, {"temperature", "accuracy", "count"})."""
        device = user_out.device
        rank, world = dist_info()
        gather = world > 1 and self.cfg.gather_negatives
        positives = item_embeddings(target_ids)
        n = user_out.shape[0]
        if world > 1:
            counts_t = torch.tensor([n], device=device)
            parts = [torch.empty_like(counts_t) for _ in range(world)]
            dist.all_gather(parts, counts_t)
            counts = [int(c) for c in torch.cat(parts).tolist()]
        else:
            counts = [n]
        global_count = sum(counts)

        cand, cand_ids, offset = positives, target_ids, 0
        if gather:
            cand = _GatherWithGrad.apply(positives, counts, rank)
            cand_ids = all_gather_varlen(target_ids, counts)
            offset = sum(counts[:rank])
        if self.cfg.num_random_negatives > 0:
            rand_ids = self.random_negative_ids(device)
            self.num_calls += 1
            cand = torch.cat([cand, item_embeddings(rand_ids)])
            cand_ids = torch.cat([cand_ids, rand_ids])

        user, cand = user_out.float(), cand.float()
        if self.cfg.similarity == "cosine":
            user, cand = F.normalize(user, dim=-1), F.normalize(cand, dim=-1)
        temperature = self.temperature().to(device)
        logits = user @ cand.T / temperature
        if self.cfg.logq_correction:
            logits = logits - self.log_expected_count(cand_ids, global_count if gather else n)[None, :]
        pos_col = offset + torch.arange(n, device=device)
        if self.cfg.mask_false_negatives:
            same = cand_ids[None, :] == target_ids[:, None]
            same[torch.arange(n, device=device), pos_col] = False
            logits = logits.masked_fill(same, float("-inf"))
        loss_sum = F.cross_entropy(logits, pos_col, reduction="sum")
        loss = loss_sum * world / max(global_count, 1)

        with torch.no_grad():
            correct = (logits.argmax(-1) == pos_col).sum().float() if n else torch.zeros((), device=device)
            if world > 1:
                dist.all_reduce(correct)
            stats = {
                "temperature": temperature.detach(),
                "accuracy": correct / max(global_count, 1),
                "count": torch.tensor(float(global_count), device=device),
            }
        return loss, stats
