"""Full-ranking evaluation of a trained model: every user's held-out item ranked among all items.

For each user with a held-out behaviour in the split (leave-one-out or temporal, see
:mod:`lum_dist.data.split`), the model reads the history before it plus one *generic* query token
(every condition field MASK, time gap unknown): the query carries nothing about the held-out item.
The output at that token is scored against the whole item table (cosine or dot, as in training);
items of the user's whole history are excluded, the target always stays a candidate. The popularity
baseline (training counts) is ranked the same way, over the same users and exclusions. The metrics
themselves are pure functions of tensors (:mod:`lum_dist.eval.metrics`).

``evaluate`` runs inside the trainer (every rank, ZeRO-3 sharded or not) and also in one process on a
checkpoint (``evaluate_checkpoint``, ``launch/evaluate.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lum_dist.checkpoint import INFO, load_model, resolve_checkpoint
from lum_dist.config import PretrainConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.loader import eval_batches
from lum_dist.data.prepare import item_log_prob
from lum_dist.data.schema import MASK_ID, NUM_SPECIAL_IDS, DatasetMeta
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets
from lum_dist.model import LUMModel, SASRecModel
from lum_dist.utils import dist_info


@torch.no_grad()
def evaluate(model: LUMModel | SASRecModel, data_path: Path, meta: DatasetMeta, cfg: PretrainConfig,
             device: torch.device, split: str | None = None) -> dict[str, float]:
    """``{split}/hr@K``, ``ndcg@K``, ``mrr``, ``count`` and the same with ``pop_`` for popularity.

    Each user is scored by exactly one rank; every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), padding with a repeat of its last batch. Works without a
    process group too (one process).
    """
    split = split or cfg.eval.split
    rank, world = dist_info()
    was_training = model.training
    model.eval()
    items = model.item_embeddings(None).float()  # [num_items, E]
    if cfg.loss.similarity == "cosine":
        items = torch.nn.functional.normalize(items, dim=-1)
    items[:NUM_SPECIAL_IDS] = 0.0
    popularity = torch.from_numpy(item_log_prob(data_path, meta.num_items)).to(device)
    popularity[:NUM_SPECIAL_IDS] = -float("inf")

    acc, pop_acc = RankingAccumulator(cfg.eval.ks), RankingAccumulator(cfg.eval.ks)
    batches = eval_batches(data_path, meta, split, cfg.data.max_seq_len, cfg.eval.token_budget,
                           max_users=cfg.eval.max_users, rank=rank, world_size=world,
                           item_attributes=cfg.data.item_attributes)
    last = one_token_batch(len(meta.cond_fields), len(meta.numeric_fields))
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
        query_at = batch.query_index()  # one query per sequence: its last token
        user = out[query_at].float()
        if cfg.loss.similarity == "cosine":
            user = torch.nn.functional.normalize(user, dim=-1)
        targets = batch.targets[query_at]
        acc.update(rank_of_targets(user @ items.T, targets, batch.seen_items))
        pop_acc.update(rank_of_targets(popularity.expand(len(targets), -1), targets, batch.seen_items))
    model.train(was_training)
    result = {f"{split}/{k}": v for k, v in acc.all_reduce().compute().items()}
    result.update({f"{split}/pop_{k}": v for k, v in pop_acc.all_reduce().compute().items()})
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


def evaluate_checkpoint(checkpoint: Path, splits: list[str], max_users: int = 0,
                        ks: list[int] | None = None) -> dict[str, Any]:
    """Consolidate a (ZeRO-sharded) checkpoint on the CPU and evaluate it on ``splits`` in one process."""
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, meta = load_model(ckpt)
    cfg.eval.max_users = max_users
    cfg.eval.ks = list(ks or cfg.eval.ks)
    metrics: dict[str, float] = {}
    for split in splits:
        metrics.update(evaluate(model, Path(cfg.data.path), meta, cfg, torch.device("cpu"), split))
    step = json.loads((ckpt / INFO).read_text()).get("step")
    return {"checkpoint": str(ckpt), "step": step, "dataset": meta.name, "preset": cfg.model.preset,
            "eval_condition": meta.eval_condition, "similarity": cfg.loss.similarity, "metrics": metrics}
