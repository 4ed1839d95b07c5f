"""The downstream training loop, shared by ranking and retrieval: accelerate + AdamW over in-memory tensors.

Samples are small dense tensors (ids, a few LUM features), so a TensorDataset and a seeded shuffle suffice.
``accelerate`` places the model (CPU without CUDA) and shards the batches over processes when launched with
``accelerate launch``; evaluation runs on the full evaluation set in every process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from lum_dist.utils import seed_everything

Batch = dict[str, torch.Tensor]


def make_accelerator() -> Accelerator:
    return Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class FitResult:
    train_loss: list[float]  # mean training loss per epoch run
    holdout_loss: list[float]  # per epoch run; empty without a holdout
    best_epoch: int  # 1-based epoch whose weights the model holds at the end


def fit(model: torch.nn.Module, data: Batch, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor], *,
        epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int, accelerator: Accelerator,
        holdout: Batch | None = None, patience: int = 2) -> FitResult:
    """Train ``model`` in place.

    With ``holdout``, the loss on it is measured after every epoch; training stops after ``patience`` epochs
    without improvement and the model keeps the best epoch's weights (early stopping). A ragged last batch
    is dropped when there is more than one batch: batch norm (Dice) and in-batch negatives want full batches."""
    seed_everything(seed)
    keys = sorted(data)
    n = len(data[keys[0]])
    loader = DataLoader(TensorDataset(*(data[k] for k in keys)), batch_size=batch_size, shuffle=True,
                        drop_last=n > batch_size, generator=torch.Generator().manual_seed(seed))
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model, optim, loader = accelerator.prepare(model, optim, loader)
    result = FitResult([], [], epochs)
    best_state = None
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for values in loader:
            loss = loss_fn(model, dict(zip(keys, values, strict=True)))
            optim.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optim.step()
            total, count = total + loss.item(), count + 1
        sums = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum")
        result.train_loss.append(float(sums[0] / sums[1].clamp(min=1)))  # over every process's batches
        if holdout is None:
            continue
        result.holdout_loss.append(holdout_loss(model, holdout, loss_fn, batch_size, accelerator.device))
        if result.holdout_loss[-1] <= min(result.holdout_loss):
            result.best_epoch = epoch
            best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
        elif epoch - result.best_epoch >= patience:
            break
    if best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state)
    model.eval()
    return result


@torch.no_grad()
def holdout_loss(model: torch.nn.Module, data: Batch, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
                 batch_size: int, device: torch.device) -> float:
    """Mean loss over in-order batches (fixed, so epochs compare), in eval mode."""
    model.eval()
    n = len(next(iter(data.values())))
    total = sum(loss_fn(model, b).item() * len(next(iter(b.values()))) for b in batches(data, batch_size, device))
    return total / n


def split_holdout(data: Batch, group: torch.Tensor, fraction: float, seed: int) -> tuple[Batch, Batch | None]:
    """Hold out a seeded ``fraction`` of the groups (requests: a positive and its negatives stay together)."""
    if fraction <= 0:
        return data, None
    ids = torch.unique(group)
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    held = torch.isin(group, perm[: max(1, int(round(fraction * len(ids))))])
    return {k: v[~held] for k, v in data.items()}, {k: v[held] for k, v in data.items()}


def batches(data: Batch, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """In-order evaluation batches on ``device``."""
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size].to(device) for k, v in data.items()}
