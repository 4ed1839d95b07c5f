"""Run configs: YAML + ``a.b=value`` overrides into dataclasses; typos and wrong types are errors."""

from __future__ import annotations

import pytest

from lum_dist.config import ConfigError, PretrainConfig, load_config


def test_overrides_reach_nested_fields_with_their_types():
    cfg = load_config(PretrainConfig, "configs/pretrain/ml100k-cpu.yaml",
                      ["optim.lr=1e-3", "optim.betas=[0.9, 0.99]", "train.max_steps=7", "eval.ks=[5]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.optim.betas == (0.9, 0.99) and cfg.train.max_steps == 7 and cfg.eval.ks == [5]
    assert cfg.data.long_sequences == "window"  # the file's value survives unrelated overrides


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key"),
    ("optim.lr=fast", "expected float"),
    ("train.max_steps=ten", "expected int"),
    ("train.max_steps=1.5", "expected int"),
    ("loss.logq_correction=maybe", "expected bool"),
    ("optim", "key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "configs/pretrain/synthetic.yaml", [override])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(PretrainConfig, "nope.yaml")
