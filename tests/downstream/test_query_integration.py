"""The real step-2 job's output feeds step 3: query job (random LUM, no training) -> run_downstream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lum_dist.config import PretrainConfig, load_config
from lum_dist.data.schema import DatasetMeta
from lum_dist.downstream.config import DownstreamConfig
from lum_dist.downstream.run import run_downstream
from lum_dist.model import LUMModel, load_preset
from lum_dist.testing.fixtures import write_tiny_dataset


def test_query_job_output_runs_downstream(tmp_path: Path, monkeypatch):
    from lum_dist.query import job

    root = tmp_path / "data"
    meta = write_tiny_dataset(root, num_users=40, num_items=40, seed=5, min_len=4, max_len=12)
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", num_items=meta.num_items, cond_vocab_sizes=meta.cond_vocab_sizes())).eval()
    cfg = PretrainConfig()
    cfg.data.path, cfg.data.max_seq_len = str(root), 32
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text(json.dumps({"config": {}}))
    # the checkpoint is the only thing faked: a random model stands in for a consolidated trained one
    monkeypatch.setattr(job, "resolve_checkpoint", lambda path: Path(path))
    monkeypatch.setattr(job, "load_model", lambda path: (model, cfg, DatasetMeta.load(root / "meta.json")))
    dirs = {}
    for split, lag in (("valid", 2), ("test", 0)):
        dirs[split] = job.run(job.QueryConfig(checkpoint=str(ckpt), out=str(tmp_path / f"query-{split}"),
                                           conditions=["*", "category=ALL"], split=split, lag=lag, users_per_shard=16,
                                           token_budget=256, device="cpu"))
    import pyarrow.parquet as pq

    from lum_dist.data.prepare import read_users

    users = read_users(root)
    table = pq.read_table(sorted(dirs["valid"].glob("part-*.parquet")))
    hist = dict(zip(table.column("user_id").to_pylist(), table.column("history_len").to_pylist(), strict=True))
    for uid, end in zip(users.column("user_id").to_pylist(), users.column("train_end").to_pylist(), strict=True):
        assert hist[uid] == max(end - 2, 0)  # the answers saw the history up to train_end - lag
    with pytest.raises(ValueError, match="another query job"):  # resuming into it with other settings is refused
        job.run(job.QueryConfig(checkpoint=str(ckpt), out=str(dirs["valid"]), conditions=["*"], split="valid", lag=2,
                             users_per_shard=16, token_budget=256, device="cpu"))
    dcfg = load_config(DownstreamConfig, overrides=[
        f"data_path={root}", f"query_valid={dirs['valid']}", f"query_test={dirs['test']}", f"output_dir={tmp_path}",
        "name=q", "seeds=[0]", "max_history=8", "train_requests_per_user=3", "ranking.epochs=1",
        "ranking.batch_size=32", "retrieval.epochs=1", "retrieval.batch_size=16"])
    result = run_downstream(dcfg)
    assert set(result["ranking"]) == {"base", "lum_direct", "lum_match", "lum_both"}
    assert 0.0 <= result["retrieval"]["lum"]["mean"]["recall@10"] <= 1.0
    with pytest.raises(ValueError, match="split is 'test'"):  # swapped directories are refused
        run_downstream(load_config(DownstreamConfig, overrides=[
            f"data_path={root}", f"query_valid={dirs['test']}", f"query_test={dirs['valid']}",
            f"output_dir={tmp_path}", "seeds=[0]", "ranking.epochs=1"]))
