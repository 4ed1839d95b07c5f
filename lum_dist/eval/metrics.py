"""Evaluation metrics: full-ranking metrics for next-item prediction and retrieval, CTR metrics for ranking.

Ranking over the item table (pretraining eval, two-tower retrieval) works on 0-based *ranks*: the number of
candidate items placed before the single target (``rank_of_targets``). HR@K / Recall@K, NDCG@K and MRR are
means over per-query gains of those ranks; ``RankingAccumulator`` keeps their sums so that shards and ranks
can be merged exactly (sums, not means, are all-reduced).

CTR ranking models (downstream DIN) are scored with AUC (ties count 1/2), GAUC (per-user AUC weighted by the
user's impressions, users with a single class skipped) and log loss; all pure numpy functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lum_dist.data.schema import NUM_SPECIAL_IDS

# ---------------------------------------------------------------------------------------------
# full ranking over the item table


@torch.no_grad()
def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-based rank [B] of ``targets[b]`` among the candidate items of row b of ``scores`` [B, N].

    Candidates are the real items (ids >= NUM_SPECIAL_IDS) not listed in ``exclude[b]`` (e.g. the user's
    history). Ties are broken by item id (lower id first), as a stable sort would, so a constant scorer gets no
    credit. Targets that cannot be ranked (a reserved id, out of range, a NaN score, or an excluded item) are
    misses: rank = N, which is outside every cutoff.

    An excluded target is a miss, as in S3-Rec's and RecBole's full ranking: were it kept as the one candidate
    left of the history, a model that scores every item the user had on top would hit each target the user
    repeats for free (the label leaking through the exclusion; Yelp repeats 6.7 % of its test targets).
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],) or len(exclude) != scores.shape[0]:
        raise ValueError(f"rank_of_targets: scores {tuple(scores.shape)}, targets {tuple(targets.shape)} and "
                         f"{len(exclude)} exclude lists do not agree on the batch size")
    b, n = scores.shape
    targets = targets.to(scores.device).long()
    valid = (targets >= NUM_SPECIAL_IDS) & (targets < n)
    safe = torch.where(valid, targets, torch.full_like(targets, NUM_SPECIAL_IDS if n > NUM_SPECIAL_IDS else 0))
    target_score = scores.gather(1, safe[:, None])
    item_ids = torch.arange(n, device=scores.device)
    # Items ahead of the target among ALL items: higher scores, and ties with a lower id (rare: only the
    # rows that have a tie pay for that second pass) ...
    # (Counted as float sums of 0/1: 2x faster on the CPU than summing a bool tensor, exact below 2^24 items.)
    ranks = (scores - target_score).gt_(0).sum(1).long()
    at_least = (scores - target_score).ge_(0).sum(1).long()  # ahead + ties, the target included
    tied = (at_least - ranks > 1).nonzero().squeeze(1)
    if tied.numel():
        same = scores[tied] == target_score[tied]
        ranks[tied] += (same & (item_ids[None, :] < safe[tied, None])).sum(1)

    # ... minus those that are not candidates: the reserved ids and each row's excluded items (few per row).
    lengths = [len(e) for e in exclude]
    rows = torch.repeat_interleave(torch.arange(b, device=scores.device), torch.tensor(lengths, device=scores.device))
    ids = torch.cat([e.reshape(-1) for e in exclude]).to(scores.device).long() if sum(lengths) else rows
    if sum(lengths) and (ids.min() < 0 or ids.max() >= n):
        bad = ((ids < 0) | (ids >= n)).cpu()
        raise ValueError(f"rank_of_targets: exclude[{int(rows.cpu()[bad][0])}] holds an item id outside [0, {n})")
    excluded_target = torch.zeros(b, dtype=torch.bool, device=scores.device)
    excluded_target[rows[ids == safe[rows]]] = True
    reserved = torch.arange(min(NUM_SPECIAL_IDS, n), device=scores.device)
    rows = torch.cat([rows, torch.arange(b, device=scores.device).repeat_interleave(len(reserved))])
    ids = torch.cat([ids, reserved.repeat(b)])
    # An excluded id counts once per row (histories may repeat items); an excluded target's row is a miss anyway.
    key = torch.unique(rows * n + ids)
    rows, ids = key // n, key % n
    s, t = scores[rows, ids], target_score[rows, 0]
    ahead = ((s > t) | ((s == t) & (ids < safe[rows]))) & (ids != safe[rows])
    ranks = ranks - torch.bincount(rows[ahead], minlength=b)

    miss = ~valid | torch.isnan(target_score[:, 0]) | excluded_target
    return torch.where(miss, torch.full_like(ranks, n), ranks)


def segment_logsumexp(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[B, num_segments]: logsumexp of each row of ``x`` [B, N] over the columns of each segment (``segment``
    [N] in [0, num_segments)); -inf for an empty segment or one whose entries are all -inf."""
    index = segment.expand_as(x)
    peak = x.new_full((x.shape[0], num_segments), -math.inf).scatter_reduce(1, index, x, "amax")
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = x.new_zeros(x.shape[0], num_segments).index_add_(1, segment, (x - shift.gather(1, index)).exp())
    return total.log() + shift


