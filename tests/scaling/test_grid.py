"""Sweep config loading, grid expansion, launcher commands, and the resumable runner (with a fake trainer)."""

import math
import sys

import pytest
import yaml

from lum_dist.config import REPO_ROOT, ConfigError, PretrainConfig, load_config
from lum_dist.model.config import load_preset
from lum_dist.scaling.grid import build_command, expand_grid, load_sweep, resolve_path, run_sweep

from .fake_runs import fake_runner, parse_overrides

BASE = "configs/pretrain/debug-cpu.yaml"  # token_budget 256, rows_per_batch 1


def write_sweep(tmp_path, **fields):
    spec = {"name": "t", "base_config": BASE, "out_dir": str(tmp_path / "runs"),
            "report_dir": str(tmp_path / "report"),
            "presets": ["lum-tiny", {"name": "h32", "preset": "lum-tiny", "overrides": {"hidden_size": 32}}],
            "max_seq_lens": [32, 64], "seeds": [0, 1], **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expand_grid_cross_product(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, tokens_per_run=2560, overrides=["optim.lr=0.01"]))
    runs = expand_grid(sweep)
    assert [r.name for r in runs] == [f"{m}_L{L}_seed{s}" for m in ("lum-tiny", "h32") for L in (32, 64) for s in (0, 1)]
    assert len({r.output_dir for r in runs}) == 8 and all(r.output_dir.parent == tmp_path / "runs" for r in runs)
    run = runs[-1]  # h32, L=64, seed 1
    cfg = load_config(PretrainConfig, REPO_ROOT / BASE, run.overrides)  # the run's overrides make a valid config
    assert cfg.model.preset == "lum-tiny" and cfg.model.overrides == {"hidden_size": 32}
    assert cfg.data.max_seq_len == 64 and cfg.train.seed == 1 and cfg.data.seed == 1 and cfg.optim.lr == 0.01
    assert cfg.train.output_dir == str(run.output_dir)
    assert run.tokens_per_step == 256 and run.max_steps == 10 == cfg.train.max_steps  # 2560 / 256


def test_step_count_from_budgets(tmp_path):
    runs = expand_grid(load_sweep(write_sweep(tmp_path, tokens_per_run=1000)))
    assert {r.max_steps for r in runs} == {math.ceil(1000 / 256)}
    # No budget: the base config's max_steps.
    assert {r.max_steps for r in expand_grid(load_sweep(write_sweep(tmp_path)))} == {8}
    # Compute budget: steps = budget / (flops_per_token * tokens per step), per preset and length.
    sweep = load_sweep(write_sweep(tmp_path, compute_budget=1e9))
    fpt = lambda preset, cfg: 1000.0 * (2 if preset.name == "h32" else 1) + cfg.data.max_seq_len  # noqa: E731
    for run in expand_grid(sweep, flops_fn=fpt):
        f = 1000.0 * (2 if run.model == "h32" else 1) + run.max_seq_len
        assert run.max_steps == math.ceil(1e9 / (f * 256))
    # world size multiplies the tokens per step.
    sweep = load_sweep(write_sweep(tmp_path, tokens_per_run=2048, launcher={"kind": "torchrun", "nproc": 2}))
    assert {(r.tokens_per_step, r.max_steps) for r in expand_grid(sweep)} == {(512, 4)}


def test_epoch_budget_of_the_base_config_or_the_sweeps_tokens(tmp_path):
    # A base config in epochs (early stopping): each run keeps them, trained to convergence.
    runs = expand_grid(load_sweep(write_sweep(tmp_path, overrides=["train.max_epochs=3"])))
    cfg = load_config(PretrainConfig, REPO_ROOT / BASE, runs[0].overrides)
    assert {(r.max_epochs, r.max_steps) for r in runs} == {(3.0, 0)} and cfg.train.max_epochs == 3
    # A token budget wins over the base config's epochs (the trainer lets epochs win over steps).
    runs = expand_grid(load_sweep(write_sweep(tmp_path, tokens_per_run=1000, overrides=["train.max_epochs=3"])))
    cfg = load_config(PretrainConfig, REPO_ROOT / BASE, runs[0].overrides)
    assert cfg.train.max_epochs == 0 and cfg.train.max_steps == runs[0].max_steps == math.ceil(1000 / 256)


