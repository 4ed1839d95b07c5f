"""Loader worker processes and device prefetch: exact resume for 0, 1, 2 workers, the users each worker
and rank visits, worker errors in the main process, no orphan worker, prefetch state; and the trainer
crashed and resumed with 2 ranks x 2 workers (slow)."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lum_dist.config import DataConfig
from lum_dist.data.errors import DataError
from lum_dist.data.loader import PackedLoader
from lum_dist.data.workers import DataWorkerError, DevicePrefetcher, WorkerLoader, train_loader
from lum_dist.testing.fixtures import drop_last_category_of_row_1, edit_shard_column, write_tiny_dataset
from lum_dist.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "ds"
    write_tiny_dataset(path, num_users=60, num_items=40, num_shards=3, numeric_fields=("rating",))
    return path


def cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), max_seq_len=16, token_budget=40, rows_per_batch=2, shuffle_buffer=12, seed=3,
                cond_dropout=0.3)
    return DataConfig(**{**base, **kw})


def assert_same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def take(loader, n: int) -> list:
    return list(itertools.islice(loader, n))


def assert_resumes(path, config, state, expected) -> None:
    """A new loader restored from ``state`` yields exactly ``expected`` next."""
    resumed = train_loader(path, config)
    resumed.load_state_dict(state)
    for want in expected:
        assert_same(next(resumed), want)
    close(resumed)


def close(loader) -> None:
    if isinstance(loader, WorkerLoader):
        loader.close()


def live_processes(field: int, value: int) -> set[int]:
    """Live (not zombie) processes whose /proc stat field ``field`` (after the name: 0 state, 1 parent,
    3 session) is ``value``."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] not in "ZX":
            out.add(int(stat.parent.name))
    return out


def children(pid: int) -> set[int]:
    return live_processes(1, pid)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if alive(p)}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_exact_resume(tiny, workers):
    c = cfg(tiny, num_workers=workers, long_sequences="window", max_seq_len=10)
    ref = train_loader(tiny, c, rank=1, world_size=2)
    expected = take(ref, 50)  # several epochs of every worker
    close(ref)
    for cut in (1, 6, 17, 24):  # odd cuts: the next batch comes from worker 1
        first = train_loader(tiny, c, rank=1, world_size=2)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # plain values
        close(first)
        resumed = train_loader(tiny, c, rank=1, world_size=2)
        resumed.load_state_dict(state)
        for want in expected[cut:cut + 12]:
            assert_same(next(resumed), want)
        close(resumed)


def test_one_worker_is_the_in_process_stream(tiny):
    plain = PackedLoader(tiny, cfg(tiny), rank=0, world_size=2)
    with WorkerLoader(tiny, cfg(tiny, num_workers=1), rank=0, world_size=2) as one:
        assert one.tokens_per_epoch == plain.tokens_per_epoch
        for a, b in zip(take(plain, 25), take(one, 25), strict=True):
            assert_same(b, a)
        assert one.state_dict()["workers"] == [plain.state_dict()]
        assert one.epochs_done == plain.epochs_done > 1


def test_workers_split_the_rank_users_each_visited_once_per_epoch(tiny):
    # 60 users, 2 ranks x 2 workers: 15 per worker, one truncated sequence each, a buffer = one epoch
    c = cfg(tiny, num_workers=2, shuffle_buffer=15, rows_per_batch=1)
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        with WorkerLoader(tiny, c, rank=rank, world_size=2) as loader:
            for i in itertools.count():
                w = i % 2  # round-robin
                ids = seen.setdefault((rank, w), [])
                if all(len(seen.get((rank, v), [])) >= 45 for v in range(2)):
                    break
                ids += next(loader).user_ids
        rank_users = set(PackedLoader(tiny, cfg(tiny), rank=rank, world_size=2).users.user_id)
        assert set(seen[rank, 0]) | set(seen[rank, 1]) == rank_users  # a rank keeps its users with workers
    firsts = [set(ids[:15]) for ids in seen.values()]
    assert all(len(s) == 15 for s in firsts) and len(set().union(*firsts)) == 60  # disjoint, cover all
    for ids in seen.values():
        epochs = [ids[15 * e:15 * (e + 1)] for e in range(3)]
        assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and epochs[1] != epochs[0]  # reshuffled


def test_resume_needs_the_same_workers_and_world_size(tiny):
    with WorkerLoader(tiny, cfg(tiny, num_workers=2), rank=0, world_size=2) as two:
        take(two, 3)
        state = two.state_dict()
        with pytest.raises(ValueError, match="same data.num_workers and world size"):
            WorkerLoader(tiny, cfg(tiny, num_workers=1), rank=0, world_size=2).load_state_dict(state)
        with pytest.raises(ValueError, match="same data.num_workers and world size"):
            WorkerLoader(tiny, cfg(tiny, num_workers=2), rank=0, world_size=4).load_state_dict(state)
        with pytest.raises(ValueError, match="same data.num_workers"):
            PackedLoader(tiny, cfg(tiny), rank=0, world_size=2).load_state_dict(state)
    plain = PackedLoader(tiny, cfg(tiny), rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="data.num_workers=0"):
        WorkerLoader(tiny, cfg(tiny, num_workers=2), rank=0, world_size=2).load_state_dict(plain)
    with pytest.raises(ValueError, match="lower data.num_workers"):
        WorkerLoader(tiny, cfg(tiny, num_workers=31), rank=0, world_size=2)


def test_rng_of_the_main_process_untouched(tiny):
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with WorkerLoader(tiny, cfg(tiny, num_workers=2)) as loader:
        take(loader, 4)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]