@torch.no_grad()
def attribute_query_scores(generic: torch.Tensor, own_value: torch.Tensor, item_attr: torch.Tensor,
                           weight: float) -> torch.Tensor:
    """Log-scores [B, N] that rank each item with the query of its own attribute value ("knowledge querying").

    ``generic`` [B, N]: the generic query's logits over all items (-inf for non-candidates); ``own_value``
    [B, N]: item i's logit under the query of its attribute value ``item_attr[i]`` (-1: no such query, the
    generic logit stands in). With p the generic softmax and q_v the softmax of v's query over the items of v:

        log p(a(i)) + weight * log q_a(i)(i) + (1 - weight) * log p(i | a(i))

    The generic query chooses among attribute values, each value's own query ranks the items within it; weight
    0 is the generic ranking exactly.
    """
    no_query = int(item_attr.max()) + 1 if item_attr.numel() else 0  # a segment of its own
    segment = torch.where(item_attr >= 0, item_attr, no_query)
    log_p = generic.log_softmax(dim=-1)
    log_p_value = segment_logsumexp(log_p, segment, no_query + 1)[:, segment]
    own = torch.where((item_attr >= 0)[None, :] & torch.isfinite(generic), own_value, generic)
    within_own = own - segment_logsumexp(own, segment, no_query + 1)[:, segment]
    score = log_p_value + weight * within_own + (1.0 - weight) * (log_p - log_p_value)
    return torch.where(torch.isfinite(generic), score, -math.inf)


def hit_gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query HR@K = Recall@K with one relevant item: 1 if the target is in the top K."""
    return (ranks < k).double()


def ndcg_gain(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query NDCG@K with one relevant item (ideal DCG = 1): 1 / log2(rank + 2) inside the top K."""
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64,
                                                                                      device=ranks.device))


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Mean Recall@K over queries with a single relevant item each (``ranks`` from rank_of_targets)."""
    return hit_gain(ranks, k).mean().item()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    """Mean NDCG@K over queries with a single relevant item each (``ranks`` from rank_of_targets)."""
    return ndcg_gain(ranks, k).mean().item()


class RankingAccumulator:
    """Sums of HR@K, NDCG@K and reciprocal rank over batches (and ranks, via ``all_reduce``).

    ``compute()`` returns {"hr@K", "ndcg@K" for each K, "mrr", "count"}; rates are NaN while count is 0.
    MRR is uncut: a miss (rank N) adds 1/(N+1), which is negligible for any real item table.
    """

    def __init__(self, ks: Sequence[int] = (10,)):
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"RankingAccumulator: cutoffs must be positive integers, got {list(ks)}")
        self.ks = sorted(set(int(k) for k in ks))
        self.names = [f"hr@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks] + ["mrr", "count"]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)

    def update(self, ranks: torch.Tensor) -> RankingAccumulator:
        ranks = ranks.reshape(-1)
        parts = [hit_gain(ranks, k).sum() for k in self.ks] + [ndcg_gain(ranks, k).sum() for k in self.ks]
        parts += [(1.0 / (ranks.double() + 1.0)).sum(), torch.tensor(float(ranks.numel()), dtype=torch.float64,
                                                                      device=ranks.device)]
        self.sums = self.sums.to(ranks.device) + torch.stack(parts)
        return self

    def all_reduce(self) -> RankingAccumulator:
        """Sum the accumulated sums over the default process group (a no-op without one)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # NCCL only reduces CUDA tensors; a rank that saw no batch still holds a CPU tensor
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            sums = self.sums.to(device)
            dist.all_reduce(sums)
            self.sums = sums
        return self

    def compute(self) -> dict[str, float]:
        sums = self.sums.cpu().tolist()
        count = sums[-1]
        out = {name: (s / count if count else math.nan) for name, s in zip(self.names[:-1], sums[:-1], strict=True)}
        out["count"] = int(count)
        return out