def test_bad_sweeps_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="data.max_seq_len: 512 > data.token_budget=256"):
        expand_grid(load_sweep(write_sweep(tmp_path, max_seq_lens=[512])))
    with pytest.raises(ConfigError, match="unknown key"):
        expand_grid(load_sweep(write_sweep(tmp_path, overrides=["train.nonsense=1"])))
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(write_sweep(tmp_path, seed=[0]))
    with pytest.raises(ConfigError, match="not both"):
        load_sweep(write_sweep(tmp_path, tokens_per_run=10, compute_budget=1.0))
    with pytest.raises(ConfigError, match="launcher.kind"):
        load_sweep(write_sweep(tmp_path, launcher={"kind": "mpirun"}))
    with pytest.raises(ConfigError, match="duplicate run names"):
        expand_grid(load_sweep(write_sweep(tmp_path, presets=["lum-tiny", "lum-tiny"])))


def test_commands_per_launcher(tmp_path):
    script = str(REPO_ROOT / "launch" / "pretrain.py")
    for launcher, prefix in [
        ({"kind": "python"}, [sys.executable, script]),
        ({"kind": "torchrun", "nproc": 2}, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                            "--nnodes=1", script]),
        ({"kind": "deepspeed", "nproc": 8, "num_nodes": 2, "extra_args": ["--hostfile", "hf"]},
         ["deepspeed", "--num_gpus=8", "--num_nodes=2", "--hostfile", "hf", script]),
    ]:
        sweep = load_sweep(write_sweep(tmp_path, launcher=launcher))
        run = expand_grid(sweep)[0]
        cmd = build_command(sweep, run)
        assert cmd[: len(prefix)] == prefix
        assert cmd[len(prefix):] == ["--config", str(REPO_ROOT / BASE), *run.overrides]


def test_run_sweep_skips_finished_and_survives_failures(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, max_seq_lens=[32], seeds=[0], tokens_per_run=512,
                                   launcher={"kind": "python", "env": {"LUM_TEST_ENV": "1"}}))
    runs = expand_grid(sweep)
    calls, lines = [], []
    statuses = run_sweep(sweep, runs, fake_runner(calls, fail_names=("lum-tiny_L32_seed0",)), lines.append)
    assert [s.status for s in statuses] == ["failed", "ok"] and statuses[0].returncode == 1
    assert len(calls) == 2 and parse_overrides(calls[1])["train.output_dir"] == str(runs[1].output_dir)
    assert any("FAILED" in line and "lum-tiny_L32_seed0" in line for line in lines)
    # Re-running: the finished run is skipped, the failed one is tried again (and now succeeds).
    calls.clear()
    statuses = run_sweep(sweep, runs, fake_runner(calls), lines.append)
    assert [s.status for s in statuses] == ["ok", "skipped"] and len(calls) == 1
    assert parse_overrides(calls[0])["train.output_dir"] == str(runs[0].output_dir)


def test_exit_zero_without_result_is_a_failure(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, presets=["lum-tiny"], max_seq_lens=[32], seeds=[0]))
    statuses = run_sweep(sweep, expand_grid(sweep), lambda cmd, env, log: 0, lambda s: None)
    assert statuses[0].status == "failed" and statuses[0].returncode == 0


def run_model(sweep, run):
    """A sweep run's config and its model config (tables sized for a dummy dataset: only the shape matters)."""
    cfg = load_config(PretrainConfig, resolve_path(sweep.base_config), run.overrides)
    return cfg, load_preset(cfg.model.preset, num_items=100, cond_vocab_sizes=[2], item_attr_vocab_sizes=[3],
                            **cfg.model.overrides)


