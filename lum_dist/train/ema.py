"""An exponential moving average (EMA) of the model's weights, kept by every rank over the part it holds.

``torch.optim.swa_utils.AveragedModel`` keeps a deep copy of the whole module; under ZeRO-3 a rank holds only its
partition of each parameter (``param.ds_tensor``), so the average is kept over exactly those shards, nothing
gathered, and in fp32 (a bf16 average would round away updates of (1 - decay) x the step). With ZeRO off or at
stages 1-2 every rank holds (and averages) the whole tensors, identically.

The average is uniform over the first 1 / (1 - decay) updates and exponential after: early weights, still far
from trained, leave it quickly. Evaluation, the best checkpoint's selection and everything read from a checkpoint
(``lum_dist.checkpoint.load_model`` rebuilds the whole tensors from every rank's file) use the average when the
run keeps one (``optim.ema_decay``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def local_shard(param: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition (flat, the last rank's padded), else the tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class WeightAverage:
    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay: {decay} is not in (0, 1)")
        self.names, self.params = map(list, zip(*named_params, strict=True))
        self.decay = decay
        self.updates = 0
        self.sharded = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [local_shard(p).detach().float().clone() for p in self.params]

    def rate(self) -> float:
        """The newest weights' share in the update: 1 / n for the first 1 / (1 - decay) updates, then 1 - decay."""
        return max(1.0 - self.decay, 1.0 / self.updates)

    @torch.no_grad()
    def update(self) -> None:
        """After every optimizer step."""
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [local_shard(p).float() for p in self.params], self.rate())

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            local_shard(p).copy_(s)
        self._refresh_persistent()

    def _refresh_persistent(self) -> None:
        # ZeRO-3 keeps small parameters gathered between steps (ds_persist): forward reads their full tensors, not
        # the shards. Release and re-gather them, as DeepSpeed does after a step or a checkpoint load.
        persistent = [p for p in self.params if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(param_list=persistent)
            persistent[0].all_gather(param_list=persistent)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model inside the block, the trained ones back, bit for bit, after it.
        Collective under ZeRO-3 (every rank enters it together, as evaluation does)."""
        with torch.no_grad():
            held = [local_shard(p).clone() for p in self.params]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, h in zip(self.params, held, strict=True):
                    local_shard(p).copy_(h)
                self._refresh_persistent()

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and strings (``torch.load(weights_only=True)`` reads it back)."""
        return {"decay": self.decay, "updates": self.updates, "names": self.names, "shadow": self.shadow,
                "numels": [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.params],
                "sharded": self.sharded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names or [s.shape for s in state["shadow"]] != [s.shape for s in self.shadow]:
            raise ValueError("the saved weight average does not match this model's parameters (or its sharding)")
        self.updates = int(state["updates"])
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)
