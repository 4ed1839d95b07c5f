"""The pretraining loop (step 1, knowledge construction): data -> packed batch -> loss -> step -> checkpoint.

Read it top to bottom: ``pretrain(cfg)`` prepares the data (rank 0), builds the model under ZeRO,
restores the newest intact checkpoint, then runs a flat loop of micro-steps with logging, validation
(:mod:`lum_dist.train.evaluate`: model selection, early stopping) and atomic checkpoints, and finally
evaluates the selected model. Works under the ``deepspeed`` launcher,
``torchrun`` or plain ``python``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lum_dist import parallel
from lum_dist.checkpoint import (
    INFO,
    build_run_model,
    find_best_checkpoint,
    find_resume_checkpoint,
    model_config_for,
)
from lum_dist.config import ConfigError, PretrainConfig
from lum_dist.data.batch import ITEM_TOKEN, PackedBatch
from lum_dist.data.prepare import item_log_prob, load_meta, prepare
from lum_dist.data.schema import NUM_SPECIAL_IDS
from lum_dist.data.workers import DevicePrefetcher, train_loader
from lum_dist.losses import InfoNCE, view_contrast
from lum_dist.model import (
    LUMModel,
    SASRecConfig,
    SASRecModel,
    check_model_spec,
    enable_activation_checkpointing,
    flops_per_token,
    param_counts,
)
from lum_dist.train import checkpoint
from lum_dist.train.ema import WeightAverage
from lum_dist.train.evaluate import evaluate
from lum_dist.train.monitor import MetricsLogger, Throughput, format_line, memory_gib, peak_flops
from lum_dist.utils import atomic_write_text, expand_source


class PretrainModule(nn.Module):
    """The LUM model and its loss in one module: what DeepSpeed wraps, shards and checkpoints."""

    def __init__(self, model: LUMModel | SASRecModel, loss: InfoNCE):
        super().__init__()
        self.model, self.loss = model, loss
        width = model.config.item_emb_dim  # training only: the exported model predicts the next item
        self.future_head = nn.Linear(width, width, bias=False) if loss.cfg.future_head else None
        if self.future_head is not None:
            self._init_weights(self.future_head)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The future head starts at zero (the output itself); the model's layers are the model's own
        (:func:`lum_dist.parallel.build_model` calls this per module under ZeRO-3), the loss's stay as built."""
        if module is self.future_head:
            nn.init.zeros_(module.weight)

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.loss.cfg
        # [T, E]: the user representation at every token (and the previous-item skip's share of it)
        if cfg.future_weight > 0 and not cfg.future_reads_skip:
            out, skip = self.model.forward_batch(batch, return_skip=True)
        else:
            out, skip = self.model.forward_batch(batch), None
        # condition tokens whose item is in the training vocabulary, where the model has a state to predict from
        has_target = (batch.targets >= NUM_SPECIAL_IDS) & self.model.can_predict(batch)
        target_ids = batch.targets[has_target]
        targets = has_target.nonzero().squeeze(1)
        loss, stats = self._predict(batch, out, targets, targets)
        if cfg.item_token_weight > 0:
            source, target = item_token_targets(batch, has_target)
            loss = loss + cfg.item_token_weight * self._predict(batch, out, source, target)[0]
        if cfg.future_weight > 0:
            source, target = future_targets(batch, has_target, cfg.future_offset)
            future_out = out if skip is None else out - skip
            if self.future_head is not None:
                future_out = future_out + self.future_head(future_out)
            loss = loss + cfg.future_weight * self._predict(batch, future_out, source, target)[0]
        if cfg.view_contrast_weight > 0 and self.training:  # a second pass: fresh dropout, a second view
            other_view = self.model.forward_batch(batch)[has_target]
            loss = loss + cfg.view_contrast_weight * view_contrast(
                out[has_target], other_view, target_ids, cfg.view_contrast_temperature)
        return loss, stats

    def _predict(self, batch: PackedBatch, out: torch.Tensor, source: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the outputs at the ``source`` tokens for the items of the ``target`` tokens; under
        ``exclude_seen`` the items before each target token (itself excepted) are no candidates for it."""
        seen = batch.items_before(target) if self.loss.cfg.exclude_seen else None
        return self.loss(out[source], batch.targets[target], self.model.item_embeddings, seen)


def item_token_targets(batch: PackedBatch, has_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(item tokens, the condition tokens right after them): every target condition token whose previous
    token is an item token of the same sequence, i.e. every behaviour but a sequence's first. The item
    token's output is asked for the same item as that condition token's, without its condition."""
    return _targets_back(batch, has_target, 1, batch.token_type == ITEM_TOKEN)


def future_targets(batch: PackedBatch, has_target: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition tokens, the condition tokens ``offset`` behaviours later in the same sequence), both with a
    target: the first's output is also asked for the second's item (under ``exclude_seen`` the items between them
    are no candidates for it: they are before the target)."""
    return _targets_back(batch, has_target, 2 * offset, has_target)  # two tokens per behaviour


def _targets_back(batch: PackedBatch, has_target: torch.Tensor, back: int,
                  source_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) token pairs: every target token with a token ``back`` places before it in the same
    sequence, where ``source_ok`` holds."""
    target = has_target.nonzero().squeeze(1)
    target = target[batch.positions[target] >= back]  # positions restart at 0 in every sequence
    source = target - back
    keep = source_ok[source]
    return source[keep], target[keep]


# ---------------------------------------------------------------------------------------------
# run length and model selection


def plan_steps(cfg: PretrainConfig, tokens_per_epoch: int, world: int) -> tuple[int, int]:
    """(max_steps, eval_every) in optimizer steps. ``train.max_epochs`` / ``train.eval_every_epochs`` (> 0)
    count passes over the training tokens and win over the step counts, so one config fits any dataset size."""
    t = cfg.train
    steps_per_epoch = tokens_per_epoch / loader_capacity(cfg, world)
    max_steps = max(1, math.ceil(t.max_epochs * steps_per_epoch)) if t.max_epochs > 0 else t.max_steps
    eval_every = max(1, round(t.eval_every_epochs * steps_per_epoch)) if t.eval_every_epochs > 0 else t.eval_every
    return max_steps, eval_every


@dataclass
class BestTracker:
    """Model selection on the validation split: the best value of ``metric`` so far, and early stopping
    after ``patience`` evaluations without improvement (0: never stop early)."""

    metric: str
    patience: int = 0
    best: float | None = None  # None before the first evaluation
    best_step: int = 0
    evals_since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True if it is a new best."""
        if self.best is None or value > self.best:
            self.best, self.best_step, self.evals_since_best = value, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience


# ---------------------------------------------------------------------------------------------
# the loop


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train under any launcher (or none) and return the final evaluation. Also a Python call: a process group it
    had to make is closed again before it returns, so a notebook or sweep can call it twice in one process."""
    started = time.perf_counter()
    spec = check_model_spec(cfg.model.preset, cfg.model.overrides)  # before any data is read or process group made
    if isinstance(spec, SASRecConfig) and (cfg.eval.condition_query or cfg.eval.attribute_query_weight):
        key = "eval.condition_query" if cfg.eval.condition_query else "eval.attribute_query_weight"
        raise ConfigError(f"{key}: only LUM reads conditions; model.preset {cfg.model.preset!r} is SASRec", key)
    if isinstance(spec, SASRecConfig) and cfg.loss.item_token_weight:
        raise ConfigError(f"loss.item_token_weight: SASRec already predicts from its item tokens (model.preset "
                          f"{cfg.model.preset!r})", "loss.item_token_weight")
    if isinstance(spec, SASRecConfig) and cfg.loss.future_weight:
        raise ConfigError(f"loss.future_weight: LUM's condition tokens only (model.preset {cfg.model.preset!r} is "
                          f"SASRec)", "loss.future_weight")
    made_group = not dist.is_initialized()
    rank, world, device = parallel.init_distributed()
    try:
        # Rank 0 holds the output folder for the whole run: a second run on a live folder refuses at once.
        with checkpoint.hold_output_dir(Path(cfg.train.output_dir)):
            result = _pretrain(cfg, rank, world, device, started)
    except BaseException:
        if made_group:  # a caller that catches the error and calls again starts afresh too
            parallel.close_distributed(barrier=False)
        raise
    if made_group:  # an in-process caller (a notebook, a test, a sweep) is left as it came
        parallel.close_distributed()
    return result


def _pretrain(cfg: PretrainConfig, rank: int, world: int, device: torch.device,
              started: float) -> dict[str, Any]:
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    data_path = Path(cfg.data.path)
    run_config = {"pretrain": asdict(cfg), "world_size": world}

    # Data: rank 0 prepares (or finds) the dataset, the others wait for it.
    if rank == 0:
        prepare(expand_source(cfg.data.prepare), data_path)
    dist.barrier()
    meta = load_meta(data_path)
    loader = train_loader(data_path, cfg.data, rank=rank, world_size=world)  # data.num_workers processes
    max_steps, eval_every = plan_steps(cfg, loader.tokens_per_epoch, world)

    torch.manual_seed(cfg.train.seed)
    model_cfg = model_config_for(cfg, meta)
    ds_config = parallel.deepspeed_config(cfg)
    in_batch_logq = cfg.loss.negatives == "in_batch" and cfg.loss.logq_correction

    def make_module() -> PretrainModule:
        # On the device from the start: ZeRO-3 places parameters, not a buffer made from numpy.
        log_q = torch.from_numpy(item_log_prob(data_path, meta.num_items)).to(device) if in_batch_logq else None
        return PretrainModule(build_run_model(model_cfg, data_path, meta), InfoNCE(cfg.loss, meta.num_items, log_q))

    module = parallel.build_model(make_module, ds_config)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(module.model)
    engine = parallel.build_engine(module, cfg, ds_config, max_steps, cfg.optim.hidden_lr_scale(model_cfg.hidden_size))
    # After the engine: ZeRO-3 has moved each rank's shards into its flat buffers by then.
    average = WeightAverage(module.named_parameters(), cfg.optim.ema_decay) if cfg.optim.ema_decay else None

    def averaged() -> contextlib.AbstractContextManager:
        """The weights that are evaluated, selected and exported: the average if the run keeps one."""
        return average.swapped_in() if average is not None else contextlib.nullcontext()

    start_step, tracker, stopped = 0, BestTracker(cfg.eval.metric, cfg.train.early_stopping_patience), False
    loss_sum, steps_logged = torch.zeros((), device=device), 0  # this rank's loss since the last log line
    # Wall time and resumes carried across restarts, so result.json reports the whole run, not its last piece
    # (the work lost between the last checkpoint and a crash is not counted).
    seconds_before, resumes = 0.0, 0

    def wall_seconds() -> float:
        return seconds_before + time.perf_counter() - started

    resume_from = _resume_path(cfg, ckpt_root)
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        if average is not None:
            checkpoint.load_average(average, resume_from)
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
        tracker = BestTracker(**state["selection"])
        stopped = state["stopped"]
        # a resume between two log lines logs what the run would have, with the same random negatives
        logged_loss, steps_logged, module.loss.num_calls = resume_counters(state, resume_from, rank)
        loss_sum.fill_(logged_loss)
        seconds_before, resumes = float(state.get("wall_seconds", 0.0)), int(state.get("resumes", 0)) + 1
        if rank == 0:
            print(f"[lum-dist] resumed from {resume_from} at step {start_step}")

    logger = MetricsLogger(out_dir, run_config, cfg.logging.wandb_project, cfg.logging.wandb_mode,
                           cfg.logging.run_name, enabled=rank == 0)
    meter = Throughput(peak_flops(device, parallel.use_bf16(cfg)), world)
    if rank == 0:
        counts = module.model.num_parameters() if cfg.train.zero_stage != 3 else None
        print(f"[lum-dist] {world} rank(s) on {device.type}, preset {cfg.model.preset}, "
              f"{counts or 'sharded'} parameters, data {meta.name} ({meta.num_users} users, {meta.num_items} item "
              f"ids), {max_steps} steps = {max_steps * loader_capacity(cfg, world) / loader.tokens_per_epoch:.1f} "
              f"epochs, loss: {cfg.loss.negatives} negatives")

    def save(step: int, best: bool = False) -> None:
        state = {"step": step, "loader": batches.state_dict(), "selection": asdict(tracker), "stopped": stopped,
                 "log": {"loss_sum": float(loss_sum), "steps": steps_logged},
                 "random_negative_calls": module.loss.num_calls,
                 "wall_seconds": wall_seconds(), "resumes": resumes}
        checkpoint.save(engine, ckpt_root, step, state, run_config, cfg.train.keep_last, best=best,
                        die_during_save=step == die_at, average=average)

    die_at = int(os.environ.get("LUM_FAULT_KILL_DURING_SAVE_AT_STEP", "-1"))  # fault-injection hook for tests
    batches = DevicePrefetcher(loader, device)  # on CUDA: the next batch's copy overlaps the step
    bar = tqdm(total=max_steps, initial=start_step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    engine.train()
    step = start_step
    while step < max_steps and not stopped:
        step += 1
        t0 = time.perf_counter()
        local_tokens, local_flops, data_s = 0, 0.0, 0.0
        for _ in range(cfg.train.grad_accum):
            t_data = time.perf_counter()
            batch = next(batches)
            local_tokens += batch.num_real_tokens  # tokens/s and MFU count useful work only
            local_flops += model_cfg.train_flops(batch.real_seq_lens().numpy())
            batch = batches.to_device(batch)
            data_s += time.perf_counter() - t_data
            loss, stats = engine(batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach() / cfg.train.grad_accum
        steps_logged += 1
        if average is not None:
            average.update()
        work = torch.tensor([local_tokens, local_flops], device=device, dtype=torch.float64)
        dist.all_reduce(work)  # cheap; keeps the throughput meter global (and waits for the step)
        meter.step(int(work[0].item()), float(work[1].item()), time.perf_counter() - t0, data_s)
        bar.update(1)

        if step % cfg.train.log_every == 0 or step == max_steps:
            dist.all_reduce(loss_sum)
            metrics = {"loss": (loss_sum / world / steps_logged).item(), "lr": engine.get_lr()[0],
                       "temperature": float(stats["temperature"]), "mem_gib": memory_gib(device),
                       "epoch": loader.epochs_done, **meter.report()}
            loss_sum.zero_()
            steps_logged = 0
            if rank == 0:
                bar.write(format_line(step, max_steps, metrics))
            logger.log(step, metrics)
        improved = False
        if eval_every and (step % eval_every == 0 or step == max_steps):
            with averaged():
                result = evaluate(module.model, data_path, meta, cfg, device, cfg.eval.split)
            _log_eval(result, step, logger, bar, rank)
            improved = tracker.update(step, result[f"{cfg.eval.split}/{cfg.eval.metric}"])
            stopped = tracker.should_stop
            if stopped and rank == 0:
                bar.write(f"[lum-dist] early stop at step {step}: {cfg.eval.split}/{cfg.eval.metric} has not improved "
                          f"for {tracker.patience} evaluations (best {tracker.best:.4f} at step {tracker.best_step})")
        if improved or stopped or step == max_steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            save(step, best=improved)
    bar.close()

    # Final evaluation of the selected model (the best validation checkpoint, else the last weights).
    best = find_best_checkpoint(ckpt_root)
    if best is not None and tracker.best_step not in (0, step):
        checkpoint.load_weights(engine, best)
        if average is not None:
            checkpoint.load_average(average, best)
    if average is not None:  # training is over: the average stays in the model
        average.copy_to_model()
    final_eval: dict[str, float] = {}
    for split in cfg.eval.final_splits:
        final_eval.update(evaluate(module.model, data_path, meta, cfg, device, split, cfg.eval.attribute_query_weight,
                                   cfg.eval.condition_query))
    _log_eval(final_eval, step, logger, None, rank)
    logger.close()
    if rank == 0:
        summary = {"eval": final_eval, "params": param_counts(model_cfg),
                   "flops_per_token": flops_per_token(model_cfg, cfg.data.max_seq_len),
                   "max_steps": max_steps, "steps": step, "best_step": tracker.best_step or step,
                   "selection": {"split": cfg.eval.split, "metric": cfg.eval.metric, "best": tracker.best},
                   "stopped_early": stopped, "epochs": step * loader_capacity(cfg, world) / loader.tokens_per_epoch,
                   "tokens_budgeted": loader_capacity(cfg, world) * max_steps, "world_size": world,
                   "preset": cfg.model.preset, "max_seq_len": cfg.data.max_seq_len,
                   "wall_seconds": wall_seconds(), "resumes": resumes}
        atomic_write_text(out_dir / "result.json", json.dumps(summary, indent=2, sort_keys=True))
    return final_eval


def loader_capacity(cfg: PretrainConfig, world: int) -> int:
    """Token slots of one optimizer step: packed rows x token budget x accumulation x ranks."""
    return cfg.data.token_budget * cfg.data.rows_per_batch * cfg.train.grad_accum * world


def resume_counters(state: dict[str, Any], ckpt: Path, rank: int = 0) -> tuple[float, int, int]:
    """(running loss sum, steps in it, random-negative draws) of a trainer state. A checkpoint of a lum-dist
    before exact resumes lacks them: it resumes from zero (its first log line averages fewer steps, its random
    negatives differ from an uninterrupted run's), with a warning."""
    if "log" not in state or "random_negative_calls" not in state:
        if rank == 0:
            print(f"[lum-dist] warning: {ckpt} predates exact resumes (no running loss or negative counter): "
                  "resuming with both reset", flush=True)
        return 0.0, 0, 0
    return float(state["log"]["loss_sum"]), int(state["log"]["steps"]), int(state["random_negative_calls"])


def _resume_path(cfg: PretrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return find_resume_checkpoint(ckpt_root)
    path = Path(cfg.train.resume)
    if not (path / INFO).is_file():
        raise FileNotFoundError(f"train.resume={path}: not a complete checkpoint (no {INFO})")
    return path


def _log_eval(result: dict[str, float], step: int, logger: MetricsLogger, bar, rank: int) -> None:
    if rank == 0:
        line = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items()))
        (bar.write if bar is not None else print)(f"[eval step {step}] {line}")
    logger.log(step, result)
