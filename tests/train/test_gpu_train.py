"""The real trainer on one CUDA device: DeepSpeed ZeRO-3 in bf16, each loss, LUM and SASRec, a few steps and the
final evaluation of the best checkpoint (run on the device machine: ``pytest -m gpu``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lum_dist.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[2]

LOSSES = {
    # logQ-corrected in-batch negatives plus shared uniform ones: the item prior and the sampler live on the device
    "in_batch": ["loss.negatives=in_batch", "loss.logq_correction=true", "loss.num_random_negatives=32",
                 "loss.exclude_seen=true"],
    "full": ["loss.negatives=full", "loss.label_smoothing=0.1", "loss.item_token_weight=0.5", "loss.exclude_seen=true",
             "loss.view_contrast_weight=0.1"],
    "sasrec": ["model.preset=sasrec", "loss.negatives=full"],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gpu_zero3_pretrain_trains_and_evaluates(tmp_path, loss):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
           f"data.path={tmp_path / 'data'}", f"train.output_dir={out}", "train.max_steps=6", "train.eval_every=3",
           "train.log_every=1", *LOSSES[loss]]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # installed or not
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on cuda" in proc.stdout, proc.stdout[-2000:]
    result = json.loads((out / "result.json").read_text())
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl").values() if "loss" in m]
    assert result["steps"] == 6 and len(losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert 0 <= result["eval"]["test/ndcg@10"] <= result["eval"]["test/hr@10"] <= 1
