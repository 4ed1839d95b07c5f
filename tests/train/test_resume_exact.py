"""A resume between two log lines, with random negatives and a weight average: the resumed run logs and trains
exactly as the uninterrupted one (the running loss sum, the random-negative counter and the average are part of
the checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lum_dist.checkpoint import ema_file
from lum_dist.train.checkpoint import trainer_state_file
from lum_dist.train.monitor import read_metrics
from lum_dist.train.trainer import resume_counters

REPO = Path(__file__).resolve().parents[2]
ARGS = ("train.max_steps=8", "train.save_every=2", "train.log_every=3", "loss.num_random_negatives=16",
        "train.zero_stage=0", "eval.max_users=20", "eval.final_splits=[valid]", "optim.ema_decay=0.9")


def _run(tmp: Path, name: str, kill_at: int | None = None) -> int:
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
           f"data.path={tmp / 'data'}", f"train.output_dir={tmp / name}", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if kill_at is not None:
        env["LUM_FAULT_KILL_DURING_SAVE_AT_STEP"] = str(kill_at)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600).returncode


@pytest.mark.slow
def test_resume_off_the_log_grid_with_random_negatives_is_exact(tmp_path):
    assert _run(tmp_path, "ref") == 0
    assert _run(tmp_path, "cut", kill_at=4) != 0  # dies while saving step 4: resumes from step 2
    step2_state = tmp_path / "cut" / "checkpoints" / "step_00000002" / trainer_state_file(0)
    cut_seconds_before = json.loads(step2_state.read_text())["wall_seconds"]
    assert _run(tmp_path, "cut") == 0
    ref, cut = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    logged = [s for s in ref if "loss" in ref[s]]
    assert logged == [3, 6, 8]
    for step in logged:  # step 3's line averages steps 1-3: step 1-2 before the stop, step 3 after it
        assert cut[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
    assert cut[8]["valid/ndcg@10"] == pytest.approx(ref[8]["valid/ndcg@10"], abs=1e-9)
    averages = [torch.load(tmp_path / name / "checkpoints" / "step_00000008" / ema_file(0), weights_only=True)
                for name in ("ref", "cut")]
    assert averages[0]["updates"] == averages[1]["updates"] == 8
    for a, b in zip(averages[0]["shadow"], averages[1]["shadow"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # result.json counts the whole run: the resume, and the wall time of the piece before it
    ref_result, cut_result = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("ref", "cut"))
    assert (ref_result["resumes"], cut_result["resumes"]) == (0, 1)
    assert cut_result["wall_seconds"] > cut_seconds_before > 0


def test_a_checkpoint_from_before_exact_resumes_resumes_with_counters_reset(tmp_path, capsys):
    state = {"step": 4, "log": {"loss_sum": 2.5, "steps": 1}, "random_negative_calls": 4}
    assert resume_counters(state, tmp_path) == (2.5, 1, 4)
    assert capsys.readouterr().out == ""
    assert resume_counters({"step": 4}, tmp_path) == (0.0, 0, 0)
    assert "predates exact resumes" in capsys.readouterr().out
