"""The pretraining loop (step 1, knowledge construction): data -> packed batch -> loss -> step -> checkpoint.

Read it top to bottom: ``pretrain(cfg)`` prepares the data (rank 0), builds the model under ZeRO,
restores the newest complete checkpoint, then runs a flat loop of micro-steps with logging, evaluation
(:mod:`lum_dist.eval.ranking`) and atomic checkpoints. Works under the ``deepspeed`` launcher,
``torchrun`` or plain ``python``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lum_dist.config import PretrainConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.loader import PackedLoader
from lum_dist.data.prepare import prepare
from lum_dist.data.schema import DatasetMeta
from lum_dist.eval.ranking import evaluate, item_log_prob
from lum_dist.losses import InfoNCE
from lum_dist.model import LUMConfig, LUMModel, flops_per_token, load_preset, param_counts
from lum_dist.train import checkpoint, parallelize
from lum_dist.train.monitor import MetricsLogger, Throughput, format_line, memory_gib, peak_flops
from lum_dist.utils import atomic_write_text, expand_source


class PretrainModule(nn.Module):
    """The LUM model and its loss in one module: what DeepSpeed wraps, shards and checkpoints."""

    def __init__(self, model: LUMModel, loss: InfoNCE):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model.forward_batch(batch)  # [T, E]: the user representation at every token
        has_target = batch.targets > 0  # condition tokens whose item is in the training vocabulary
        target_ids = batch.targets[has_target]
        return self.loss(out[has_target], target_ids, self.model.item_embeddings)


def model_config_for(cfg: PretrainConfig, meta: DatasetMeta) -> LUMConfig:
    """The preset's architecture with embedding tables sized from the dataset's vocabularies."""
    return load_preset(
        cfg.model.preset,
        num_items=meta.num_items,
        cond_vocab_sizes=meta.cond_vocab_sizes(),
        num_numeric=len(meta.numeric_fields),
        **cfg.model.overrides,
    )


# ---------------------------------------------------------------------------------------------
# the loop


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    rank, world, device = parallelize.init_distributed()
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    data_path = Path(cfg.data.path)
    run_config = {"pretrain": asdict(cfg), "world_size": world}

    # Data: rank 0 prepares (or finds) the dataset, the others wait for it.
    if rank == 0:
        prepare(expand_source(cfg.data.prepare), data_path)
    dist.barrier()
    meta = DatasetMeta.load(data_path / "meta.json")

    torch.manual_seed(cfg.train.seed)
    model_cfg = model_config_for(cfg, meta)
    ds_config = parallelize.deepspeed_config(cfg)

    def make_module() -> PretrainModule:
        log_q = item_log_prob(data_path, meta.num_items) if cfg.loss.logq_correction else None
        return PretrainModule(LUMModel(model_cfg), InfoNCE(cfg.loss, meta.num_items, log_q))

    module = parallelize.build_model(make_module, ds_config)
    if cfg.train.activation_checkpointing:
        module.model.gradient_checkpointing_enable()
    engine = parallelize.build_engine(module, cfg, ds_config)

    loader = PackedLoader(data_path, cfg.data, split="train", rank=rank, world_size=world)
    start_step = 0
    resume_from = _resume_path(cfg, ckpt_root)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
        if rank == 0:
            print(f"[lum-dist] resumed from {resume_from} at step {start_step}")

    logger = MetricsLogger(out_dir, run_config, cfg.logging.wandb_project, cfg.logging.wandb_mode,
                           cfg.logging.run_name, enabled=rank == 0)
    fpt = flops_per_token(model_cfg, cfg.data.max_seq_len)
    meter = Throughput(fpt, peak_flops(device, parallelize.use_bf16(cfg)), world)
    if rank == 0:
        counts = module.model.num_parameters() if cfg.train.zero_stage != 3 else None
        print(f"[lum-dist] {world} rank(s) on {device.type}, preset {cfg.model.preset}, "
              f"{counts or 'sharded'} parameters, {fpt / 1e6:.1f} MFLOP/token, data {meta.name} "
              f"({meta.num_users} users, {meta.num_items} item ids)")

    die_at = int(os.environ.get("LUM_FAULT_KILL_DURING_SAVE_AT_STEP", "-1"))  # fault-injection hook for tests
    batches = iter(loader)
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    local_tokens, loss_sum, final_eval = 0, torch.zeros((), device=device), {}
    engine.train()
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        for _ in range(cfg.train.grad_accum):
            batch = next(batches).to(device, non_blocking=True)
            loss, stats = engine(batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach() / cfg.train.grad_accum
            local_tokens += batch.num_real_tokens  # tokens/s and MFU count useful work only
        bar.update(1)
        tokens = torch.tensor([local_tokens], device=device, dtype=torch.float64)
        dist.all_reduce(tokens)  # cheap scalar; keeps the throughput meter global
        meter.step(int(tokens.item()))
        local_tokens = 0

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            dist.all_reduce(loss_sum)
            n = cfg.train.log_every if step % cfg.train.log_every == 0 else (step - start_step) % cfg.train.log_every
            metrics = {"loss": (loss_sum / world / max(1, n)).item(), "lr": engine.get_lr()[0],
                       "temperature": float(stats["temperature"]), "mem_gib": memory_gib(device),
                       **meter.report()}
            loss_sum.zero_()
            if rank == 0:
                bar.write(format_line(step, cfg.train.max_steps, metrics))
            logger.log(step, metrics)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            _log_eval(evaluate(module.model, data_path, meta, cfg, device), step, logger, bar, rank)
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.max_steps:
            checkpoint.save(engine, ckpt_root, step, {"step": step, "loader": loader.state_dict()}, run_config,
                            cfg.train.keep_last, die_during_save=step == die_at)
    bar.close()
    final_eval = evaluate(module.model, data_path, meta, cfg, device)
    _log_eval(final_eval, cfg.train.max_steps, logger, None, rank)
    logger.close()
    if rank == 0:
        tokens_per_step = cfg.data.token_budget * cfg.data.rows_per_batch * cfg.train.grad_accum * world
        summary = {"eval": final_eval, "params": param_counts(model_cfg), "flops_per_token": fpt,
                   "max_steps": cfg.train.max_steps, "tokens_budgeted": tokens_per_step * cfg.train.max_steps,
                   "world_size": world, "preset": cfg.model.preset, "max_seq_len": cfg.data.max_seq_len}
        atomic_write_text(out_dir / "result.json", json.dumps(summary, indent=2, sort_keys=True))
    return final_eval


def _resume_path(cfg: PretrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return checkpoint.find_resume_checkpoint(ckpt_root)
    path = Path(cfg.train.resume)
    if not (path / "checkpoint.json").is_file():
        raise FileNotFoundError(f"train.resume={path}: not a complete checkpoint (no checkpoint.json)")
    return path


def _log_eval(result: dict[str, float], step: int, logger: MetricsLogger, bar, rank: int) -> None:
    if rank == 0:
        line = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items()))
        (bar.write if bar is not None else print)(f"[eval step {step}] {line}")
    logger.log(step, result)
