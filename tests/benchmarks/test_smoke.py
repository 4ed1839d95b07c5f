"""Every benchmark's --smoke mode runs on the CPU and writes its JSON (to a temporary results folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _smoke(tmp: Path, script: str, *args: str) -> dict:
    env = {**os.environ, "LUM_BENCH_RESULTS": str(tmp / "results"), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = (tmp / "results").glob("*.json")
    data = json.loads(result.read_text())
    assert {"device", "git_commit", "torch", "timestamp"} <= set(data["meta"]) and data["rows"]
    return data


def test_packing_smoke(tmp_path):
    data = _smoke(tmp_path, "packing.py", "--work", str(tmp_path / "data"))
    for pack, pad in zip(data["rows"][::2], data["rows"][1::2], strict=True):
        assert (pack["policy"], pad["policy"], pad["speedup"]) == ("pack", "pad", 1.0)
        assert pack["utilisation"] > pad["utilisation"]
        # padding is computed on: the padded batch carries more tokens than its real ones
        assert pad["model_batch_tok_s"] > pad["model_real_tok_s"] > 0
        assert pack["model_batch_tok_s"] == pytest.approx(pack["model_real_tok_s"])


def test_loader_smoke(tmp_path):
    data = _smoke(tmp_path, "loader.py", "--work", str(tmp_path / "data"))
    assert [(r["dataset"], r["workers"]) for r in data["rows"]] == [("synthetic", w) for w in (0, 1, 2)]
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert [d["preset"] for d in data["meta"]["demand"]][::5] == ["lum-19m", "lum-7b"]


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    data = _smoke(tmp_path, "train_throughput.py", "--zero", "3")
    assert [(r["packing"], r["status"]) for r in data["rows"]] == [("pack", "ok"), ("pad", "ok")]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in data["rows"])


@pytest.mark.parametrize("script", ["attention.py", "group_query.py", "prepare.py"])
def test_other_smokes(tmp_path, script):
    _smoke(tmp_path, script)
