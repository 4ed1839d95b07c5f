"""The downstream training loop, shared by ranking and retrieval: accelerate + AdamW over in-memory tensors.

Samples are small dense tensors (ids, a few LUM features), so a TensorDataset and a seeded shuffle suffice.
``accelerate`` places the model (CPU without CUDA) and shards the batches over processes when launched with
``accelerate launch``; evaluation runs on the full evaluation set in every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from lum_dist.utils import seed_everything

Batch = dict[str, torch.Tensor]


def make_accelerator() -> Accelerator:
    return Accelerator(cpu=not torch.cuda.is_available())


def fit(model: torch.nn.Module, data: Batch, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor], *,
        epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
        accelerator: Accelerator) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of each epoch.

    A ragged last batch is dropped when there is more than one batch: batch norm (Dice) and in-batch
    negatives both want full batches."""
    seed_everything(seed)
    keys = sorted(data)
    n = len(data[keys[0]])
    loader = DataLoader(TensorDataset(*(data[k] for k in keys)), batch_size=batch_size, shuffle=True,
                        drop_last=n > batch_size, generator=torch.Generator().manual_seed(seed))
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model, optim, loader = accelerator.prepare(model, optim, loader)
    history = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for values in loader:
            loss = loss_fn(model, dict(zip(keys, values, strict=True)))
            optim.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optim.step()
            total, count = total + loss.item(), count + 1
        history.append(total / max(1, count))
    model.eval()
    return history


def batches(data: Batch, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """In-order evaluation batches on ``device``."""
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size].to(device) for k, v in data.items()}
