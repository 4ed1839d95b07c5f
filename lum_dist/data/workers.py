"""Training batches made ahead of the step: worker processes per rank, and device prefetch.

``train_loader`` returns a ``PackedLoader`` for ``data.num_workers = 0`` (batches made in the calling
process, as always) and a ``WorkerLoader`` otherwise.

**Workers.** With W = ``data.num_workers``, worker w of rank r streams a PackedLoader over the *virtual
rank* ``w * world_size + r`` of ``world_size * W``: user g goes to worker w of rank r iff
``g % (world_size * W) == w * world_size + r``. A rank keeps exactly the users it has without workers
(``g % world_size == r``), split W ways; each worker reads the shards and keeps only its slice, so
workers do not multiply the users held in memory. W = 1 gives the very stream of W = 0.

The main process takes batches from the workers round-robin, in order, through torch's DataLoader
(worker processes, a bounded prefetch of ``PREFETCH`` batches per worker, workers that exit when the
main process does, a clean shutdown when the loader is closed or dropped). Each batch comes with its
worker's ``LoaderPosition`` after it (None when the batch made no new buffer: the main process then
drops the batch's rows from the worker's previous position), so ``state_dict()`` = every worker's
state as of its last batch taken + the worker whose turn is next. Loading it restarts the workers from
those states, the next one first, and the stream continues exactly (same tensors). Resuming needs the
same ``num_workers`` and world size (checked). An exception in a worker is raised again in the main
process (same type and message, the worker's traceback chained to it).

**Device prefetch.** ``DevicePrefetcher`` hands the trainer host batches whose device copy was started
one step earlier (pinned memory, ``non_blocking``, on a side CUDA stream); elsewhere it passes batches
through. Its ``state_dict()`` is the loader's state as of the last batch handed out, not of the one
fetched ahead.
"""

from __future__ import annotations

import pickle
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lum_dist.cli import kill_with_parent
from lum_dist.config import DataConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.loader import (
    STATE_VERSION,
    LoaderPosition,
    PackedLoader,
    check_rank,
    train_tokens,
)
from lum_dist.data.prepare import iter_user_shards, load_meta

PREFETCH = 8  # batches made ahead per worker: absorbs a worker's pause while it fills a new buffer


class DataWorkerError(RuntimeError):
    """A data worker failed; raised (or chained to the worker's own exception) in the main process."""


@dataclass
class _Batch:
    worker: int
    batch: dict[str, Any]  # a PackedBatch's fields, tensors as numpy arrays (see _to_wire)
    position: LoaderPosition | None  # the worker's loader after this batch; None: the last one minus this batch
    epochs_done: float


def _to_wire(batch: PackedBatch) -> dict[str, Any]:
    """The batch's fields with numpy arrays for tensors. Torch would pass each tensor through shared
    memory with a file descriptor of its own, about a millisecond per tensor to receive here (nine a
    batch); pickled arrays cross the pipe with the rest of the item."""
    return {f.name: _numpy(getattr(batch, f.name)) for f in fields(batch)}


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.numpy() for v in value]
    return value


