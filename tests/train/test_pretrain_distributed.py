"""The DeepSpeed trainer with 2 real CPU processes (gloo, ZeRO-3): smoke, SIGKILL + resume, kill during save.

A reference run of 8 steps is compared with runs that are killed and resumed: the per-step losses and
the final weights must be the same (to float tolerance), whatever moment the kill hit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lum_dist.train.monitor import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, out: str, extra_env: dict | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
        str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
        f"data.path={tmp / 'data'}", f"train.output_dir={tmp / out}", f"train.max_steps={STEPS}",
        "train.save_every=2", "train.log_every=1", "train.keep_last=3", "eval.max_users=40",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           **(extra_env or {})}
    log = open(tmp / f"{out}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, tmp: Path, out: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run {out} timed out:\n{(tmp / f'{out}.log').read_text()[-3000:]}") from None


def _run(tmp: Path, out: str, extra_env: dict | None = None) -> int:
    return _wait(_launch(tmp, out, extra_env), tmp, out)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lum_dist.train.checkpoint import DS_TAG, find_resume_checkpoint

    ckpt = find_resume_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{STEPS:08d}"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)


def _assert_same_run(tmp: Path, ref: str, other: str) -> None:
    a, b = read_metrics(tmp / ref / "metrics.jsonl"), read_metrics(tmp / other / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), f"step {step}"
    wa, wb = _final_weights(tmp / ref), _final_weights(tmp / other)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    rc = _run(tmp, "ref")
    assert rc == 0, (tmp / "ref.log").read_text()[-4000:]
    return tmp


def test_two_rank_zero3_smoke(reference: Path):
    metrics = read_metrics(reference / "ref" / "metrics.jsonl")
    losses = [metrics[s]["loss"] for s in range(1, STEPS + 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "valid/hr@10" in metrics[STEPS] and "valid/pop_hr@10" in metrics[STEPS]
    assert (reference / "ref" / "result.json").is_file()
    kept = sorted(p.name for p in (reference / "ref" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{s:08d}" for s in (4, 6, 8)]  # keep_last=3
    assert (reference / "ref" / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_sigkill_mid_training_resumes_exactly(reference: Path):
    proc = _launch(reference, "killed")
    metrics_file = reference / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if 5 in read_metrics(metrics_file):  # the step-4 checkpoint exists; step 5 is done, step 6 running
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _run(reference, "killed") == 0, (reference / "killed.log").read_text()[-4000:]
    _assert_same_run(reference, "ref", "killed")


def test_kill_during_save_resumes_from_last_complete_checkpoint(reference: Path):
    rc = _run(reference, "killsave", {"LUM_FAULT_KILL_DURING_SAVE_AT_STEP": "6"})
    assert rc != 0
    ckpts = reference / "killsave" / "checkpoints"
    assert (ckpts / ".tmp_step_00000006").is_dir()  # the half-written checkpoint is there ...
    assert (ckpts / "latest").read_text() == "step_00000004"  # ... but not visible
    assert _run(reference, "killsave") == 0, (reference / "killsave.log").read_text()[-4000:]
    assert not (ckpts / ".tmp_step_00000006").exists()
    _assert_same_run(reference, "ref", "killsave")