# ---------------------------------------------------------------------------------------------
# CTR metrics (numpy)


def _grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, impressions) per group via the Mann-Whitney U statistic with average ranks for ties.

    Groups with a single class get AUC NaN."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    _, g = np.unique(groups, return_inverse=True)
    order = np.lexsort((scores, g))
    g_s, s_s, y_s = g[order], scores[order], labels[order]
    num_groups = int(g.max()) + 1 if len(g) else 0
    size = np.bincount(g_s, minlength=num_groups)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    # tie blocks: runs of equal (group, score); each gets the mean of its 1-based within-group positions
    new_block = np.ones(len(s_s), dtype=bool)
    new_block[1:] = (g_s[1:] != g_s[:-1]) | (s_s[1:] != s_s[:-1])
    block = np.cumsum(new_block) - 1
    pos = np.arange(len(s_s)) - start[g_s] + 1.0
    avg_rank = (np.bincount(block, weights=pos) / np.bincount(block))[block]
    pos_count = np.bincount(g_s, weights=y_s, minlength=num_groups)
    neg_count = size - pos_count
    rank_sum = np.bincount(g_s, weights=avg_rank * y_s, minlength=num_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc_g = (rank_sum - pos_count * (pos_count + 1) / 2) / (pos_count * neg_count)
    auc_g[(pos_count == 0) | (neg_count == 0)] = np.nan
    return auc_g, size


def _check_binary(labels: np.ndarray, scores: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"{name}: labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"{name}: labels must be 0/1; sample {int(np.argmax(bad))} has label {labels[bad][0].item()!r}")
    if np.isnan(scores).any():
        raise ValueError(f"{name}: sample {int(np.argmax(np.isnan(scores)))} has a NaN score")
    return labels, scores


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting 1/2."""
    labels, scores = _check_binary(labels, scores, "auc")
    value = _grouped_auc(np.zeros(len(labels), np.int64), labels, scores)[0]
    if len(value) == 0 or np.isnan(value[0]):
        raise ValueError("auc: needs at least one positive and one negative sample")
    return float(value[0])


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's impressions; single-class users skipped."""
    labels, scores = _check_binary(labels, scores, "gauc")
    users = np.asarray(users)
    if users.shape != labels.shape:
        raise ValueError(f"gauc: users {users.shape} and labels {labels.shape} differ in shape")
    per_user, size = _grouped_auc(users, labels, scores)
    keep = ~np.isnan(per_user)
    if not keep.any():
        raise ValueError("gauc: no user has both a positive and a negative sample")
    return float(np.sum(per_user[keep] * size[keep]) / np.sum(size[keep]))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to [eps, 1 - eps])."""
    labels, probs = _check_binary(labels, probs, "log_loss")
    if len(labels) == 0:
        raise ValueError("log_loss: no samples")
    p = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def format_table(metrics: dict[str, float], splits: list[str], ks: list[int]) -> str:
    """Markdown: one row per split and scorer (the model's generic query, its attribute queries and the held-out
    behaviour's own condition when evaluated, popularity), HR@K, NDCG@K, MRR, users."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    lines = ["| split | model | " + " | ".join(c.upper() for c in cols) + " | users |", "|---" * (len(cols) + 3) + "|"]
    for split in splits:
        for name, prefix in (("LUM", ""), ("LUM, attribute queries", "attrq_"),
                             ("LUM, told the held-out condition", "cond_"), ("popularity", "pop_")):
            if f"{split}/{prefix}count" not in metrics:
                continue
            cells = [f"{metrics[f'{split}/{prefix}{c}']:.4f}" for c in cols]
            lines.append(f"| {split} | {name} | " + " | ".join(cells) + f" | {metrics[f'{split}/count']} |")
    return "\n".join(lines)
