"""Run a function on N real CPU processes joined by a gloo process group (multi-rank tests).

Processes are forked, so ``fn`` may be any function, even one defined in a test module that is not
importable by name (pytest's importlib mode). Each rank's return value (picklable) comes back in
rank order; an exception on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _worker(fn: Callable, rank: int, world_size: int, init_file: str, args: tuple, results: Any) -> None:
    try:
        torch.set_num_threads(1)  # ranks share the machine's cores
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # Plain pickle bytes: the queue's own pickler would share tensors through file descriptors,
            # which vanish if this process exits before the parent has read them (flaky "connection reset").
            results.put((rank, True, pickle.dumps(fn(*args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size - 1]``, each inside an initialised gloo group."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="lum-dist-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        try:
            for _ in procs:
                rank, ok, value = results.get(timeout=timeout)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [out[r] for r in range(world_size)]
