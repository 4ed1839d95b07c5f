"""How the trainer writes a checkpoint and restores from one (the layout: :mod:`lum_dist.checkpoint`).

Every rank writes into ``.tmp_step_00000100``; after a barrier rank 0 renames it to its final name (one
atomic rename) and then rewrites ``latest`` (and ``best``) atomically. A run killed mid-save leaves only a
``.tmp_*`` folder, which resume ignores and the next save removes, so the newest *complete* checkpoint always
wins. Before a checkpoint is loaded its files are checked (a missing or truncated file is named);
``train.resume=auto`` skips a damaged checkpoint with a warning and resumes from the newest intact one, an
explicit ``train.resume=<dir>`` fails with the same message instead. The trainer state is JSON and the RNG
states plain tensors: nothing lum-dist writes is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lum_dist.checkpoint import (
    DS_TAG,
    INFO,
    CheckpointError,
    complete_checkpoints,
    ema_file,
    file_sizes,
    find_best_checkpoint,
    rng_file,
    step_dir_name,
    trainer_state_file,
    validate,
)
from lum_dist.train.ema import WeightAverage
from lum_dist.utils import atomic_write_text, dist_info, folder_lock


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
         keep_last: int, best: bool = False, die_during_save: bool = False,
         average: WeightAverage | None = None) -> Path:
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
    # save_latest: DeepSpeed's `latest` (naming the tag) in the checkpoint folder. Under ZeRO-3 a weights-only load
    # (load_weights) and the zero_to_fp32.py copied beside it find the shards through that file alone.
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=True)
    plain_rng, tensor_rng = rng_state()
    atomic_write_text(tmp / trainer_state_file(rank), json.dumps({**trainer_state, "rng": plain_rng}))
    torch.save(tensor_rng, tmp / rng_file(rank))
    if average is not None and (rank == 0 or average.sharded):  # unsharded: every rank's is alike
        torch.save(average.state_dict(), tmp / ema_file(rank))
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


def load_average(average: WeightAverage, ckpt: Path) -> None:
    """This rank's weight average from ``ckpt`` (its own shards under ZeRO-3, rank 0's copy otherwise)."""
    file = ckpt / ema_file(dist.get_rank() if average.sharded else 0)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {ckpt} holds no weight average ({ema_file(0)}): it was written without "
                              "optim.ema_decay, which this run sets")
    average.load_state_dict(torch.load(file, map_location=average.shadow[0].device, weights_only=True))


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