def test_shipped_sweep_configs_expand():
    size_sweep = load_sweep(REPO_ROOT / "configs/sweeps/synthetic-size.yaml")
    size = expand_grid(size_sweep)
    assert len(size) == 5 and {r.max_seq_len for r in size} == {512}
    assert {r.max_steps * r.tokens_per_step for r in size} == {3_145_728}  # one token budget for every run
    for run in size:  # the item table grows with the model (probes.md: a fixed 64-wide table flattened the law)
        model = run_model(size_sweep, run)[1]
        assert model.item_emb_dim == model.hidden_size
    context = expand_grid(load_sweep(REPO_ROOT / "configs/sweeps/synthetic-context.yaml"))
    assert {r.max_seq_len for r in context} == {64, 128, 256, 512, 1024} and len({r.model for r in context}) == 1
    assert {r.max_steps * r.tokens_per_step for r in context} == {3_145_728}
    ladder_sweep = load_sweep(REPO_ROOT / "configs/sweeps/cluster-ladder.yaml")
    ladder = expand_grid(ladder_sweep)
    assert len(ladder) == 30 and ladder_sweep.launcher.kind == "deepspeed"
    assert {r.tokens_per_step for r in ladder} == {8192 * 8}
    for run in ladder:  # muP-style rates: lr 1.2e-3 at lum-19m's width 512, 1.5e-4 for lum-7b's hidden matrices
        cfg, model = run_model(ladder_sweep, run)
        width = model.hidden_size
        assert cfg.optim.lr * cfg.optim.hidden_lr_scale(width) == pytest.approx(1.2e-3 * 512 / width)
    for name, epochs in (("beauty-size", 40), ("mlsmall-size", 120)):  # real data: each size to convergence
        real = expand_grid(load_sweep(REPO_ROOT / f"configs/sweeps/{name}.yaml"))
        assert len(real) >= 5 and {(r.max_epochs, r.max_steps) for r in real} == {(epochs, 0)}
    # Every sweep with a yardstick (SASRec at the same sizes or lengths) pairs with it run for run
    paired = [sweep for sweep in map(load_sweep, sorted((REPO_ROOT / "configs/sweeps").glob("*.yaml")))
              if sweep.yardstick]
    assert {s.name for s in paired} == {"beauty-size", "mlsmall-size", "ml100k-context", "mlsmall-context"}
    for lum_sweep in paired:
        sasrec_sweep = load_sweep(REPO_ROOT / lum_sweep.yardstick)
        for lum_run, sasrec_run in zip(expand_grid(lum_sweep), expand_grid(sasrec_sweep), strict=True):
            lum_model, sasrec_model = run_model(lum_sweep, lum_run)[1], run_model(sasrec_sweep, sasrec_run)[1]
            assert lum_run.name == sasrec_run.name and sasrec_model.model_type == "sasrec"
            assert (sasrec_model.hidden_size, sasrec_model.num_layers) == (lum_model.hidden_size, lum_model.num_layers)
            assert sasrec_model.max_position >= sasrec_run.max_seq_len // 2  # one item token per behaviour
    for name in ("ml100k-context", "mlsmall-context"):  # 32 .. 512 behaviours, each to convergence
        real = expand_grid(load_sweep(REPO_ROOT / f"configs/sweeps/{name}.yaml"))
        assert {r.max_seq_len for r in real} == {64, 128, 256, 512, 1024} and {r.max_epochs for r in real} == {120}


def test_subprocess_runner_logs_and_returns_status(tmp_path):
    from lum_dist.scaling.grid import subprocess_runner

    log = tmp_path / "run" / "train.log"
    code = "import os, sys; print('hello', os.environ['LUM_X']); sys.exit(3)"
    assert subprocess_runner([sys.executable, "-c", code], {"LUM_X": "42", "PATH": ""}, log) == 3
    assert log.read_text().strip() == "hello 42"


def test_per_preset_run_overrides_reach_only_that_preset(tmp_path):
    path = write_sweep(tmp_path, presets=[{"name": "a", "preset": "lum-tiny", "run_overrides": ["optim.lr=4.0e-3"]},
                                          {"name": "b", "preset": "lum-tiny"}], max_seq_lens=[32], seeds=[0])
    lrs = {r.model: [o for o in r.overrides if o.startswith("optim.lr=")] for r in expand_grid(load_sweep(path))}
    assert lrs == {"a": ["optim.lr=4.0e-3"], "b": []}
