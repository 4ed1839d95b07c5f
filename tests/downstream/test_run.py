"""A small end-to-end downstream run on a tiny dataset with fake step-2 outputs."""

from __future__ import annotations

import json

import pytest

from launch.downstream import main
from lum_dist.config import ConfigError, load_config
from lum_dist.downstream.config import DownstreamConfig
from lum_dist.downstream.run import run_downstream

from .conftest import write_fake_query_dir


def test_end_to_end(tiny, tmp_path):
    qv = write_fake_query_dir(tmp_path / "qv", tiny, "valid", seed=1)
    qt = write_fake_query_dir(tmp_path / "qt", tiny, "test", seed=2)
    out = tmp_path / "results"
    result = main(["--config", "configs/downstream/synthetic.yaml", f"data_path={tiny}", f"query_valid={qv}",
                   f"query_test={qt}", f"output_dir={out}", "name=tiny", "seeds=[0,1]", "max_history=8",
                   "ranking.epochs=2", "ranking.batch_size=64", "retrieval.epochs=2", "retrieval.batch_size=32"])
    saved = json.loads((out / "tiny.json").read_text())
    assert saved["ranking"].keys() == result["ranking"].keys() == {"base", "lum_direct", "lum_match", "lum_both"}
    assert saved["retrieval"].keys() == {"base", "lum"}
    for section, metrics in (("ranking", ("auc", "gauc")), ("retrieval", ("recall@10", "recall@50", "ndcg@10",
                                                                       "ndcg@50"))):
        for variant, v in saved[section].items():
            assert len(v["runs"]) == 2
            for m in metrics:
                assert 0.0 <= v["mean"][m] <= 1.0, (section, variant, m)
            if variant == "base":
                assert all(d == 0.0 for d in v["delta"].values())
    assert all(v["mean"]["logloss"] > 0 for v in saved["ranking"].values())
    table = (out / "tiny.md").read_text()
    assert "| lum_both |" in table and "recall@50" in table and saved["meta"]["counts"]["eval_requests"] > 0


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
