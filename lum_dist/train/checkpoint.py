"""Checkpoints that survive a kill at any moment, are checked before they are loaded, and unpickle nothing.

Layout (on a file system every rank sees)::

    <output_dir>/.lock         held (flock) by rank 0 while a run uses the folder: a second run refuses
    <output_dir>/checkpoints/
      step_00000100/
        ds/...                 DeepSpeed shards: parameters and optimizer states of every rank
        trainer_rank0.json ... per rank: step, loader state, selection state, flags, Python/numpy RNG states
        rng_rank0.pt ...       per rank: the torch (and CUDA) RNG states, plain tensors (weights_only=True)
        checkpoint.json        written last before the rename: the step, the run config and every file's size
      latest                   text file naming the newest complete checkpoint, updated last
      best                     text file naming the checkpoint with the best validation metric (kept
                               whatever ``keep_last`` says; evaluation and export read it)

Every rank writes into ``.tmp_step_00000100``; after a barrier rank 0 renames it to its final name (one
atomic rename) and then rewrites ``latest`` atomically. A run killed mid-save leaves only a ``.tmp_*``
folder, which resume ignores and the next save removes, so the newest *complete* checkpoint always wins.

Before a checkpoint is loaded its files are checked against the list in ``checkpoint.json`` (a missing or
truncated file is named). ``train.resume=auto`` skips a damaged checkpoint with a warning and resumes from
the newest intact one; an explicit ``train.resume=<dir>`` fails with the same message instead.
DeepSpeed's own files under ``ds/`` are still pickles that DeepSpeed loads (as is the ZeRO-off path of
:mod:`lum_dist.train.export`); everything lum-dist writes is JSON or plain tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lum_dist.utils import atomic_write_text, dist_info, folder_lock

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "ds"
INFO = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names it and the first missing or damaged file."""


def trainer_state_file(rank: int) -> str:
    return f"trainer_rank{rank}.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """This process's RNG states as (JSON-able: Python and numpy generators, tensors: torch CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (renamed into place: ``checkpoint.json`` present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / INFO).is_file()]
    return sorted(found, key=lambda p: p.name)


def file_sizes(ckpt: Path) -> dict[str, int]:
    """What a checkpoint needs to resume: DeepSpeed's files and each rank's state, with their sizes."""
    files = [f for f in ckpt.rglob("*") if f.is_file()
             and (f.parts[len(ckpt.parts)] == DS_TAG or f.name.startswith(("trainer_rank", "rng_rank")))]
    return {f.relative_to(ckpt).as_posix(): f.stat().st_size for f in sorted(files)}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (its first missing or truncated file), or None if it is intact.
    Checkpoints of older lum-dist versions hold no file list: only their DeepSpeed folder is checked."""
    info_file = ckpt / INFO
    if not info_file.is_file():
        return f"{info_file} is missing"
    try:
        files = json.loads(info_file.read_text()).get("files")
    except ValueError as e:
        return f"{info_file} is not valid JSON ({e})"
    if files is None:
        return None if (ckpt / DS_TAG).is_dir() else f"{ckpt / DS_TAG} is missing"
    for rel, size in files.items():
        file = ckpt / rel
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written (truncated or replaced)"
    return None


def validate(ckpt: Path, world_size: int | None = None) -> None:
    """Raise CheckpointError if ``ckpt`` is damaged or (``world_size`` given) was written by another number
    of ranks."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
    written_by = json.loads((ckpt / INFO).read_text()).get("config", {}).get("world_size")
    if world_size is not None and written_by not in (None, world_size):
        raise CheckpointError(f"checkpoint {ckpt} was written by {written_by} ranks and this run has "
                              f"{world_size}: a ZeRO checkpoint resumes on the same number of ranks")


