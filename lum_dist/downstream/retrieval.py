"""Two-tower retrieval with in-batch softmax, with and without the LUM generic ("*") user output.

User tower: user id embedding + masked mean of the recent behaviours (item + attribute embeddings)
[+ the L2-normalised LUM output, projected]; item tower: item id + attribute embeddings [+ the item's
L2-normalised LUM item embedding, projected, when ``lum_item_tower``: the LUM output lives in that space, and
without it the tower cannot relate the output to items never seen as training targets]. Both end in an MLP
and are L2-normalised; training is softmax over the in-batch items at a fixed temperature (a negative equal
to the positive item is masked), logQ-corrected by default with the items' frequency among the training
targets (in-batch candidates are drawn by popularity: uncorrected, the towers learn to rank popular items
low, below a popularity baseline in full ranking). Evaluation ranks every real item for each test
request, the user's history excluded (``lum_dist.eval.metrics.rank_of_targets``), and reports Recall@K and NDCG@K.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lum_dist.data.prepare import item_log_prob
from lum_dist.data.schema import NUM_SPECIAL_IDS, PAD_ID
from lum_dist.downstream.config import RetrievalConfig
from lum_dist.downstream.samples import Requests
from lum_dist.downstream.train import Batch, batches, fit, make_accelerator
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets


def tower(in_dim: int, cfg: RetrievalConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.out_dim))


class TwoTower(nn.Module):
    def __init__(self, num_users: int, num_items: int, num_attrs: int, lum_dim: int, cfg: RetrievalConfig,
                 lum_items: torch.Tensor | None = None):
        super().__init__()
        d = cfg.embed_dim
        self.user = nn.Embedding(num_users, d)
        self.hist_item = nn.Embedding(num_items, d, padding_idx=PAD_ID)
        self.hist_attr = nn.Embedding(num_attrs, d, padding_idx=PAD_ID)
        self.item = nn.Embedding(num_items, d)
        self.attr = nn.Embedding(num_attrs, d)
        self.lum_proj = nn.Linear(lum_dim, d) if lum_dim else None
        self.user_tower = tower(3 * d if lum_dim else 2 * d, cfg)
        # fixed LUM item embeddings [num_items, E] (a buffer: they move with the model, never train)
        self.register_buffer("lum_items", lum_items, persistent=False)
        self.lum_item_proj = nn.Linear(lum_items.shape[1], d) if lum_items is not None else None
        self.item_tower = tower(3 * d if lum_items is not None else 2 * d, cfg)

    def encode_users(self, b: Batch) -> torch.Tensor:
        mask = (b["hist_items"] != PAD_ID).unsqueeze(-1).float()
        hist = self.hist_item(b["hist_items"]) + self.hist_attr(b["hist_attrs"])
        pooled = (hist * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        parts = [self.user(b["user_idx"]), pooled]
        if self.lum_proj is not None:
            parts.append(self.lum_proj(b["lum"]))
        return F.normalize(self.user_tower(torch.cat(parts, -1)), dim=-1)

    def forward(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, target items) of a training batch, through ``forward`` so that a DDP wrapper
        (``accelerate launch``, or any live process group) synchronises the gradients."""
        return self.encode_users(b), self.encode_items(b["target"], b["target_attr"])

    def encode_items(self, items: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        parts = [self.item(items), self.attr(attrs)]
        if self.lum_item_proj is not None:
            parts.append(self.lum_item_proj(self.lum_items[items]))
        return F.normalize(self.item_tower(torch.cat(parts, -1)), dim=-1)


def request_tensors(req: Requests, item_attr: np.ndarray, lum_generic: np.ndarray | None) -> Batch:
    t = {"user_idx": torch.from_numpy(req.user_idx), "hist_items": torch.from_numpy(req.hist_items),
         "hist_attrs": torch.from_numpy(req.hist_attrs), "target": torch.from_numpy(req.target),
         "target_attr": torch.from_numpy(item_attr[req.target])}
    if lum_generic is not None:
        t["lum"] = F.normalize(torch.from_numpy(lum_generic), dim=-1)
    return t


def target_log_freq(targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """log of each item's share of the training targets (add-one smoothed), for the logQ correction."""
    counts = torch.bincount(targets, minlength=num_items).double() + 1.0
    return (counts / counts.sum()).log().float()


def in_batch_softmax_loss(model: nn.Module, b: Batch, temperature: float,
                          log_q: torch.Tensor | None = None) -> torch.Tensor:
    users, items = model(b)
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - log_q.to(logits.device)[b["target"]][None, :]
    same = b["target"][:, None] == b["target"][None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(users), dtype=torch.bool, device=users.device), -torch.inf)
    return F.cross_entropy(logits, torch.arange(len(users), device=users.device))


def train_and_evaluate(cfg: RetrievalConfig, seed: int, num_users: int, item_attr: np.ndarray, num_attrs: int,
                       train: Batch, evaluation: Batch, eval_history: list[np.ndarray],
                       lum_items: np.ndarray | None = None, holdout: Batch | None = None,
                       patience: int = 2) -> dict[str, float]:
    """Fit one two-tower variant (LUM or not: whether ``train`` has "lum"; early-stopped on ``holdout``) and
    rank all items for ``evaluation``.

    ``lum_items`` [num_items, E]: LUM item embeddings for the item tower (None: not used)."""
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    num_items = len(item_attr)
    lum_table = F.normalize(torch.from_numpy(lum_items), dim=-1) if lum_items is not None else None
    model = TwoTower(num_users, num_items, num_attrs, train["lum"].shape[1] if "lum" in train else 0, cfg, lum_table)
    log_q = target_log_freq(train["target"], num_items) if cfg.logq_correction else None
    fitted = fit(model, train, lambda m, b: in_batch_softmax_loss(m, b, cfg.temperature, log_q), epochs=cfg.epochs,
                 batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
                 accelerator=accelerator, holdout=holdout, patience=patience)
    model = accelerator.unwrap_model(model)
    device = accelerator.device
    acc = RankingAccumulator(cfg.ks)
    with torch.no_grad():
        all_items = torch.arange(num_items, device=device)
        items = model.encode_items(all_items, torch.from_numpy(item_attr).to(device))
        start = 0
        for b in batches(evaluation, 1024, device):
            scores = model.encode_users(b) @ items.T
            history = [torch.from_numpy(h) for h in eval_history[start:start + len(scores)]]
            acc.update(rank_of_targets(scores, b["target"], history))
            start += len(scores)
    return {**retrieval_metrics(acc, cfg.ks), "train_loss": fitted.train_loss[fitted.best_epoch - 1],
            "best_epoch": fitted.best_epoch}


def retrieval_metrics(acc: RankingAccumulator, ks: list[int]) -> dict[str, float]:
    """Recall@K and NDCG@K (one relevant item per request) from accumulated ranks."""
    out = acc.compute()
    return {**{f"recall@{k}": out[f"hr@{k}"] for k in ks}, **{f"ndcg@{k}": out[f"ndcg@{k}"] for k in ks}}


def popularity_metrics(cfg: RetrievalConfig, data_path: str, num_items: int, req: Requests) -> dict[str, float]:
    """The popularity reference: every request ranks items by training frequency, history excluded."""
    scores = torch.from_numpy(item_log_prob(data_path, num_items))
    scores[:NUM_SPECIAL_IDS] = -torch.inf
    acc = RankingAccumulator(cfg.ks)
    for start in range(0, len(req.target), 1024):
        targets = torch.from_numpy(req.target[start:start + 1024])
        history = [torch.from_numpy(h) for h in req.history[start:start + 1024]]
        acc.update(rank_of_targets(scores.expand(len(targets), -1), targets, history))
    return {**retrieval_metrics(acc, cfg.ks), "train_loss": 0.0, "best_epoch": 0}
