"""A small end-to-end downstream run on a tiny dataset with fake step-2 outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launch.downstream import main
from lum_dist.config import ConfigError, load_config
from lum_dist.downstream.config import DownstreamConfig
from lum_dist.downstream.lum_features import model_versions
from lum_dist.downstream.run import run_downstream
from lum_dist.downstream.samples import build_requests, load_dataset
from lum_dist.testing.fixtures import write_tiny_dataset

from .conftest import fake_item_table, write_fake_query_dir


def test_end_to_end(tiny, tmp_path):
    qv = write_fake_query_dir(tmp_path / "qv", tiny, "valid", seed=1, lag=2)
    qt = write_fake_query_dir(tmp_path / "qt", tiny, "test", seed=2)
    out = tmp_path / "results"
    result = main(["--config", "configs/downstream/synthetic.yaml", f"data_path={tiny}", f"query_valid={qv}",
                   f"query_test={qt}", f"output_dir={out}", "name=tiny", "seeds=[0,1]", "max_history=8",
                   "train_requests_per_user=3",
                   "ranking.epochs=2", "ranking.batch_size=64", "retrieval.epochs=2", "retrieval.batch_size=32"])
    saved = json.loads((out / "tiny.json").read_text())
    assert saved["ranking"].keys() == result["ranking"].keys() == {"base", "lum_direct", "lum_match", "lum_both"}
    assert saved["retrieval"].keys() == {"base", "lum", "popularity"}  # popularity: a reference, not trained
    for section, metrics in (("ranking", ("auc", "gauc")), ("retrieval", ("recall@10", "recall@50", "ndcg@10",
                                                                       "ndcg@50"))):
        for variant, v in saved[section].items():
            assert len(v["runs"]) == (1 if variant == "popularity" else 2)
            for m in metrics:
                assert 0.0 <= v["mean"][m] <= 1.0, (section, variant, m)
            if variant == "base":
                assert all(d == 0.0 for d in v["delta"].values())
    assert all(v["mean"]["logloss"] > 0 for v in saved["ranking"].values())
    table = (out / "tiny.md").read_text()
    assert "| lum_both |" in table and "recall@50" in table and saved["meta"]["counts"]["eval_requests"] > 0
    assert saved["meta"]["lum_model"] == {"valid": "fake", "test": "fake"}  # the query manifests' model_version
    assert "LUM features from `fake`" in table
    counts = saved["meta"]["counts"]
    assert counts["train_requests"] > 2 * counts["eval_requests"]  # up to 3 training requests per user


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(DownstreamConfig, overrides=["negratio=3"])
    with pytest.raises(ValueError, match="must start with 'base'"):
        load_config(DownstreamConfig, overrides=["ranking.variants=[lum_direct]"])


def test_missing_query_output_is_a_clear_error(tiny, tmp_path):
    cfg = load_config(DownstreamConfig, overrides=[f"data_path={tiny}", f"query_valid={tmp_path / 'none'}",
                                                   f"output_dir={tmp_path}", "seeds=[0]", "ranking.epochs=1"])
    with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
        run_downstream(cfg)


def test_informative_lum_outputs_help(tmp_path):
    """Outputs that point at each request's target (as a perfect LUM would) must lift the LUM variants:
    proves the features reach the models aligned with their samples."""
    root = tmp_path / "data"
    write_tiny_dataset(root, num_users=200, num_items=80, seed=3, min_len=4, max_len=20)
    data = load_dataset(root)
    items = fake_item_table(data.num_items, 8)
    dirs = {}
    for split, req_split in (("valid", "train"), ("test", "eval")):
        req = build_requests(data, req_split, 8)
        emb = {u: np.zeros(8, np.float32) for u in data.users.column("user_id").to_pylist()}
        emb.update({u: items[t] for u, t in zip(req.user_id, req.target, strict=True)})
        dirs[split] = write_fake_query_dir(tmp_path / split, root, split, user_emb=emb)
    cfg = load_config(DownstreamConfig, overrides=[
        f"data_path={root}", f"query_valid={dirs['valid']}", f"query_test={dirs['test']}", f"output_dir={tmp_path}",
        "seeds=[0]", "max_history=8", "ranking.epochs=5", "ranking.batch_size=64", "ranking.variants=[base,lum_match]",
        "retrieval.epochs=20", "retrieval.batch_size=32", "holdout_fraction=0"])
    result = run_downstream(cfg)
    assert result["ranking"]["lum_match"]["mean"]["auc"] > 0.9 > result["ranking"]["base"]["mean"]["auc"]
    assert result["retrieval"]["lum"]["delta"]["recall@10"] > 0.1


def test_runs_as_two_processes_under_torchrun(tiny, tmp_path):
    """``torchrun --nproc_per_node 2 launch/downstream.py``: accelerate shards the batches over two CPU
    processes (gloo) and DDP-wraps the models; the main process writes the result once."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    qv = write_fake_query_dir(tmp_path / "qv", tiny, "valid", seed=1)
    qt = write_fake_query_dir(tmp_path / "qt", tiny, "test", seed=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(repo / "launch" / "downstream.py"), "--config", str(repo / "configs/downstream/synthetic.yaml"),
           f"data_path={tiny}", f"query_valid={qv}", f"query_test={qt}", f"output_dir={tmp_path / 'out'}", "name=ddp",
           "seeds=[0]", "max_history=8", "train_requests_per_user=1", "ranking.epochs=1", "ranking.batch_size=16",
           "ranking.variants=[base,lum_match]", "retrieval.epochs=2", "retrieval.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "ddp.json").read_text())
    assert result["meta"]["processes"] == 2
    assert proc.stdout.count("# Downstream results: ddp") == 1  # printed (and written) by the main process only
    assert set(result["retrieval"]) == {"base", "lum", "popularity"}
    assert result["ranking"]["base"]["mean"]["train_loss"] > 0 and result["retrieval"]["lum"]["mean"]["train_loss"] > 0


def test_model_versions_skip_directories_without_a_manifest(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "manifest.json").write_text(json.dumps({"model_version": "run/step_00000010/abc"}))
    assert model_versions({"valid": tmp_path / "q", "test": tmp_path / "missing"}) == {"valid": "run/step_00000010/abc"}
