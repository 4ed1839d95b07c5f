"""Run length in epochs, model selection on validation (best checkpoint, early stopping) and the final
evaluation of the selected model: unit tests of the pieces, then one-process runs of the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lum_dist.config import PretrainConfig
from lum_dist.data.loader import train_tokens
from lum_dist.train.monitor import read_metrics
from lum_dist.train.trainer import BestTracker, plan_steps

REPO = Path(__file__).resolve().parents[2]


def test_plan_steps_in_epochs_wins_over_steps():
    cfg = PretrainConfig()
    cfg.data.token_budget, cfg.data.rows_per_batch, cfg.train.grad_accum = 1000, 2, 1
    cfg.train.max_steps, cfg.train.eval_every = 77, 5
    assert plan_steps(cfg, tokens_per_epoch=50_000, world=1) == (77, 5)
    cfg.train.max_epochs, cfg.train.eval_every_epochs = 3, 0.5
    assert plan_steps(cfg, tokens_per_epoch=50_000, world=1) == (75, 12)  # 25 steps per epoch
    assert plan_steps(cfg, tokens_per_epoch=50_000, world=5) == (15, 2)  # 5 ranks: 5 steps per epoch


def test_train_tokens_counts_what_tokenize_train_keeps():
    train_end = np.array([0, 3, 80, 120])
    assert train_tokens(train_end, 100, "window") == 2 * (3 + 80 + 120)
    assert train_tokens(train_end, 100, "truncate") == 2 * (3 + 50 + 50)


def test_best_tracker_improves_strictly_and_stops_after_patience():
    t = BestTracker("ndcg@10", patience=2)
    assert t.update(10, 0.10) and not t.should_stop
    assert not t.update(20, 0.10)  # a tie is no improvement: the earlier checkpoint stays the best
    assert t.update(30, 0.12) and t.best_step == 30 and t.evals_since_best == 0
    assert not t.update(40, 0.11) and not t.should_stop
    assert not t.update(50, 0.05) and t.should_stop
    assert not BestTracker("mrr").should_stop  # patience 0: never stops


def _train(tmp: Path, name: str, *overrides: str) -> dict:
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
           f"data.path={tmp / 'data'}", f"train.output_dir={tmp / name}", "train.zero_stage=0", "train.keep_last=1",
           "train.log_every=1", "eval.max_users=60", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / name / "result.json").read_text())


@pytest.mark.slow
def test_best_checkpoint_is_kept_selected_and_evaluated(tmp_path):
    # Attribute targets: evaluate.py below must rebuild each item's attributes from the dataset to score alike.
    result = _train(tmp_path, "sel", "train.max_steps=12", "train.eval_every=2", "optim.lr=3e-2",
                    "optim.warmup_steps=1", "model.overrides.attribute_targets=true", "eval.attribute_query_weight=0.5",
                    "eval.condition_query=true")
    logged = read_metrics(tmp_path / "sel" / "metrics.jsonl")
    evals = {s: m["valid/ndcg@10"] for s, m in logged.items() if "valid/ndcg@10" in m and s < result["steps"]}
    evals[result["steps"]] = [json.loads(line) for line in (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()
                              if "valid/ndcg@10" in line][-2]["valid/ndcg@10"]  # the last validation, before the final eval
    best_step = min(s for s in evals if evals[s] == max(evals.values()))
    assert result["best_step"] == best_step and result["selection"]["best"] == pytest.approx(max(evals.values()))
    ckpts = tmp_path / "sel" / "checkpoints"
    assert (ckpts / "best").read_text() == f"step_{best_step:08d}" and (ckpts / f"step_{best_step:08d}").is_dir()
    # The final evaluation is the best checkpoint's, on validation and test; evaluate.py finds the same one.
    assert result["eval"]["valid/ndcg@10"] == pytest.approx(max(evals.values()), rel=1e-6)
    assert {"test/ndcg@10", "test/attrq_ndcg@10", "test/cond_ndcg@10"} <= set(result["eval"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "again"
    evaluate = [sys.executable, str(REPO / "launch/evaluate.py"), "--checkpoint", str(tmp_path / "sel"), "--max-users",
                "60", "--condition-query"]
    subprocess.run([*evaluate, "--split", "valid", "test", "--attribute-query-weight", "0.5", "--out", str(out)],
                   cwd=REPO, env=env, check=True, capture_output=True)
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["step"] == best_step
    for key in ("valid/ndcg@10", "test/hr@10", "test/ndcg@20", "valid/attrq_ndcg@10", "test/attrq_hr@10",
                "valid/cond_ndcg@10", "test/cond_mrr"):
        assert again["metrics"][key] == pytest.approx(result["eval"][key], rel=1e-5, abs=1e-7), key
    # --max-seq-len: the same model reading only its last 2 behaviours ranks differently
    subprocess.run([*evaluate, "--split", "test", "--max-seq-len", "5", "--out", str(tmp_path / "short")],
                   cwd=REPO, env=env, check=True, capture_output=True)
    short = json.loads((tmp_path / "short.json").read_text())
    assert short["max_seq_len"] == 5 and again["max_seq_len"] > 5
    assert short["metrics"]["test/mrr"] != again["metrics"]["test/mrr"]
    assert short["metrics"]["test/cond_mrr"] != again["metrics"]["test/cond_mrr"]


@pytest.mark.slow
def test_early_stopping_stops_after_patience_and_a_rerun_does_not_train_again(tmp_path):
    args = ("train.max_steps=40", "train.eval_every=2", "train.early_stopping_patience=2", "optim.lr=0.0")
    result = _train(tmp_path, "es", *args)  # lr 0: the metric never improves after the first validation
    assert result["stopped_early"] and result["best_step"] == 2 and result["steps"] == 2 + 2 * 2
    again = _train(tmp_path, "es", *args)
    assert again["steps"] == result["steps"] and again["eval"] == pytest.approx(result["eval"])
