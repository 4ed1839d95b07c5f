"""Full-ranking evaluation of a trained model: every user's held-out item ranked among all items.

For each user with a held-out behaviour in the split (leave-one-out or temporal, see
:mod:`lum_dist.data.split`), the model reads the history before it plus one *generic* query token
(every condition field MASK, time gap unknown): the query carries nothing about the held-out item.
The output at that token is scored against the whole item table (cosine or dot, as in training);
items of the user's whole history are excluded, the target always stays a candidate. The popularity
baseline (training counts) is ranked the same way, over the same users and exclusions. The metrics
themselves are pure functions of tensors (:mod:`lum_dist.eval.metrics`).

With ``eval.attribute_query_weight`` > 0 (LUM; the final evaluation and ``launch/evaluate.py``) each user also
gets one query per value of the items' first attribute field (every category) in the same group-query pass,
and items are ranked by the generic query's probability of their value times their share under that value's
own query (``attribute_query_scores``), reported as ``attrq_*`` beside the generic metrics.

With ``eval.condition_query`` (LUM) each user is also asked with the held-out behaviour's own condition token
(e.g. its category, and its time gap), LUM's training task (next-condition-item), reported as ``cond_*``. It
knows something about the held-out item that a sequential recommender is not told: never compare it with
SASRec's numbers; it shows what the conditions and the history give when the condition is known at serving.

``evaluate`` runs inside the trainer (every rank, ZeRO-3 sharded or not) and also in one process on a
checkpoint (``evaluate_checkpoint``, ``launch/evaluate.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lum_dist.checkpoint import INFO, load_model, resolve_checkpoint
from lum_dist.config import PretrainConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.loader import eval_batches
from lum_dist.data.prepare import item_attribute_ids, item_log_prob
from lum_dist.data.schema import MASK_ID, NUM_SPECIAL_IDS, DatasetMeta
from lum_dist.eval.metrics import RankingAccumulator, attribute_query_scores, rank_of_targets
from lum_dist.model import LUMModel, SASRecModel
from lum_dist.utils import dist_info


def attribute_queries(meta: DatasetMeta, data_path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The queries of every value of the first item-attribute field (condition ids [V, F], other fields MASK)
    and each item's query index [num_items] (-1: its value has none, e.g. a reserved id)."""
    if not meta.item_cond_fields:
        raise ValueError(f"eval.attribute_query_weight: dataset {meta.name} has no item-attribute fields "
                         "(meta.json item_cond_fields is empty)")
    field = meta.item_cond_fields[0]
    values = np.arange(NUM_SPECIAL_IDS, meta.vocab_sizes[field])
    queries = np.full((len(values), len(meta.cond_fields)), MASK_ID, np.int64)
    queries[:, meta.cond_fields.index(field)] = values
    index = torch.from_numpy(item_attribute_ids(data_path, meta)[:, 0] - NUM_SPECIAL_IDS)
    index[:NUM_SPECIAL_IDS] = -1
    return queries, index.clamp(min=-1)


def as_scored(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """User outputs or item rows as the ranking scores them: float32, unit length under cosine similarity."""
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1) if similarity == "cosine" else x


def item_scoring_table(model: LUMModel | SASRecModel, similarity: str) -> torch.Tensor:
    """[num_items, E]: every item as scored, the reserved ids' rows zero (never ranked above a real item's match)."""
    items = as_scored(model.item_embeddings(None), similarity)
    items[:NUM_SPECIAL_IDS] = 0.0
    return items


