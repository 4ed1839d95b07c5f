"""DIN-style CTR ranking (Zhou et al. 2018) with and without the LUM step-2 outputs as features.

Inputs known at request time: the recent behaviours (item id + attribute) and the candidate (item id +
attribute). A local activation unit scores each behaviour against the candidate (no softmax, as in DIN); the
weighted sum, the candidate and the optional LUM features feed an MLP with Dice (or PReLU) activations.

Variants (the LUM outputs never train: they are fixed features):
    base        no LUM feature
    lum_direct  the user's output for the candidate's condition "<attr>=<value>" (else "*"), L2-normalised,
                projected to the embedding size
    lum_match   cos(that output, candidate's LUM item embedding) and generic output . item embedding,
                standardised with training statistics
    lum_both    both
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lum_dist.data.schema import PAD_ID
from lum_dist.downstream.config import RankingConfig
from lum_dist.downstream.samples import CTRSamples, Requests
from lum_dist.downstream.train import Batch, batches, fit, make_accelerator
from lum_dist.eval.metrics import auc, gauc, log_loss


class Dice(nn.Module):
    """Dice activation: a PReLU whose switch point follows the batch statistics of the input."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.bn(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
        return p * x + (1 - p) * self.alpha * x


class PReLU(nn.PReLU):
    """Per-channel PReLU over the last dimension (torch's takes channels from dim 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def activation(kind: str, dim: int) -> nn.Module:
    return Dice(dim) if kind == "dice" else PReLU(dim)


def mlp(sizes: list[int], kind: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation(kind, b)]
    return nn.Sequential(*layers)


@dataclass
class DINSpec:
    num_items: int
    num_attrs: int
    lum_dim: int  # 0: no direct LUM feature
    num_match: int  # 0: no LUM match features


class DIN(nn.Module):
    def __init__(self, spec: DINSpec, cfg: RankingConfig):
        super().__init__()
        d = cfg.embed_dim
        self.item = nn.Embedding(spec.num_items, d, padding_idx=PAD_ID)
        self.attr = nn.Embedding(spec.num_attrs, d, padding_idx=PAD_ID)
        self.attention = nn.Sequential(mlp([8 * d, cfg.attention_hidden], cfg.activation),
                                       nn.Linear(cfg.attention_hidden, 1))
        self.lum_proj = nn.Linear(spec.lum_dim, d) if spec.lum_dim else None
        width = 4 * d + (d if spec.lum_dim else 0) + spec.num_match
        self.mlp = nn.Sequential(mlp([width, *cfg.mlp], cfg.activation), nn.Linear(cfg.mlp[-1], 1))

    def forward(self, b: Batch) -> torch.Tensor:
        """Logits [B]."""
        hist = torch.cat([self.item(b["hist_items"]), self.attr(b["hist_attrs"])], -1)  # [B, N, 2d]
        cand = torch.cat([self.item(b["cand"]), self.attr(b["cand_attr"])], -1)  # [B, 2d]
        q = cand[:, None].expand_as(hist)
        w = self.attention(torch.cat([q, hist, q - hist, q * hist], -1)).squeeze(-1)  # [B, N]
        w = w * (b["hist_items"] != PAD_ID)
        interest = (w[..., None] * hist).sum(1)
        parts = [interest, cand]
        if self.lum_proj is not None:
            parts.append(self.lum_proj(b["lum_direct"]))
        if "lum_match" in b:
            parts.append(b["lum_match"])
        return self.mlp(torch.cat(parts, -1)).squeeze(-1)


@dataclass
class LumCTR:
    """LUM features of one set of CTR samples (from the query directory matching its history)."""

    conditional: np.ndarray  # [S, E] output for the candidate's condition (or "*")
    generic: np.ndarray  # [S, E] the user's "*" output
    cand_item: np.ndarray  # [S, E] the candidate's LUM item embedding
    coverage: float  # fraction of samples with a conditional output (the rest use "*")


def match_features(lum: LumCTR) -> np.ndarray:
    """[S, 2]: cos(conditional output, item) and generic output . item."""
    cos = F.cosine_similarity(torch.from_numpy(lum.conditional), torch.from_numpy(lum.cand_item), dim=-1)
    dot = (lum.generic * lum.cand_item).sum(-1)
    return np.stack([cos.numpy(), dot], -1).astype(np.float32)


def ctr_tensors(req: Requests, s: CTRSamples, item_attr: np.ndarray, variant: str,
                lum: LumCTR | None, match_stats: tuple[np.ndarray, np.ndarray] | None) -> Batch:
    t = {"hist_items": torch.from_numpy(req.hist_items[s.request]),
         "hist_attrs": torch.from_numpy(req.hist_attrs[s.request]),
         "cand": torch.from_numpy(s.cand), "cand_attr": torch.from_numpy(item_attr[s.cand]),
         "label": torch.from_numpy(s.label), "request": torch.from_numpy(s.request)}
    if variant in ("lum_direct", "lum_both"):
        t["lum_direct"] = F.normalize(torch.from_numpy(lum.conditional), dim=-1)
    if variant in ("lum_match", "lum_both"):
        mean, std = match_stats
        t["lum_match"] = torch.from_numpy((match_features(lum) - mean) / std)
    return t


def train_and_evaluate(variant: str, cfg: RankingConfig, seed: int, num_items: int, num_attrs: int,
                       train: Batch, evaluation: Batch, eval_users: np.ndarray, holdout: Batch | None = None,
                       patience: int = 2) -> dict[str, float]:
    """Fit one DIN variant on ``train`` (early-stopped on ``holdout``) and score it on ``evaluation``:
    AUC, GAUC, LogLoss."""
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    spec = DINSpec(num_items, num_attrs, lum_dim=train["lum_direct"].shape[1] if "lum_direct" in train else 0,
                   num_match=train["lum_match"].shape[1] if "lum_match" in train else 0)
    model = DIN(spec, cfg)

    def loss_fn(m: nn.Module, b: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(m(b), b["label"])

    fitted = fit(model, train, loss_fn, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                 weight_decay=cfg.weight_decay, seed=seed, accelerator=accelerator, holdout=holdout, patience=patience)
    model = accelerator.unwrap_model(model)
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(b)).cpu() for b in batches(evaluation, 4096, accelerator.device)])
    labels, p = evaluation["label"].numpy(), probs.double().numpy()
    return {"auc": auc(labels, p), "gauc": gauc(eval_users, labels, p), "logloss": log_loss(labels, p),
            "train_loss": fitted.train_loss[fitted.best_epoch - 1], "best_epoch": fitted.best_epoch}
