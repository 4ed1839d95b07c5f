"""Everything DeepSpeed: process group, ZeRO config, model construction under ZeRO-3, the engine, and reading
the fp32 weights back out of a checkpoint's shards.

This is the only module that imports DeepSpeed; the model knows nothing of it. DeepSpeed is imported inside
the functions that use it: it picks its accelerator when first imported, which must come after
:func:`init_distributed` has set ``DS_ACCELERATOR`` (and keeps it out of the start-up of every command).
On the CPU (laptops, CI) the same path runs with ``DS_ACCELERATOR=cpu``, the gloo backend and fp32.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lum_dist.config import PretrainConfig


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group under any launcher (deepspeed, torchrun, or plain python).

    Returns (rank, world_size, device)."""
    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A single process started with plain `python` has no launcher variables: provide them.
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"

    import importlib

    import deepspeed

    # By module path: the attribute `deepspeed.comm.torch` is the torch package itself (star import).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    # DeepSpeed calls these torch collectives by their deprecated names at every ZeRO step; the warnings are
    # not the user's to act on and bury the progress bar (hundreds per run).
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                            r"deprecated", FutureWarning)
    if on_cpu():
        # DeepSpeed compiles a shared-memory all-reduce op on first CPU use (~40 s); gloo does not need it.
        ds_torch_comm.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend="nccl")
        device = torch.device("cuda", local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def close_distributed(barrier: bool = True) -> None:
    """Barrier, then destroy the default process group through DeepSpeed's comm layer (which also drops the groups
    DeepSpeed keeps beside torch's), so a later :func:`init_distributed` in the same process starts afresh.
    ``barrier=False`` on the way out of a failure: the other ranks may never reach one."""
    import deepspeed.comm as ds_comm

    if barrier:
        torch.distributed.barrier()  # no rank tears down while another still talks to it
    ds_comm.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_bf16(cfg: PretrainConfig) -> bool:
    if cfg.train.precision == "auto":
        return not on_cpu()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the run config (one place, no separate JSON file)."""
    t = cfg.train
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        "overlap_comm": not on_cpu(),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if t.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e7,
            stage3_param_persistence_threshold=1e5,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu()}
    if t.offload_params:
        if t.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu()}
    return {
        "train_micro_batch_size_per_gpu": 1,  # one packed batch (rows_per_batch rows) per micro-step
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_optimization": zero,
        # torch AdamW under ZeRO; DeepSpeedCPUAdam only when asked (it compiles an op on first use).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": t.cpu_adam,
        "steps_per_print": 10**9,  # the trainer prints its own log line
        "wall_clock_breakdown": False,
    }


def build_model(make_model: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """Build the model; under ZeRO-3 each rank materialises only its own shard of every parameter.

    ``deepspeed.zero.Init`` partitions each submodule's parameters as soon as it is built, so a 7B model
    never exists whole on one rank. Weight init of a partitioned parameter would be a no-op (the model's own
    ``post_init`` runs after its layers are partitioned), so every module is re-initialised with its parameters
    gathered (rank 0 writes, the others receive) by the ``_init_weights`` of the innermost module above it that
    has one: the LUM or SASRec model for its layers, whatever wraps it (the trainer's loss module) for the rest.
    """
    import deepspeed

    if ds_config["zero_optimization"]["stage"] != 3:
        return make_model()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = make_model()
    for module, init_fn in initialisers(model):
        with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                init_fn(module)
    return model


def initialisers(model: nn.Module) -> list[tuple[nn.Module, Callable[[nn.Module], None]]]:
    """(module with parameters of its own, the ``_init_weights`` of the innermost module above or at it that defines
    one): the modules' walk is outer first, so an inner model claims its own layers."""
    init_of: dict[int, Callable[[nn.Module], None]] = {}
    for owner in model.modules():
        init_fn = getattr(owner, "_init_weights", None)
        if callable(init_fn):
            init_of.update((id(m), init_fn) for m in owner.modules())
    return [(m, init_of[id(m)]) for m in model.modules()
            if id(m) in init_of and next(m.parameters(recurse=False), None) is not None]


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False, lr: float = 1e-3,
                 hidden_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: which parameters decay and which learning rate each takes.

    Decay weight matrices only: embedding tables (unless ``decay_embeddings``), norms, biases and the
    temperature are not regularised. Tables are rows looked up sparsely: decaying every row every step
    shrinks the rare items' rows that get few gradients, the opposite of what a recommender wants.

    ``hidden_lr_scale`` multiplies the learning rate of the matrices that read the hidden stream (every
    ``nn.Linear`` but one marked ``reads_token_features``, LUM's input projection): Adam moves every entry of
    such a matrix by about ``lr`` per step, so its output moves about ``lr x width``; muP's rule for Adam
    (Yang et al. 2022) keeps that per-step change the same across widths with ``lr x base_width / width``.
    Tables and the input projection keep ``lr`` (their fan-in does not grow with width).
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = {id(m.weight) for m in model.modules()
              if isinstance(m, nn.Linear) and not getattr(m, "reads_token_features", False)}
    split_hidden = hidden_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}  # (decays, hidden lr) -> params
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape in ds_shape
        is_matrix = len(shape) >= 2 and (decay_embeddings or id(p) not in tables)
        groups.setdefault((is_matrix, split_hidden and id(p) in hidden), []).append(p)
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0,
             "lr": lr * (hidden_lr_scale if key[1] else 1.0)}
            for key in [(True, True), (True, False), (False, True), (False, False)] if key in groups]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio`` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(module: nn.Module, cfg: PretrainConfig, ds_config: dict[str, Any], max_steps: int,
                 hidden_lr_scale: float = 1.0):
    """Wrap ``module`` in a DeepSpeed engine with AdamW (groups: :func:`param_groups`) and the warmup-cosine
    schedule over ``max_steps``."""
    import deepspeed

    o = cfg.optim
    groups = param_groups(module, o.weight_decay, o.decay_embeddings, o.lr, hidden_lr_scale)
    if cfg.train.cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    else:
        fused = not on_cpu() and not cfg.train.offload_optimizer
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, max_steps, o.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict of a (possibly ZeRO-3 sharded) engine on rank 0; None on other ranks."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().float().cpu() for k, v in module.state_dict().items()} if engine.global_rank == 0 else None
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if engine.global_rank == 0:
                out[name] = p.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        if engine.global_rank == 0:
            out[name] = b.detach().cpu().clone()
    return out if engine.global_rank == 0 else None


def fp32_state_dict(ds_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the module saved in a DeepSpeed checkpoint folder, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage >= 1:  # sharded fp32 master weights: DeepSpeed's converter gathers them
        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    # ZeRO off: one replica of the module's weights, in DeepSpeed's own (pickle) file
    state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}