@torch.no_grad()
def evaluate(model: LUMModel | SASRecModel, data_path: Path, meta: DatasetMeta, cfg: PretrainConfig,
             device: torch.device, split: str | None = None, attribute_query_weight: float = 0.0,
             condition_query: bool = False) -> dict[str, float]:
    """``{split}/hr@K``, ``ndcg@K``, ``mrr``, ``count``, the same with ``pop_`` for popularity and, with
    ``attribute_query_weight`` > 0 (LUM only; the trainer passes ``cfg.eval.attribute_query_weight`` to its final
    evaluation), with ``attrq_`` for the ranking by attribute queries (``attribute_query_scores``) and, with
    ``condition_query`` (LUM only), with ``cond_`` for the query carrying the held-out behaviour's own condition.
    A user's generic query and its other queries share one group-query pass.

    Every item is a candidate but the user's history (all of it, with ``eval.exclude_history``: a held-out item the
    user already had is then a miss). Each user is scored by exactly one rank; every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters collectively), padding with a repeat of its last batch. Works without
    a process group too (one process).
    """
    split = split or cfg.eval.split
    rank, world = dist_info()
    was_training = model.training
    model.eval()
    items = item_scoring_table(model, cfg.loss.similarity)
    popularity = torch.from_numpy(item_log_prob(data_path, meta.num_items)).to(device)
    popularity[:NUM_SPECIAL_IDS] = -float("inf")

    weight = attribute_query_weight
    if weight and not isinstance(model, LUMModel):
        raise ValueError("eval.attribute_query_weight: only LUM reads conditions (this model is SASRec)")
    if weight and cfg.loss.learnable_temperature:  # a checkpoint's run config is not re-checked by PretrainConfig
        raise ValueError("eval.attribute_query_weight: attribute queries score with the fixed loss.temperature; "
                         "this run learned its temperature")
    if condition_query and not isinstance(model, LUMModel):
        raise ValueError("eval.condition_query: only LUM reads conditions (this model is SASRec)")
    queries, query_of_item = None, None
    if weight:
        queries, query_of_item = attribute_queries(meta, data_path)
        query_of_item = query_of_item.to(device)  # indexes the query outputs, on the model's device
        value_of_item = query_of_item.clamp(min=0)  # the column of each item's value query (any, if none)
    first_attr = 1 + int(condition_query)  # each user's queries: generic, its own condition?, attribute values
    per_user = first_attr + (0 if queries is None else len(queries))
    acc, pop_acc, attr_acc, cond_acc = (RankingAccumulator(cfg.eval.ks) for _ in range(4))
    batches = eval_batches(data_path, meta, split, cfg.data.max_seq_len, cfg.eval.token_budget + per_user - 1,
                           max_users=cfg.eval.max_users, rank=rank,
                           world_size=world, item_attributes=cfg.data.item_attributes, extra_queries=queries,
                           condition_query=condition_query)
    last = one_token_batch(len(meta.cond_fields), len(meta.numeric_fields))
    no_items = torch.zeros(0, dtype=torch.long)
    while True:
        batch = next(batches, None)
        more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        if world > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            break
        real = batch is not None
        batch = (batch if real else last).to(device)
        last = batch
        out = model.forward_batch(batch)
        if not real:
            continue
        query_at = batch.query_index()  # each sequence's queries: its last per_user tokens, the generic first
        user = as_scored(out[query_at], cfg.loss.similarity).view(-1, per_user, items.shape[1])
        targets = batch.targets[query_at].view(-1, per_user)[:, 0]
        seen = batch.seen_items if cfg.eval.exclude_history else [no_items] * len(targets)
        logits = user[:, 0] @ items.T
        acc.update(rank_of_targets(logits, targets, seen))
        pop_acc.update(rank_of_targets(popularity.expand(len(targets), -1), targets, seen))
        if condition_query:
            cond_acc.update(rank_of_targets(user[:, 1] @ items.T, targets, seen))
        if weight:
            # Item i's logit under its own value's query: [B, N, E] (fine for eval batches of 10^4 items).
            own = (user[:, first_attr:][:, value_of_item] * items).sum(-1) / cfg.loss.temperature
            generic = (logits / cfg.loss.temperature).index_fill_(
                1, torch.arange(NUM_SPECIAL_IDS, device=device), -math.inf)
            scores = attribute_query_scores(generic, own, query_of_item, weight)
            attr_acc.update(rank_of_targets(scores, targets, seen))
    model.train(was_training)
    result = {f"{split}/{k}": v for k, v in acc.all_reduce().compute().items()}
    result.update({f"{split}/pop_{k}": v for k, v in pop_acc.all_reduce().compute().items()})
    if weight:
        result.update({f"{split}/attrq_{k}": v for k, v in attr_acc.all_reduce().compute().items()})
    if condition_query:
        result.update({f"{split}/cond_{k}": v for k, v in cond_acc.all_reduce().compute().items()})
    return result


def one_token_batch(num_cond_fields: int, num_numeric: int) -> PackedBatch:
    """A one-token batch for a rank that has run out of eval users but must join ZeRO-3's collective gathers."""
    z = torch.zeros(1, dtype=torch.long)
    return PackedBatch(
        item_ids=z, cond_ids=torch.full((1, num_cond_fields), MASK_ID), token_type=z, positions=z, time_gaps=z,
        targets=z, cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1,
        num_queries=torch.ones(1, dtype=torch.int32), row_splits=torch.tensor([0, 1], dtype=torch.int32),
        token_budget=1, user_ids=[""], numeric=torch.zeros(1, num_numeric) if num_numeric else None,
    )


def evaluate_checkpoint(checkpoint: Path, splits: list[str], max_users: int = 0, ks: list[int] | None = None,
                        attribute_query_weight: float = 0.0, condition_query: bool = False,
                        max_seq_len: int = 0) -> dict[str, Any]:
    """Consolidate a (ZeRO-sharded) checkpoint on the CPU and evaluate it on ``splits`` in one process (with
    ``attribute_query_weight`` > 0, also by attribute queries; with ``condition_query``, also by the held-out
    behaviour's own condition). ``max_seq_len`` > 0 reads that many tokens of history instead of the run's
    (e.g. to measure how much of its context a model uses)."""
    (result,) = evaluate_checkpoint_at(checkpoint, [max_seq_len], splits, max_users, ks, attribute_query_weight,
                                       condition_query)
    return result


def evaluate_checkpoint_at(checkpoint: Path, max_seq_lens: list[int], splits: list[str], max_users: int = 0,
                           ks: list[int] | None = None, attribute_query_weight: float = 0.0,
                           condition_query: bool = False) -> list[dict[str, Any]]:
    """``evaluate_checkpoint`` at each history length of ``max_seq_lens`` (tokens; 0: the run's), the checkpoint
    consolidated once for all of them."""
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, meta = load_model(ckpt)
    step = json.loads((ckpt / INFO).read_text()).get("step")
    cfg.eval.max_users = max_users
    cfg.eval.ks = list(ks or cfg.eval.ks)
    run_seq_len, run_budget = cfg.data.max_seq_len, cfg.eval.token_budget
    results = []
    for max_seq_len in max_seq_lens:
        cfg.data.max_seq_len = max_seq_len or run_seq_len
        cfg.eval.token_budget = max(run_budget, cfg.data.max_seq_len)
        metrics: dict[str, float] = {}
        for split in splits:
            metrics.update(evaluate(model, Path(cfg.data.path), meta, cfg, torch.device("cpu"), split,
                                    attribute_query_weight, condition_query))
        results.append({"checkpoint": str(ckpt), "step": step, "dataset": meta.name, "preset": cfg.model.preset,
                        "max_seq_len": cfg.data.max_seq_len, "eval_condition": meta.eval_condition,
                        "similarity": cfg.loss.similarity, "metrics": metrics})
    return results
