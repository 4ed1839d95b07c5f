"""Run configs: YAML + ``a.b=value`` overrides into dataclasses, checked at load: unknown keys, wrong types,
values outside an enum and broken cross-field rules are errors naming the key, the value, what is allowed and
where the value came from (the file or the command line)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from lum_dist.config import (
    ConfigError,
    EvaluateConfig,
    ExportConfig,
    PretrainConfig,
    QueryConfig,
    add_config_flags,
    config_from_flags,
    load_config,
)
from lum_dist.data.prepare import SOURCE_DEFAULTS, PrepareConfig, build_parser, normalize_source
from lum_dist.data.split import SPLITS

CONFIG = "configs/pretrain/synthetic.yaml"


def test_overrides_reach_nested_fields_with_their_types():
    cfg = load_config(PretrainConfig, "configs/pretrain/ml100k-lum.yaml",
                      ["optim.lr=1e-3", "optim.betas=[0.9, 0.99]", "train.max_steps=7", "eval.ks=[5]",
                       "eval.metric=hr@5"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.optim.betas == (0.9, 0.99) and cfg.train.max_steps == 7 and cfg.eval.ks == [5]
    assert cfg.data.long_sequences == "window"  # the file's value survives unrelated overrides


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "optim.lrr: unknown key \\(did you mean 'lr'\\?\\)"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("train.max_steps=ten", "expected int"),
    ("train.max_steps=1.5", "expected int"),
    ("train.max_steps=true", "expected int"),
    ("loss.logq_correction=maybe", "expected bool"),
    ("optim", "key=value"),
    # enums
    ("train.precision=bf61", "train.precision: 'bf61' is not one of 'auto', 'bf16', 'fp32' \\(did you mean 'bf16'\\?\\)"),
    ("eval.split=tset", "eval.split: 'tset' is not one of 'valid', 'test' \\(did you mean 'test'\\?\\)"),
    ("eval.final_splits=[valid, tests]", "eval.final_splits\\[1\\]: 'tests' is not one of"),
    ("data.packing=padded", "data.packing: 'padded' is not one of 'pack', 'pad'"),
    ("data.long_sequences=windows", "did you mean 'window'"),
    ("loss.similarity=cos", "loss.similarity: 'cos' is not one of 'cosine', 'dot'"),
    ("loss.negatives=sampled", "loss.negatives: 'sampled' is not one of 'full', 'in_batch'"),
    ("train.zero_stage=4", "train.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ("logging.wandb_mode=offlin", "did you mean 'offline'"),
    # cross-field rules
    ("data.max_seq_len=4096", "data.max_seq_len: 4096 > data.token_budget=1024"),
    ("eval.metric=ndcg@5", "eval.metric: 'ndcg@5' is not one of mrr, hr@10, hr@20, ndcg@10, ndcg@20"),
    ("train.early_stopping_patience=3", "needs train.eval_every"),
    ("loss.temperature=0", "temperature"),
])
def test_bad_overrides_are_named_and_blamed_on_the_command_line(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(PretrainConfig, CONFIG, [override])
    assert str(e.value).startswith("command line: ")


def test_cross_field_rule_between_two_overrides():
    with pytest.raises(ConfigError, match="command line: train.offload_params: needs train.zero_stage=3"):
        load_config(PretrainConfig, CONFIG, ["train.zero_stage=2", "train.offload_params=true"])


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: fp16\n")
    with pytest.raises(ConfigError, match=f"^{bad}: train.precision: 'fp16' is not one of"):
        load_config(PretrainConfig, bad, ["train.max_steps=3"])
    bad.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trian: unknown key \\(did you mean 'train'\\?\\)"):
        load_config(PretrainConfig, bad)


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(PretrainConfig, "nope.yaml")


def test_every_shipped_pretrain_config_loads():
    from pathlib import Path

    for path in sorted(Path("configs/pretrain").glob("*.yaml")):
        load_config(PretrainConfig, path)


# The commands that read a trained model (evaluate, export, query): flags over an optional YAML file over the
# dataclass defaults, every value checked by the same load_config.

@pytest.mark.parametrize("cls", [EvaluateConfig, ExportConfig, QueryConfig])
def test_every_field_is_a_documented_flag(cls):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        assert f.name in flags and f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings
        assert f.metadata.get("help") and flags[f.name].help.startswith(f.metadata["help"])


def _from_flags(cls, argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    return config_from_flags(cls, parser.parse_args(argv))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "query.yaml"
    path.write_text("checkpoint: runs/a\nout: runs/q\nlag: 3\ntoken_budget: 1024\n")
    cfg = _from_flags(QueryConfig, ["--config", str(path), "--lag", "1", "--conditions", "*", "category=ALL"])
    assert (cfg.checkpoint, cfg.lag, cfg.token_budget) == ("runs/a", 1, 1024)  # flag, flag, file
    assert cfg.conditions == ["*", "category=ALL"] and cfg.users_per_shard == 4096  # flag, default
    cfg = _from_flags(ExportConfig, ["--checkpoint", "c", "--out", "o", "--hf"])
    assert cfg.hf is True and cfg.split == "test"
    cfg = _from_flags(EvaluateConfig, ["--checkpoint", "c", "--split", "valid", "--ks", "5", "50"])
    assert cfg.split == ["valid"] and cfg.ks == [5, 50] and cfg.out is None


@pytest.mark.parametrize("cls,argv,message", [
    (QueryConfig, ["--checkpoint", "c", "--out", "o", "--split", "tset"],
     "command line: split: 'tset' is not one of 'valid', 'test' \\(did you mean 'test'\\?\\)"),
    (EvaluateConfig, ["--checkpoint", "c", "--split", "valid", "tests"], "split\\[1\\]: 'tests' is not one of"),
    (QueryConfig, ["--out", "o"], "checkpoint: required"),
    (QueryConfig, ["--checkpoint", "c", "--out", "o", "--device", "gpu"], "device: 'gpu' is not one of"),
    (QueryConfig, ["--checkpoint", "c", "--out", "o", "--token-budget", "1"], "token_budget"),
    (EvaluateConfig, ["--checkpoint", "c", "--ks", "0"], "ks: \\[0\\]: need cut-offs >= 1"),
    (ExportConfig, ["--checkpoint", "c", "--out", "o", "--max-users", "-1"], "max_users: -1"),
])
def test_bad_flags_are_named(cls, argv, message):
    with pytest.raises(ConfigError, match=message):
        _from_flags(cls, argv)


def test_a_bad_value_in_a_flat_config_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("checkpoint: runs/a\nmax_user: 4\n")
    with pytest.raises(ConfigError, match=f"{path}: max_user: unknown key \\(did you mean 'max_users'\\?\\)"):
        _from_flags(EvaluateConfig, ["--config", str(path)])


def test_prepare_reads_the_same_config_style_and_builds_the_source_mapping(tmp_path):
    path = tmp_path / "prep.yaml"
    path.write_text("format: synthetic\nout: runs/data/x\nmin_behaviours: 5\n")
    args = build_parser().parse_args(["--config", str(path), "--users-per-shard", "7"])
    cfg = config_from_flags(PrepareConfig, args, extra={"options": {"num_users": 50}})
    source = cfg.source()
    assert source == {**SOURCE_DEFAULTS, "format": "synthetic", "min_behaviours": 5, "users_per_shard": 7,
                      "num_users": 50}
    assert normalize_source(source)["num_users"] == 50  # what a pretraining config's data.prepare holds
    with pytest.raises(ConfigError, match="format: 'synthtic' is not one of .*did you mean 'synthetic'"):
        config_from_flags(PrepareConfig, build_parser().parse_args(["--format", "synthtic", "--out", "o"]))


def test_prepare_offers_every_split_the_splitter_knows():
    assert typing.get_args(typing.get_type_hints(PrepareConfig)["split"]) == SPLITS