def test_worker_error_surfaces_with_its_message(tmp_path):
    meta = write_tiny_dataset(tmp_path / "d", num_users=6, num_shards=2)
    edit_shard_column(tmp_path / "d", meta, 1, "cond_category", drop_last_category_of_row_1)
    before = children(os.getpid())
    loader = train_loader(tmp_path / "d", cfg(tmp_path / "d", num_workers=2))
    with pytest.raises(DataError, match=r"part-00001.parquet line 2: field 'cond_category'") as info:
        next(loader)
    assert isinstance(info.value.__cause__, DataWorkerError) and "data worker 0" in str(info.value.__cause__)
    assert children(os.getpid()) == before  # the failed loader stopped its workers


def test_no_orphan_after_the_loader_is_dropped(tiny):
    before = children(os.getpid())
    loader = WorkerLoader(tiny, cfg(tiny, num_workers=2))
    next(loader)
    workers = children(os.getpid()) - before
    assert len(workers) == 2
    del loader
    gc.collect()
    assert not wait_gone(workers, timeout=10)


SCRIPT = """
import os, signal, sys
from pathlib import Path
from lum_dist.config import DataConfig
from lum_dist.data.workers import WorkerLoader
path = sys.argv[1]
loader = WorkerLoader(path, DataConfig(path=path, max_seq_len=16, token_budget=40, shuffle_buffer=12, num_workers=2))
next(loader)
me = str(os.getpid())
kids = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat") if p.read_text().rsplit(")", 1)[1].split()[1] == me]
print(" ".join(kids), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
raise RuntimeError("the training step failed")
"""


@pytest.mark.parametrize("how", ["exception", "kill"])
def test_no_orphan_when_the_main_process_dies(tiny, tmp_path, how):
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny), how], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and (how == "kill" or "the training step failed" in proc.stderr)
    workers = {int(p) for p in proc.stdout.split()}
    assert len(workers) == 2, proc.stdout + proc.stderr
    # killed: the workers die with their parent at once (PR_SET_PDEATHSIG), also when blocked on a full queue
    assert not wait_gone(workers, timeout=3)


# -- device prefetch ---------------------------------------------------------------------------------


def test_prefetcher_passes_batches_through_on_the_cpu(tiny):
    ref = take(PackedLoader(tiny, cfg(tiny)), 6)
    loader = PackedLoader(tiny, cfg(tiny))
    batches = DevicePrefetcher(loader, "cpu")
    for want in ref:
        batch = next(batches)
        assert batch is batches.to_device(batch) or all(
            getattr(batches.to_device(batch), f.name) is getattr(batch, f.name) for f in dataclasses.fields(batch))
        assert_same(batch, want)
    assert batches.state_dict() == loader.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetch_ahead_state_is_that_of_the_last_batch_handed_out(tiny, workers):
    c = cfg(tiny, num_workers=workers)
    ref = train_loader(tiny, c)
    expected = take(ref, 20)
    close(ref)
    loader = train_loader(tiny, c)
    batches = DevicePrefetcher(loader, "cpu", ahead=2)
    for want in expected[:7]:
        batch = next(batches)
        assert_same(batches.to_device(batch), want)
    state = batches.state_dict()
    assert state != loader.state_dict()  # the loader itself is two batches further
    close(loader)
    assert_resumes(tiny, c, state, expected[7:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_copies_the_batches_ahead(tiny):
    c = cfg(tiny, num_workers=2)
    ref = train_loader(tiny, c)
    expected = take(ref, 12)
    close(ref)
    loader = train_loader(tiny, c)
    batches = DevicePrefetcher(loader, "cuda")
    for want in expected[:6]:
        batch = next(batches)
        assert batch.item_ids.is_pinned()
        on_device = batches.to_device(batch)
        assert on_device.item_ids.is_cuda and len(batches._ready) == 1  # the next copy is under way
        assert_same(on_device.to("cpu"), want)
    state = batches.state_dict()
    close(loader)
    assert_resumes(tiny, c, state, expected[6:])


# -- the trainer, killed and resumed, with 2 ranks x 2 workers ------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, out: str, extra_env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
           f"data.path={tmp / 'data'}", f"train.output_dir={tmp / out}", "train.max_steps=8", "data.num_workers=2",
           "train.save_every=2", "train.log_every=1", "train.eval_every=0", "eval.final_splits=[]"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           **(extra_env or {})}
    log = open(tmp / f"{out}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, tmp: Path, out: str) -> int:
    try:
        return proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run {out} timed out:\n{(tmp / f'{out}.log').read_text()[-3000:]}") from None


def session(sid: int) -> set[int]:
    """Live processes of session ``sid`` (a run and every process it started)."""
    return live_processes(3, sid)


@pytest.mark.slow
def test_trainer_with_workers_resumes_exactly_after_a_crash(tmp_path):
    assert _wait(_launch(tmp_path, "ref"), tmp_path, "ref") == 0, (tmp_path / "ref.log").read_text()[-4000:]
    # every rank SIGKILLs itself while saving step 6: step 4 is the latest complete checkpoint
    crashed = _launch(tmp_path, "crashed", {"LUM_FAULT_KILL_DURING_SAVE_AT_STEP": "6"})
    assert _wait(crashed, tmp_path, "crashed") != 0
    assert not wait_gone(session(crashed.pid), timeout=30)  # the killed ranks' workers exit too
    assert _wait(_launch(tmp_path, "crashed"), tmp_path, "crashed") == 0, \
        (tmp_path / "crashed.log").read_text()[-4000:]
    assert "checkpoints/step_00000004 at step 4" in (tmp_path / "crashed.log").read_text()
    a, b = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), f"step {step}"