def _from_wire(wire: dict[str, Any]) -> PackedBatch:
    def tensor(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            return [torch.from_numpy(v) for v in value]
        return value

    return PackedBatch(**{name: tensor(value) for name, value in wire.items()})


@dataclass
class _Failure:
    worker: int
    error: bytes | None  # the pickled exception, if it pickles
    message: str
    traceback: str


def _die_with_rank(worker_id: int) -> None:
    """A worker dies with its rank: torch's watchdog misses a rank killed while the worker blocks on a full
    queue (seen here: orphans of SIGKILLed ranks that never exited)."""
    kill_with_parent()


def _as_is(item: Any) -> Any:  # the DataLoader's collate_fn: items are whole batches already
    return item


class _WorkerStreams(IterableDataset):
    """In DataLoader worker j: the stream of worker ``(first + j) % W`` (the DataLoader reads its workers
    0, 1, ... in turn, so after a resume the worker whose turn it is comes first)."""

    def __init__(self, path: Path, cfg: DataConfig, rank: int, world_size: int, states: list[dict[str, Any]],
                 first: int):
        self.path, self.cfg, self.rank, self.world_size = path, cfg, rank, world_size
        self.states, self.first = states, first

    def __iter__(self) -> Iterator[_Batch | _Failure]:
        info = get_worker_info()
        if info is None:
            raise RuntimeError("_WorkerStreams runs inside DataLoader workers only")
        num_workers = self.cfg.num_workers
        w = (self.first + info.id) % num_workers
        try:
            loader = PackedLoader(self.path, replace(self.cfg, num_workers=0), rank=w * self.world_size + self.rank,
                                  world_size=self.world_size * num_workers)
            loader.load_state_dict(self.states[w])
            buffers = -1  # the first batch carries the whole position
            while True:
                batch = next(loader)
                # A batch that made no new buffer only took rows off the queue: the main process works the
                # position out, and the queue's keys (up to a buffer of them) cross the pipe after refills only.
                position = loader.position() if loader.buffers != buffers else None
                buffers = loader.buffers
                yield _Batch(w, _to_wire(batch), position, loader.epochs_done)
        except Exception as exc:  # handed to the main process, which raises it
            try:
                error = pickle.dumps(exc)
            except Exception:
                error = None
            yield _Failure(w, error, f"{type(exc).__name__}: {exc}", traceback.format_exc())


@dataclass(frozen=True)
class WorkerPosition:
    """Where a WorkerLoader stands (cheap to take after every batch)."""

    workers: tuple[LoaderPosition | dict[str, Any], ...]  # per worker, after its last batch taken
    next_worker: int
    epochs_done: tuple[float, ...]


class WorkerLoader:
    """Infinite iterator of PackedBatch for one rank, made by ``data_cfg.num_workers`` worker processes
    (see the module docstring). Close it (or drop it) to stop the workers."""

    def __init__(self, path: str | Path, data_cfg: DataConfig, rank: int = 0, world_size: int = 1):
        if data_cfg.num_workers < 1:
            raise ValueError(f"WorkerLoader needs data.num_workers >= 1, got {data_cfg.num_workers}")
        check_rank(rank, world_size)
        self.path, self.cfg, self.rank, self.world_size = Path(path), data_cfg, rank, world_size
        self.num_workers = data_cfg.num_workers
        self.meta = load_meta(self.path)
        train_end = [t.column("train_end").to_numpy() for t in iter_user_shards(self.path, ["train_end"])]
        total = sum(len(t) for t in train_end)
        self.tokens_per_epoch = train_tokens(np.concatenate(train_end) if train_end else np.zeros(0, np.int64),
                                             data_cfg.max_seq_len, data_cfg.long_sequences)
        if total < world_size * self.num_workers:
            raise ValueError(f"{self.path}: {total} users cannot be split over {world_size} rank(s) x "
                             f"data.num_workers={self.num_workers}: lower data.num_workers")
        empty = LoaderPosition(0, 0, 0, np.empty((0, 3), np.int64), np.empty(0, np.int64))
        self._position = WorkerPosition((empty,) * self.num_workers, 0, (0.0,) * self.num_workers)
        self._batches: Iterator[_Batch | _Failure] | None = None

    @property
    def epochs_done(self) -> float:
        """Mean over the workers of their passes over their users, each as of its last batch taken (and, as
        for PackedLoader, of the last buffer it filled)."""
        return float(np.mean(self._position.epochs_done))

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> WorkerLoader:
        return self

    def __next__(self) -> PackedBatch:
        if self._batches is None:
            self._batches = self._start()
        item = next(self._batches)
        if isinstance(item, _Failure):
            self.close()
            _raise(item, self.rank)
        p = self._position
        if item.worker != p.next_worker:
            raise RuntimeError(f"data worker {item.worker} answered out of turn (expected {p.next_worker})")
        w = item.worker
        position = item.position or p.workers[w].after_batch(self.cfg.rows_per_batch)
        self._position = WorkerPosition(p.workers[:w] + (position,) + p.workers[w + 1:],
                                        (w + 1) % self.num_workers,
                                        p.epochs_done[:w] + (item.epochs_done,) + p.epochs_done[w + 1:])
        return _from_wire(item.batch)

    def _start(self) -> Iterator[_Batch | _Failure]:
        states = [self._worker_state(self._position, w) for w in range(self.num_workers)]
        streams = _WorkerStreams(self.path, self.cfg, self.rank, self.world_size, states, self._position.next_worker)
        # A private generator: the DataLoader draws its workers' base seed from it, not from the global
        # torch RNG, which would shift the model's random stream after a resume.
        loader = DataLoader(streams, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            prefetch_factor=PREFETCH, generator=torch.Generator().manual_seed(0),
                            worker_init_fn=_die_with_rank)
        return iter(loader)

    def close(self) -> None:
        """Stop the workers (the loader restarts them if iterated again)."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean-up, which __del__ also runs
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> WorkerLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_batches"):
            self.close()

    # -- state --------------------------------------------------------------------------------------

    def position(self) -> WorkerPosition:
        return self._position

    def _worker_state(self, position: WorkerPosition, w: int) -> dict[str, Any]:
        state = position.workers[w]
        if isinstance(state, dict):
            return state
        return state.state_dict(self.meta.fingerprint, w * self.world_size + self.rank,
                                self.world_size * self.num_workers, self.cfg.seed)

    def state_dict(self, position: WorkerPosition | None = None) -> dict[str, Any]:
        """Per-worker PackedLoader states + the worker whose turn is next, as of ``position`` (default:
        the last batch taken)."""
        p = position or self._position
        return {"version": STATE_VERSION, "num_workers": self.num_workers, "fingerprint": self.meta.fingerprint,
                "rank": self.rank, "world_size": self.world_size, "seed": self.cfg.seed,
                "next_worker": p.next_worker, "epochs_done": list(p.epochs_done),
                "workers": [self._worker_state(p, w) for w in range(self.num_workers)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        theirs = (state.get("num_workers", 0), state["world_size"])
        if theirs != (self.num_workers, self.world_size):
            raise ValueError(f"loader state of data.num_workers={theirs[0]} on {theirs[1]} rank(s), this loader "
                             f"data.num_workers={self.num_workers} on {self.world_size}: resume with the same "
                             "data.num_workers and world size")
        if state["fingerprint"] != self.meta.fingerprint:
            raise ValueError(f"{self.path}: dataset fingerprint {self.meta.fingerprint!r} differs from the "
                             f"checkpoint's {state['fingerprint']!r}; refusing to resume on different data")
        for key, mine in (("rank", self.rank), ("seed", self.cfg.seed)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {key}={mine}: cannot resume")
        self.close()
        self._position = WorkerPosition(tuple(state["workers"]), int(state["next_worker"]),
                                        tuple(float(e) for e in state["epochs_done"]))


def _raise(failure: _Failure, rank: int) -> None:
    where = DataWorkerError(f"data worker {failure.worker} of rank {rank} failed:\n{failure.traceback}")
    error = pickle.loads(failure.error) if failure.error is not None else None
    if isinstance(error, Exception):
        raise error from where
    raise DataWorkerError(f"data worker {failure.worker} of rank {rank} failed: {failure.message}\n"
                          f"{failure.traceback}")


TrainLoader = PackedLoader | WorkerLoader


def train_loader(path: str | Path, data_cfg: DataConfig, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training loader ``data_cfg`` asks for: in-process (``num_workers = 0``) or worker processes."""
    if data_cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={data_cfg.num_workers}: expected >= 0")
    if data_cfg.num_workers == 0:
        return PackedLoader(path, data_cfg, rank=rank, world_size=world_size)
    return WorkerLoader(path, data_cfg, rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------
# device prefetch


@dataclass
class _Fetched:
    batch: PackedBatch  # on the host (pinned on CUDA)
    copy: PackedBatch | None  # on the device (its copy may still be running)
    done: Any  # CUDA event recorded after the copy, or None
    position: Any  # the loader's position after this batch (only when fetching ahead)


class DevicePrefetcher:
    """Batches of ``loader`` with their device copies started ahead.

    ``next(prefetcher)`` gives the next host batch (the trainer reads its lengths on the CPU);
    ``to_device(batch)`` its copy on ``device``. On CUDA (``ahead`` defaults to 1) the copy of the next
    batch is issued from pinned memory, ``non_blocking``, on a side stream as soon as a batch is handed
    over, so it overlaps the step; elsewhere (``ahead`` 0) batches pass straight through.
    """

    def __init__(self, loader: TrainLoader, device: torch.device | str, ahead: int | None = None):
        self.loader, self.device = loader, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ahead = (1 if self.cuda else 0) if ahead is None else ahead
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: deque[_Fetched] = deque()
        self._handed: _Fetched | None = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> PackedBatch:
        if not self._ready:
            self._fetch()
        self._handed = self._ready.popleft()
        return self._handed.batch

    def to_device(self, batch: PackedBatch) -> PackedBatch:
        """The device copy of ``batch`` (the batch ``next`` just gave); the next copy starts now."""
        handed = self._handed
        if handed is None or handed.batch is not batch or handed.copy is None:
            return batch.to(self.device, non_blocking=self.cuda)
        copy, handed.copy = handed.copy, None
        if handed.done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(handed.done)
            for f in fields(copy):  # allocated on the side stream, used on this one
                value = getattr(copy, f.name)
                if isinstance(value, torch.Tensor):
                    value.record_stream(stream)
        while len(self._ready) < self.ahead:
            self._fetch()
        return copy

    def _fetch(self) -> None:
        batch = next(self.loader)
        # Batches fetched ahead are not consumed yet: remember the loader's position after each.
        position = self.loader.position() if self.ahead else None
        if not self.cuda:
            self._ready.append(_Fetched(batch, batch.to(self.device), None, position))
            return
        batch = batch.pin_memory()
        with torch.cuda.stream(self.stream):
            copy = batch.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._ready.append(_Fetched(batch, copy, done, position))

    def state_dict(self) -> dict[str, Any]:
        """The loader's state as of the last batch handed out (batches fetched ahead are not consumed)."""
        if self._handed is None or self._handed.position is None:
            return self.loader.state_dict()
        return self.loader.state_dict(self._handed.position)
