"""Scaling-law sweeps: a sweep config, its expansion into pretraining runs, and a resumable runner.

A sweep is the cross product presets x max_seq_lens x seeds over one base pretraining config
(``configs/pretrain/*.yaml``). Each run is ``launch/pretrain.py --config <base> key=value ...`` with
its own output directory; a run whose ``result.json`` exists is finished and skipped, so re-running a
sweep resumes it (an interrupted run itself resumes from its newest checkpoint: ``train.resume=auto``).

Run length is set so that every run sees the same number of tokens (``tokens_per_run``) or spends the
same training compute (``compute_budget`` FLOPs = flops_per_token x tokens), else it is the base config's:
its ``train.max_epochs`` (each run trained to convergence, with early stopping) or its ``max_steps``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lum_dist.config import REPO_ROOT, ConfigError, PretrainConfig, apply_overrides, from_dict, load_config
from lum_dist.model import flops_per_token, load_preset

LAUNCHERS = ("python", "torchrun", "deepspeed")


@dataclass
class PresetSpec:
    name: str  # label of the model size in run names, tables and plots
    preset: str = ""  # configs/model/<preset>.yaml (default: ``name``)
    overrides: dict[str, Any] = field(default_factory=dict)  # LUMConfig fields, e.g. {hidden_size: 64}
    run_overrides: list[str] = field(default_factory=list)  # run config, e.g. ["optim.lr=1e-3"] (per-size LR)

    def __post_init__(self) -> None:
        self.preset = self.preset or self.name


@dataclass
class LauncherConfig:
    kind: str = "python"  # "python" (one process) | "torchrun" | "deepspeed"
    nproc: int = 1  # processes per node
    num_nodes: int = 1  # nodes (deepspeed --hostfile / torchrun --nnodes); world size = nproc * num_nodes
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--hostfile", "hostfile"]
    env: dict[str, str] = field(default_factory=dict)  # e.g. {DS_ACCELERATOR: cpu, OMP_NUM_THREADS: "1"}

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ConfigError(f"launcher.kind={self.kind!r}: expected one of {LAUNCHERS}")
        if self.kind == "python" and self.nproc * self.num_nodes != 1:
            raise ConfigError("launcher.kind=python runs one process: use torchrun or deepspeed for nproc > 1")

    @property
    def world_size(self) -> int:
        return self.nproc * self.num_nodes


@dataclass
class SweepConfig:
    name: str
    base_config: str  # pretraining YAML, relative to the repository root or absolute
    presets: list[PresetSpec]
    max_seq_lens: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    tokens_per_run: int = 0  # > 0: max_steps = ceil(tokens_per_run / tokens per optimizer step)
    compute_budget: float = 0.0  # > 0: max_steps = ceil(budget / (flops_per_token * tokens per step))
    overrides: list[str] = field(default_factory=list)  # ``section.key=value`` for every run
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    out_dir: str = "runs/sweeps/default"
    report_dir: str = "benchmarks/results/scaling"
    memory_presets: list[str] = field(default_factory=list)  # presets for the report's GPU table
    memory_num_items: int = 1_000_000  # item table size assumed by that table
    # another sweep YAML whose runs have this sweep's run names (e.g. SASRec at the same sizes): the report
    # prints every run beside the yardstick's run of the same name
    yardstick: str = ""

    def __post_init__(self) -> None:
        if not self.presets or not self.max_seq_lens or not self.seeds:
            raise ConfigError(f"sweep {self.name}: presets, max_seq_lens and seeds must be non-empty")
        if self.tokens_per_run and self.compute_budget:
            raise ConfigError(f"sweep {self.name}: set tokens_per_run or compute_budget, not both")


@dataclass
class Run:
    name: str
    model: str  # PresetSpec.name
    max_seq_len: int
    seed: int
    max_steps: int
    tokens_per_step: int
    overrides: list[str]  # passed to launch/pretrain.py after the base config
    output_dir: Path
    max_epochs: float = 0.0  # > 0 (and max_steps 0): the run's length is the base config's epochs

    @property
    def result_path(self) -> Path:
        return self.output_dir / "result.json"

    def finished(self) -> bool:
        return self.result_path.is_file()


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """Read a sweep YAML; a preset may be a bare name or a mapping (see PresetSpec)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config not found: {path}")
    data = apply_overrides(yaml.safe_load(path.read_text()) or {}, list(overrides))
    presets = data.get("presets")
    if isinstance(presets, list):
        data["presets"] = [{"name": p} if isinstance(p, str) else p for p in presets]
    return from_dict(SweepConfig, data, where=str(path))


