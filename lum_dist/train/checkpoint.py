"""Checkpoints that survive a kill at any moment.

Layout (on a file system every rank sees)::

    <output_dir>/checkpoints/
      step_00000100/
        ds/...                 DeepSpeed shards: parameters and optimizer states of every rank
        trainer_rank0.pt ...   per rank: step, loader state, RNG states
        checkpoint.json        written last before the rename: the step and the run config
      latest                   text file naming the newest complete checkpoint, updated last
      best                     text file naming the checkpoint with the best validation metric (kept
                               whatever ``keep_last`` says; evaluation and export read it)

Every rank writes into ``.tmp_step_00000100``; after a barrier rank 0 renames it to its final name (one
atomic rename) and then rewrites ``latest`` atomically. A run killed mid-save leaves only a ``.tmp_*``
folder, which resume ignores and the next save removes, so the newest *complete* checkpoint always wins.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lum_dist.utils import atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "checkpoint.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / "checkpoint.json").is_file():
            return cand
    found = complete_checkpoints(root)
    return found[-1] if found else None


def find_best_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``best`` names, if it is complete."""
    best = root / "best"
    if best.is_file():
        cand = root / best.read_text().strip()
        if (cand / "checkpoint.json").is_file():
            return cand
    return None


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], run_config: dict[str, Any], keep_last: int,
         best: bool = False, die_during_save: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``best``: also point ``best``
    at it. Older checkpoints beyond ``keep_last`` are removed, except the best one."""
    rank = dist.get_rank()
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        for stale in root.glob(".tmp_*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a complete one at this step is rewritten identically
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{rank}.pt")
    if die_during_save:  # test hook: a crash after the shards are written, before the checkpoint is complete
        os.kill(os.getpid(), 9)
    dist.barrier()
    if rank == 0:
        atomic_write_text(tmp / "checkpoint.json", json.dumps({"step": step, "config": run_config}, indent=2))
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        if best:
            atomic_write_text(root / "best", final.name)
        keep = find_best_checkpoint(root)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_weights(engine, ckpt: Path) -> None:
    """Collective: restore only the model weights of ``ckpt`` (the best checkpoint, for the final evaluation)."""
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=DS_TAG, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the weights in {ckpt / DS_TAG}")


def load(engine, ckpt: Path) -> dict[str, Any]:
    """Collective: restore the engine (weights, optimizer, scheduler) and return this rank's trainer state."""
    rank = dist.get_rank()
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=DS_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt / DS_TAG}")
    state_file = ckpt / f"trainer_rank{rank}.pt"
    if not state_file.is_file():
        raise RuntimeError(
            f"{state_file} is missing: the checkpoint was written by a run with a different number of ranks"
        )
    state = torch.load(state_file, weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
