"""Run configuration: plain dataclasses, loaded from YAML, overridden with ``a.b=value`` pairs.

Model hyperparameters live in :class:`lum_dist.model.config.LUMConfig` (a transformers
``PretrainedConfig``); a run names a preset file from ``configs/model/`` and may override fields.
Unknown keys are errors, so a typo in a YAML file or on the command line never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DataConfig:
    path: str = "runs/data/synthetic"  # prepared UBS dataset (see lum_dist.data.schema)
    # How to make ``path`` if it does not exist: a source spec for lum_dist.data.prepare, e.g.
    # {"format": "synthetic"} or {"format": "s3rec", "input": "${LUM_DATA_DIR}/s3rec-seq/Beauty.txt"}.
    prepare: dict[str, Any] = field(default_factory=lambda: {"format": "synthetic"})
    max_seq_len: int = 200  # tokens per sequence (two per behaviour); the most recent are kept
    long_sequences: str = "truncate"  # "truncate" (keep the most recent) | "window" (split into windows)
    token_budget: int = 2048  # tokens per packed row
    rows_per_batch: int = 1  # packed rows per micro-batch per rank
    packing: str = "pack"  # "pack" (best-fit bin packing) | "pad" (one sequence per row, padded: a baseline)
    shuffle_buffer: int = 2048  # sequences shuffled and packed together (the packing window)
    num_workers: int = 0
    seed: int = 0
    cond_dropout: float = 0.2  # P(condition fields -> MASK) per condition token, so generic queries work
    item_attributes: bool = False  # item tokens carry their item's attribute fields (e.g. category) too


@dataclass
class ModelSpec:
    preset: str = "lum-tiny"  # file name under configs/model/ (without .yaml) or a path
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    # "full": softmax over every item (exact; for catalogues whose [targets x items] logits fit in memory);
    # "in_batch": sampled softmax over the positives of every rank (+ num_random_negatives uniform ids).
    negatives: str = "in_batch"
    similarity: str = "cosine"  # "cosine" | "dot"
    temperature: float = 0.05
    learnable_temperature: bool = False
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    # in_batch only:
    gather_negatives: bool = True  # in-batch negatives from every data-parallel rank
    logq_correction: bool = True  # subtract log q(candidate): in-batch negatives are popularity-sampled
    num_random_negatives: int = 0  # extra uniformly sampled negatives, shared by all ranks
    mask_false_negatives: bool = True  # a negative equal to the positive item is not a negative


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    max_steps: int = 1000
    max_epochs: float = 0.0  # > 0: train this many passes over the training tokens (wins over max_steps)
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    cpu_adam: bool = False  # DeepSpeedCPUAdam (compiles an op on first use); torch AdamW otherwise
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0  # validate every N steps (0: never during training); the best checkpoint is kept
    eval_every_epochs: float = 0.0  # > 0: validate every this many epochs (wins over eval_every)
    early_stopping_patience: int = 0  # stop after N validations without a new best (0: never)
    save_every: int = 0  # 0: only at the end (and at each new best validation)
    keep_last: int = 2  # complete checkpoints kept, besides the best one
    resume: str = "auto"  # "auto" | "never" | a checkpoint directory


@dataclass
class EvalConfig:
    split: str = "valid"  # the split validated on during training (model selection, early stopping)
    metric: str = "ndcg@10"  # the selection metric: hr@K, ndcg@K (K in ks) or mrr
    final_splits: list[str] = field(default_factory=lambda: ["valid", "test"])  # evaluated once, at the end
    ks: list[int] = field(default_factory=lambda: [10, 20])
    max_users: int = 0  # 0: all users
    token_budget: int = 8192


@dataclass
class LoggingConfig:
    wandb_project: str = "lum-dist"
    wandb_mode: str = "offline"  # "online" | "offline" | "disabled" ($WANDB_MODE wins)
    run_name: str = ""


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# YAML + overrides


class ConfigError(ValueError):
    pass


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string: accept what Python reads as a number, reject the rest
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, apply_overrides(data, list(overrides)), where=str(path or cls.__name__))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