def resolve_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def _fmt(value: Any) -> str:
    """A value as an override string that YAML parses back to the same value."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if yaml.safe_load(text) == value else json.dumps(value)


def preset_flops_per_token(preset: PresetSpec, cfg: PretrainConfig) -> float:
    """Training FLOPs per token of ``preset`` at ``cfg.data.max_seq_len`` (lum_dist.model.flops_per_token).

    Vocabulary sizes do not enter the matmul FLOPs; one condition field stands in for the dataset's (it
    only widens the input projection, a negligible share), so no dataset is needed to plan a sweep."""
    model_cfg = load_preset(preset.preset, num_items=1000, cond_vocab_sizes=[100], **preset.overrides)
    return float(flops_per_token(model_cfg, cfg.data.max_seq_len))


def tokens_per_step(cfg: PretrainConfig, world_size: int) -> int:
    """Token capacity of one optimizer step: packed rows x token budget x accumulation x ranks."""
    return cfg.data.token_budget * cfg.data.rows_per_batch * cfg.train.grad_accum * world_size


def expand_grid(
    sweep: SweepConfig,
    flops_fn: Callable[[PresetSpec, PretrainConfig], float] = preset_flops_per_token,
) -> list[Run]:
    """Every (preset, max_seq_len, seed) run of ``sweep`` with its overrides, output dir and step count.

    Each run's full config is loaded (unknown keys and bad values fail here, before anything launches).
    """
    base = resolve_path(sweep.base_config)
    out_root = resolve_path(sweep.out_dir)
    runs: list[Run] = []
    for preset in sweep.presets:
        for seq_len in sweep.max_seq_lens:
            for seed in sweep.seeds:
                name = f"{preset.name}_L{seq_len}_seed{seed}"
                out = out_root / name
                overrides = [
                    *sweep.overrides,
                    f"model.preset={_fmt(preset.preset)}",
                    *(f"model.overrides.{k}={_fmt(v)}" for k, v in preset.overrides.items()),
                    *preset.run_overrides,
                    f"data.max_seq_len={seq_len}",
                    f"data.seed={seed}",
                    f"train.seed={seed}",
                    f"train.output_dir={_fmt(str(out))}",
                    f"logging.run_name={_fmt(f'{sweep.name}/{name}')}",
                ]
                cfg = load_config(PretrainConfig, base, overrides)
                per_step = tokens_per_step(cfg, sweep.launcher.world_size)
                steps = cfg.train.max_steps
                if sweep.tokens_per_run:
                    steps = math.ceil(sweep.tokens_per_run / per_step)
                elif sweep.compute_budget:
                    steps = math.ceil(sweep.compute_budget / (flops_fn(preset, cfg) * per_step))
                steps, epochs = max(1, steps), 0.0
                budget = [f"train.max_steps={steps}"]
                if sweep.tokens_per_run or sweep.compute_budget:
                    budget.append("train.max_epochs=0")  # the sweep's budget, not the base config's epochs
                elif cfg.train.max_epochs > 0:  # the base config's epochs (and early stopping) set the length
                    steps, epochs, budget = 0, cfg.train.max_epochs, []
                runs.append(Run(name, preset.name, seq_len, seed, steps, per_step, [*overrides, *budget], out,
                                epochs))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {sweep.name}: duplicate run names (two presets share a name?)")
    return runs


def launch_command(launcher: LauncherConfig, base_config: str | Path, overrides: list[str]) -> list[str]:
    """``launch/pretrain.py --config <base_config> <overrides>`` under ``launcher``."""
    script = [str(REPO_ROOT / "launch" / "pretrain.py"), "--config", str(resolve_path(str(base_config)))]
    if launcher.kind == "python":
        prefix = [sys.executable]
    elif launcher.kind == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launcher.nproc}",
                  f"--nnodes={launcher.num_nodes}", *launcher.extra_args]
    else:
        prefix = ["deepspeed", f"--num_gpus={launcher.nproc}", f"--num_nodes={launcher.num_nodes}",
                  *launcher.extra_args]
    return [*prefix, *script, *overrides]


def build_command(sweep: SweepConfig, run: Run) -> list[str]:
    """The command line of one run of ``sweep``."""
    return launch_command(sweep.launcher, sweep.base_config, run.overrides)


def subprocess_runner(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run one training command, its output going to ``log_path``; returns the exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode


@dataclass
class RunStatus:
    run: Run
    status: str  # "skipped" (already finished) | "ok" | "failed"
    returncode: int | None = None
    seconds: float = 0.0


def run_sweep(
    sweep: SweepConfig,
    runs: list[Run],
    runner: Callable[[list[str], dict[str, str], Path], int] = subprocess_runner,
    log: Callable[[str], None] = print,
) -> list[RunStatus]:
    """Run ``runs`` one after another; finished runs are skipped and a failure does not stop the sweep.

    A run counts as finished only if it exits with status 0 AND wrote its result.json."""
    env = {**os.environ, **sweep.launcher.env}
    statuses = []
    for i, run in enumerate(runs, 1):
        if run.finished():
            log(f"[sweep] {i}/{len(runs)} {run.name}: finished earlier, skipped")
            statuses.append(RunStatus(run, "skipped"))
            continue
        cmd = build_command(sweep, run)
        log_path = run.output_dir / "train.log"
        log(f"[sweep] {i}/{len(runs)} {run.name}: {shlex.join(cmd)}  (log: {log_path})")
        t0 = time.perf_counter()
        rc = runner(cmd, env, log_path)
        dt = time.perf_counter() - t0
        ok = rc == 0 and run.finished()
        if not ok:
            why = f"exit status {rc}" if rc != 0 else "exited 0 but wrote no result.json"
            log(f"[sweep] {run.name} FAILED ({why}) after {dt:.0f} s; see {log_path}; going on")
        statuses.append(RunStatus(run, "ok" if ok else "failed", rc, dt))
    return statuses