def _warn(message: str) -> None:
    if dist_info()[0] == 0:
        print(f"[lum-dist] warning: {message}", file=sys.stderr, flush=True)


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is intact, else the newest intact one (each damaged one skipped
    with a warning); None if there is none at all. Raises CheckpointError if every checkpoint is damaged:
    starting over silently would throw a run's progress away (and rotate the damaged ones out)."""
    found = complete_checkpoints(root)
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = ([named] if named is not None and STEP_DIR.match(named.name) else [])
    candidates += [p for p in reversed(found) if p != named]
    problems = []
    for ckpt in candidates:
        if not ckpt.is_dir():
            continue  # `latest` names a checkpoint that keep_last or a person removed
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                _warn(f"resuming from {ckpt.name}, the newest intact checkpoint; skipped: "
                      + "; ".join(problems))
            return ckpt
        problems.append(f"{ckpt.name} ({problem})")
    if problems:
        raise CheckpointError(f"no intact checkpoint under {root}: " + "; ".join(problems) + ". Restore "
                              "the missing files, or start over with train.resume=never (or another "
                              "train.output_dir)")
    return None


def find_best_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``best`` names, if it is complete (its files are checked when it is loaded)."""
    best = root / "best"
    if best.is_file():
        cand = root / best.read_text().strip()
        if (cand / INFO).is_file():
            return cand
    return None


@contextlib.contextmanager
def hold_output_dir(out_dir: Path) -> Iterator[None]:
    """Collective: rank 0 holds ``<out_dir>/.lock`` for the block (see :func:`lum_dist.utils.folder_lock`).
    If another live run holds it, every rank raises rank 0's FolderInUse (naming the folder and the holder's
    PID) at once, before anything is read or written."""
    rank, world = dist_info()
    with contextlib.ExitStack() as stack:
        refusal: list[Exception | None] = [None]
        if rank == 0:
            try:
                stack.enter_context(folder_lock(out_dir))
            except Exception as e:  # every rank must learn it, or the others would wait at a collective
                refusal[0] = e
        if world > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise refusal[0]
        yield


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], run_config: dict[str, Any],
         keep_last: int, best: bool = False, die_during_save: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. ``trainer_state`` must be
    JSON-able. ``best``: also point ``best`` at it. Older checkpoints beyond ``keep_last`` are removed, except
    the best one."""
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
    plain_rng, tensor_rng = rng_state()
    atomic_write_text(tmp / trainer_state_file(rank), json.dumps({**trainer_state, "rng": plain_rng}))
    torch.save(tensor_rng, tmp / rng_file(rank))
    if die_during_save:  # test hook: a crash after the shards are written, before the checkpoint is complete
        os.kill(os.getpid(), 9)
    dist.barrier()
    if rank == 0:
        info = {"step": step, "config": run_config, "files": file_sizes(tmp)}
        atomic_write_text(tmp / INFO, json.dumps(info, indent=2))
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
    """Collective: restore only the model weights of ``ckpt`` (the best checkpoint, for the final
    evaluation)."""
    validate(ckpt)
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=DS_TAG, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the weights in {ckpt / DS_TAG}")


def load(engine, ckpt: Path) -> dict[str, Any]:
    """Collective: check ``ckpt``, restore the engine (weights, optimizer, scheduler) and this rank's RNG
    states, and return this rank's trainer state."""
    rank = dist.get_rank()
    validate(ckpt, dist.get_world_size())
    state_file = ckpt / trainer_state_file(rank)
    if not state_file.is_file():  # intact but without one: written before trainer states were JSON
        raise CheckpointError(f"checkpoint {ckpt} was written by an older lum-dist (trainer state in "
                              f"trainer_rank{rank}.pt, which is no longer unpickled): it cannot be resumed; "
                              f"its weights still evaluate and export. Start over with train.resume=never")
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=DS_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt / DS_TAG}")
    state = json.loads(state_file.read_text())
    set_rng_state(state.pop("rng"), torch.load(ckpt / rng_file(rank), weights_only=True))
    return state
