"""Faults around a pretraining run, with real 2-rank torchrun processes (gloo, ZeRO-3) where it matters:

* a ``kill -9`` of the launcher takes every rank with it;
* a second run on a folder in use refuses at once, naming the folder and the PID that holds it;
* a damaged checkpoint is named before anything loads it; ``train.resume=auto`` falls back to the previous
  intact checkpoint (and the run still reproduces the uninterrupted one), an explicit one fails clearly;
* trainer states are JSON and plain tensors: nothing lum-dist wrote needs unpickling.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lum_dist import checkpoint
from lum_dist.train.monitor import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 8
RUN_ARGS = ("train.save_every=2", "train.log_every=1", "train.keep_last=3", "eval.max_users=40")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, out: str, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_port()), str(REPO / "launch/pretrain.py"), "--config",
           str(REPO / "configs/pretrain/debug-cpu.yaml"),
           f"data.path={tmp / 'data'}", f"train.output_dir={tmp / out}", f"train.max_steps={STEPS}",
           *RUN_ARGS, *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    log = open(tmp / f"{out}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, tmp: Path, out: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError(f"run {out} timed out:\n{_log(tmp, out)[-3000:]}") from None


def _log(tmp: Path, out: str) -> str:
    return (tmp / f"{out}.log").read_text(errors="replace")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the launcher's ranks), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _kill_tree(proc: subprocess.Popen, ranks: list[int] = ()) -> None:
    """The launcher's group, and its ranks (each in its own session)."""
    for pid in [*ranks, *(_children(proc.pid) if _alive(proc.pid) else [])]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _training(proc: subprocess.Popen, tmp: Path, out: str) -> list[int]:
    """Wait until the run has logged a step; return its two ranks' PIDs."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if read_metrics(tmp / out / "metrics.jsonl"):
            ranks = _children(proc.pid)
            assert len(ranks) == 2, ranks
            return ranks
        time.sleep(0.1)
    raise AssertionError(f"run {out} did not start training:\n{_log(tmp, out)[-3000:]}")


# ---------------------------------------------------------------------------------------------
# the launcher and the output folder


def test_killing_the_launcher_kills_every_rank_and_frees_the_folder(tmp_path):
    proc = _launch(tmp_path, "run", "train.max_steps=100000", "train.save_every=0")
    ranks: list[int] = []
    try:
        ranks = _training(proc, tmp_path, "run")
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its ranks lead their own sessions
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(pid) for pid in ranks):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "ranks outlived their launcher"
        with open(tmp_path / "run" / ".lock", "rb") as f:  # the dead holder's lock went with it
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        _kill_tree(proc, ranks)


def test_a_second_run_on_a_live_folder_refuses_at_once(tmp_path):
    first = _launch(tmp_path, "run", "train.max_steps=100000", "train.save_every=0")
    ranks: list[int] = []
    try:
        ranks = _training(first, tmp_path, "run")
        holder = (tmp_path / "run" / ".lock").read_text().split()
        assert holder[0] == "PID" and int(holder[1]) in ranks  # rank 0 of the live run holds the folder
        second = _launch(tmp_path, "second", f"train.output_dir={tmp_path / 'run'}")
        assert _wait(second, tmp_path, "second", timeout=120) != 0
        log = _log(tmp_path, "second")
        message = f"{tmp_path / 'run'} is in use by another run (PID {holder[1]} on "
        assert log.count(message) == 1, log[-3000:]  # rank 0 says it, once
        assert "exitcode  : 2" in log
        assert not re.search(r'File ".*/(lum_dist|launch)/', log)  # no traceback through our code
        assert first.poll() is None and all(_alive(pid) for pid in ranks)  # the live run goes on
    finally:
        _kill_tree(first, ranks)


# ---------------------------------------------------------------------------------------------
# damaged checkpoints


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    rc = _wait(_launch(tmp, "ref"), tmp, "ref")
    assert rc == 0, _log(tmp, "ref")[-4000:]
    return tmp


def _damaged_copy(reference: Path, name: str, step: int, remove: str) -> Path:
    """A copy of the reference run without one file of its step ``step`` checkpoint (and without metrics)."""
    run = reference / name
    shutil.copytree(reference / "ref", run)
    (run / "metrics.jsonl").unlink()
    (run / "checkpoints" / f"step_{step:08d}" / remove).unlink()
    return run


DAMAGES = {
    "model_states": "ds/zero_pp_rank_0_mp_rank_00_model_states.pt",
    "optimizer": "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "trainer_state": "trainer_rank0.json",
    "rng_state": "rng_rank1.pt",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_named_and_auto_resume_skips_it(reference, tmp_path, damage, capsys):

    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "ref" / "checkpoints", root)
    latest = root / f"step_{STEPS:08d}"
    (latest / DAMAGES[damage]).unlink()
    missing = f"is damaged: {latest / DAMAGES[damage]} is missing"
    with pytest.raises(checkpoint.CheckpointError, match=missing):
        checkpoint.validate(latest, world_size=2)
    assert checkpoint.find_resume_checkpoint(root) == root / "step_00000006"
    warning = capsys.readouterr().err
    assert "warning: resuming from step_00000006" in warning and DAMAGES[damage] in warning


def test_a_truncated_file_is_named_and_every_damaged_checkpoint_is_an_error(reference, tmp_path):

    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "ref" / "checkpoints", root)
    for step in (4, 6, 8):
        states = root / f"step_{step:08d}" / DAMAGES["optimizer"]
        states.write_bytes(states.read_bytes()[:100])
    assert "has 100 bytes" in checkpoint.checkpoint_problem(root / "step_00000008")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint .*train.resume=never"):
        checkpoint.find_resume_checkpoint(root)  # starting over silently would throw the run away
    shutil.copyfile(reference / "ref" / "checkpoints" / "step_00000008" / DAMAGES["optimizer"],
                    root / "step_00000008" / DAMAGES["optimizer"])
    checkpoint.validate(root / "step_00000008", world_size=2)  # intact again
    with pytest.raises(checkpoint.CheckpointError, match="written by 2 ranks and this run has 4"):
        checkpoint.validate(root / "step_00000008", world_size=4)


def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_reproduces_the_run(reference):
    """The newest checkpoint lost an optimizer file: the run resumes from the one before, with a warning, and
    ends exactly where the uninterrupted run ended."""
    run = _damaged_copy(reference, "fallback", STEPS, DAMAGES["optimizer"])
    rc = _wait(_launch(reference, "fallback"), reference, "fallback")
    assert rc == 0, _log(reference, "fallback")[-4000:]
    log = _log(reference, "fallback")
    assert log.count("warning: resuming from step_00000006") == 1 and DAMAGES["optimizer"] in log
    assert f"resumed from {run / 'checkpoints' / 'step_00000006'} at step 6" in log
    ref, again = read_metrics(reference / "ref" / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert sorted(again) == [7, 8]
    for step in (7, 8):
        assert again[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    wa, wb = (get_fp32_state_dict_from_zero_checkpoint(str(r / "checkpoints" / f"step_{STEPS:08d}"), tag="ds")
              for r in (reference / "ref", run))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_explicit_resume_of_a_damaged_checkpoint_fails_naming_the_file(reference):
    run = _damaged_copy(reference, "explicit", STEPS, DAMAGES["model_states"])
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    proc = _launch(reference, "explicit", f"train.resume={ckpt}")
    assert _wait(proc, reference, "explicit") != 0
    log = _log(reference, "explicit")
    message = f"error: checkpoint {ckpt} is damaged: {ckpt / DAMAGES['model_states']} is missing"
    assert log.count(message) == 1, log[-3000:]
    assert "AssertionError" not in log and "different number of ranks" not in log


def test_trainer_states_are_json_and_plain_tensors(reference):
    ckpt = reference / "ref" / "checkpoints" / f"step_{STEPS:08d}"
    for rank in (0, 1):
        state = json.loads((ckpt / f"trainer_rank{rank}.json").read_text())
        assert state["step"] == STEPS and state["loader"]["rank"] == rank and "python" in state["rng"]
        tensors = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=True)  # no unpickling of code
        assert tensors["torch"].dtype == torch.uint8
    assert not list(ckpt.glob("trainer_rank*.pt"))
    files = json.loads((ckpt / "checkpoint.json").read_text())["files"]
    assert set(DAMAGES.values()) <= set(files)
