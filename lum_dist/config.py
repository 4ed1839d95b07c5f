"""Run configuration: plain dataclasses, loaded from YAML, overridden with ``a.b=value`` pairs.

Model hyperparameters live in :class:`lum_dist.model.config.LUMConfig` (a transformers
``PretrainedConfig``); a run names a preset file from ``configs/model/`` and may override fields.
Unknown keys are errors, so a typo in a YAML file or on the command line never passes silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


def check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError ``key: message`` unless ``ok`` (the cross-field rules of each section)."""
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


Split = Literal["valid", "test"]


@dataclass
class DataConfig:
    path: str = "runs/data/synthetic"  # prepared UBS dataset (see lum_dist.data.schema)
    # How to make ``path`` if it does not exist: a source spec for lum_dist.data.prepare, e.g.
    # {"format": "synthetic"} or {"format": "s3rec", "input": "${LUM_DATA_DIR}/s3rec-seq/Beauty.txt"}.
    prepare: dict[str, Any] = field(default_factory=lambda: {"format": "synthetic"})
    max_seq_len: int = 200  # tokens per sequence (two per behaviour); the most recent are kept
    long_sequences: Literal["truncate", "window"] = "truncate"  # keep the most recent | split into windows
    token_budget: int = 2048  # tokens per packed row
    rows_per_batch: int = 1  # packed rows per micro-batch per rank
    packing: Literal["pack", "pad"] = "pack"  # best-fit bin packing | one sequence per row, padded (a baseline)
    shuffle_buffer: int = 2048  # sequences shuffled and packed together (the packing window)
    num_workers: int = 0
    seed: int = 0
    cond_dropout: float = 0.2  # P(condition fields -> MASK) per condition token, so generic queries work
    item_attributes: bool = False  # item tokens carry their item's attribute fields (e.g. category) too

    def __post_init__(self) -> None:
        check(self.max_seq_len >= 2, "max_seq_len", f"{self.max_seq_len} < 2 (one behaviour is two tokens)")
        check(self.max_seq_len <= self.token_budget, "max_seq_len",
              f"{self.max_seq_len} > data.token_budget={self.token_budget}: a sequence must fit in a packed row")
        check(self.rows_per_batch >= 1 and self.shuffle_buffer >= 1 and self.num_workers >= 0, "rows_per_batch",
              "rows_per_batch and shuffle_buffer must be >= 1, num_workers >= 0")
        check(0.0 <= self.cond_dropout <= 1.0, "cond_dropout", f"{self.cond_dropout} is not a probability")


@dataclass
class ModelSpec:
    preset: str = "lum-tiny"  # file name under configs/model/ (without .yaml) or a path
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    # "full": softmax over every item (exact; for catalogues whose [targets x items] logits fit in memory);
    # "in_batch": sampled softmax over the positives of every rank (+ num_random_negatives uniform ids).
    negatives: Literal["full", "in_batch"] = "in_batch"
    similarity: Literal["cosine", "dot"] = "cosine"
    temperature: float = 0.05
    learnable_temperature: bool = False
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    # in_batch only:
    gather_negatives: bool = True  # in-batch negatives from every data-parallel rank
    logq_correction: bool = True  # subtract log q(candidate): in-batch negatives are popularity-sampled
    num_random_negatives: int = 0  # extra uniformly sampled negatives, shared by all ranks
    mask_false_negatives: bool = True  # a negative equal to the positive item is not a negative
    # LUM only: each item token also predicts the next behaviour's item (SASRec's objective, from the same
    # pass), weighted against the condition tokens' loss; 0 = the paper's next-condition-item loss alone.
    item_token_weight: float = 0.0
    # LUM only: each condition token also predicts the item `future_offset` behaviours after its own, weighted
    # against the next-item loss (PinnerFormer's dense all-action loss, one offset): the user's interest beyond
    # the next transition. 0 = off.
    future_weight: float = 0.0
    future_offset: int = 1
    # False: the future target scores the condition token's output without the previous-item skip, which then
    # learns next-item transitions only (the item after next would pull it away from them).
    future_reads_skip: bool = True
    # True: the future target scores out + H out (H a linear map, zero at init) in place of the output itself: the
    # backbone learns from the item after next, while the next-item output need not point at it.
    future_head: bool = False
    label_smoothing: float = 0.0  # full only: the target puts this much mass evenly over every item
    # Items the user already had before a target (in its packed sequence) are no candidates for it, as in the
    # evaluation's full ranking, which leaves the user's history out: the loss stops spending the embedding
    # space on pushing them below the next item.
    exclude_seen: bool = False
    # A second training pass with fresh dropout gives every target a second view of its user representation; an
    # InfoNCE between the two views (negatives: the other targets' second views on every rank, a view of the same
    # next item excepted) regularises the representation (DuoRec, Qiu et al. WSDM 2022; SimCSE). 0 = off.
    view_contrast_weight: float = 0.0
    view_contrast_temperature: float = 1.0  # cosine similarity / this

    def __post_init__(self) -> None:
        check(self.view_contrast_weight >= 0, "view_contrast_weight", f"{self.view_contrast_weight} < 0")
        check(self.view_contrast_temperature > 0, "view_contrast_temperature",
              f"{self.view_contrast_temperature}: need > 0")
        check(0 < self.min_temperature <= self.temperature <= self.max_temperature, "temperature",
              f"need 0 < min_temperature ({self.min_temperature}) <= temperature ({self.temperature}) <= "
              f"max_temperature ({self.max_temperature})")
        check(self.num_random_negatives >= 0, "num_random_negatives", "must be >= 0")
        check(self.item_token_weight >= 0, "item_token_weight", f"{self.item_token_weight} < 0")
        check(self.future_weight >= 0, "future_weight", f"{self.future_weight} < 0")
        check(self.future_offset >= 1, "future_offset", f"{self.future_offset}: need >= 1 behaviour ahead")
        check(self.future_weight > 0 or not self.future_head, "future_head", "needs future_weight > 0 (nothing reads it)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"{self.label_smoothing}: need [0, 1)")
        check(self.negatives == "full" or not self.label_smoothing, "label_smoothing",
              "needs loss.negatives=full (a sampled softmax has no fixed set of items to smooth over)")
        check(self.negatives == "in_batch" or not self.num_random_negatives, "num_random_negatives",
              "needs loss.negatives=in_batch (the full softmax already scores every item)")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio (1.0: constant after warmup)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on weight matrices only (not on norms, biases, and embedding tables unless:)
    decay_embeddings: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    # > 0: muP-style learning rates across widths (lum_dist.parallel.param_groups): the matrices that read the
    # hidden stream train at lr x width_base / hidden_size, so lr tuned at width_base carries to other widths.
    width_base: int = 0
    # > 0: keep an exponential moving average of the weights (lum_dist.train.ema); evaluation, selection, export
    # and query use it. Uniform over the first 1 / (1 - ema_decay) steps.
    ema_decay: float = 0.0

    def hidden_lr_scale(self, hidden_size: int) -> float:
        return self.width_base / hidden_size if self.width_base else 1.0

    def __post_init__(self) -> None:
        check(self.lr >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0, "lr",
              "lr, weight_decay, grad_clip and warmup_steps must be >= 0")
        check(self.width_base >= 0, "width_base", f"{self.width_base} must be >= 0 (0: one learning rate)")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"{self.min_lr_ratio} is not in [0, 1]")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"{self.ema_decay} is not in [0, 1) (0: no average)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", f"{self.betas}: need two in [0, 1)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    max_steps: int = 1000
    max_epochs: float = 0.0  # > 0: train this many passes over the training tokens (wins over max_steps)
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    zero_stage: Literal[0, 1, 2, 3] = 3
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

    def __post_init__(self) -> None:
        check(self.max_steps >= 1 and self.grad_accum >= 1 and self.log_every >= 1, "max_steps",
              "max_steps, grad_accum and log_every must be >= 1")
        check(min(self.max_epochs, self.eval_every, self.eval_every_epochs, self.early_stopping_patience,
                  self.save_every, self.keep_last) >= 0, "max_epochs",
              "max_epochs, eval_every(_epochs), early_stopping_patience, save_every and keep_last must be >= 0")
        check(not self.offload_params or self.zero_stage == 3, "offload_params", "needs train.zero_stage=3")
        check(not self.early_stopping_patience or self.eval_every or self.eval_every_epochs,
              "early_stopping_patience", "needs train.eval_every or train.eval_every_epochs (validation to stop on)")


@dataclass
class EvalConfig:
    split: Split = "valid"  # the split validated on during training (model selection, early stopping)
    metric: str = "ndcg@10"  # the selection metric: hr@K, ndcg@K (K in ks) or mrr
    final_splits: list[Split] = field(default_factory=lambda: ["valid", "test"])  # evaluated once, at the end
    ks: list[int] = field(default_factory=lambda: [10, 20])
    max_users: int = 0  # 0: all users
    token_budget: int = 8192
    # > 0: the final evaluation also ranks each item with the query of its own attribute value (one query per
    # value of the first item-attribute field, e.g. per category: "knowledge querying"), reported as
    # {split}/attrq_* beside the generic query's metrics. The weight of that query within its value, in (0, 1]
    # (lum_dist.eval.metrics.attribute_query_scores). Selection during training stays on the generic query.
    attribute_query_weight: float = 0.0
    # True: the final evaluation also asks each user with the held-out behaviour's own condition token (LUM's
    # training task, next-condition-item), reported as {split}/cond_*. It is told something about the held-out
    # item (e.g. its category): not comparable with a sequential recommender's numbers.
    condition_query: bool = False
    # True (the S3-Rec protocol): the user's history is no candidate, and a held-out item the user already had is
    # a miss. False: every item is a candidate, for data where repeating an item is what is to be predicted (e.g.
    # page views, the long-range synthetic data's recurring interests).
    exclude_history: bool = True

    def __post_init__(self) -> None:
        check(bool(self.ks) and min(self.ks) >= 1, "ks", f"{self.ks}: need cutoffs >= 1")
        check(0.0 <= self.attribute_query_weight <= 1.0, "attribute_query_weight",
              f"{self.attribute_query_weight} is not in [0, 1]")
        metrics = ["mrr"] + [f"{m}@{k}" for m in ("hr", "ndcg") for k in self.ks]
        check(self.metric in metrics, "metric",
              f"{self.metric!r} is not one of {', '.join(metrics)}{did_you_mean(self.metric, metrics)}")
        check(self.max_users >= 0 and self.token_budget >= 2, "max_users", "max_users >= 0, token_budget >= 2")


@dataclass
class LoggingConfig:
    wandb_project: str = "lum-dist"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"  # $WANDB_MODE wins
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

    def __post_init__(self) -> None:
        check(self.data.max_seq_len <= self.eval.token_budget, "eval.token_budget",
              f"{self.eval.token_budget} < data.max_seq_len={self.data.max_seq_len}")
        check(not (self.eval.attribute_query_weight and self.loss.learnable_temperature),
              "eval.attribute_query_weight", "attribute queries score with the fixed loss.temperature; "
              "loss.learnable_temperature learns another one")
        check(not self.model.overrides.get("target_id_dropout") or self.loss.negatives == "full",
              "model.overrides.target_id_dropout", "hides ids in the full softmax's item table; "
              f"loss.negatives={self.loss.negatives!r} scores sampled items")


# ---------------------------------------------------------------------------------------------
# The commands that read a trained model: flat configs, from flags (``--max-users 40``) over an optional YAML
# file (``--config``). Their help texts are the ``--help`` of launch/evaluate.py, export.py and query.py.

GENERIC_CONDITION = "*"  # the generic query: every condition field MASK
QUERY_MANIFEST = "manifest.json"  # a query directory's index, written last (lum_dist/query/job.py)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_CHECKPOINT_HELP = ("a checkpoint dir (checkpoints/step_N), a checkpoints/ folder or a run's output dir; a folder "
                    "resolves to its best validation checkpoint, else its newest complete one")


def field_help(text: str) -> dict[str, Any]:
    """A field's ``--help`` text (``field(metadata=field_help(...))``)."""
    return {"help": text}


@dataclass
class EvaluateConfig:
    """launch/evaluate.py: full-ranking evaluation of a checkpoint, beside the popularity baseline."""
    checkpoint: str = field(metadata=field_help(_CHECKPOINT_HELP))
    split: list[Split] = field(default_factory=lambda: ["valid", "test"], metadata=field_help(
        "held-out behaviours to rank: 'valid' (second last, history before it) and/or 'test' (last)"))
    max_users: int = field(default=0, metadata=field_help(
        "evaluate only the first N users with a held-out behaviour, in dataset order (0: every such user)"))
    ks: list[int] = field(default_factory=lambda: [10, 20], metadata=field_help(
        "cut-offs K of HR@K and NDCG@K; MRR is always reported"))
    out: str | None = field(default=None, metadata=field_help(
        "also write <out>.json (every metric, checkpoint, step, dataset) and <out>.md (the table)"))
    attribute_query_weight: float = field(default=0.0, metadata=field_help(
        "> 0: also rank each item with the query of its attribute value (one query per value, e.g. per "
        "category), reported as attrq_*; the weight of that query within its value, in (0, 1]"))
    condition_query: bool = field(default=False, metadata=field_help(
        "also ask each user with the held-out behaviour's own condition token (LUM's training task), reported "
        "as cond_*; it is told e.g. the item's category: not comparable with SASRec"))
    max_seq_len: int = field(default=0, metadata=field_help(
        "tokens of history to read (2 per behaviour, plus the query); 0: the run's data.max_seq_len"))

    def __post_init__(self) -> None:
        check(bool(self.split), "split", "name at least one split")
        check(bool(self.ks) and min(self.ks) >= 1, "ks", f"{self.ks}: need cut-offs >= 1")
        check(self.max_users >= 0, "max_users", f"{self.max_users}: need >= 0")
        check(0.0 <= self.attribute_query_weight <= 1.0, "attribute_query_weight",
              f"{self.attribute_query_weight} is not in [0, 1]")
        check(self.max_seq_len == 0 or self.max_seq_len >= 3, "max_seq_len",
              f"{self.max_seq_len}: need 0 (the run's) or >= 3 (one behaviour and the query)")


@dataclass
class ExportConfig:
    """launch/export.py: user and item embeddings (parquet) and, optionally, a save_pretrained model."""
    checkpoint: str = field(metadata=field_help(_CHECKPOINT_HELP))
    out: str = field(metadata=field_help("output folder (replaced atomically)"))
    split: Split = field(default="test", metadata=field_help(
        "user embeddings from the history before this split's held-out behaviour"))
    max_users: int = field(default=0, metadata=field_help(
        "export only the first N users with a held-out behaviour (0: all)"))
    hf: bool = field(default=False, metadata=field_help("also write <out>/model (save_pretrained, safetensors)"))

    def __post_init__(self) -> None:
        check(self.max_users >= 0, "max_users", f"{self.max_users}: need >= 0")


@dataclass
class QueryConfig:
    """launch/query.py (step 2): many condition queries per user in one pass, written as parquet for serving."""
    checkpoint: str = field(metadata=field_help(_CHECKPOINT_HELP))
    out: str = field(metadata=field_help("output folder (created; re-used to resume the same job)"))
    conditions: list[str] = field(default_factory=lambda: [GENERIC_CONDITION], metadata=field_help(
        "one query per spec and user: '*' (generic: every condition field MASK), '<field>=<raw value>' "
        "(e.g. category=Books), or '<field>=ALL' (every training value of the field)"))
    split: Split = field(default="test", metadata=field_help(
        "history up to the test target (valid_end) or the validation target (train_end)"))
    lag: int = field(default=0, metadata=field_help(
        "end each history this many behaviours before the split's target (outputs that also serve the "
        "downstream training requests before it)"))
    token_budget: int = field(default=8192, metadata=field_help(
        "tokens per packed row (histories plus their query tokens, many users per row); bounds the memory "
        "of a forward pass"))
    users_per_shard: int = field(default=4096, metadata=field_help(
        "users per output parquet shard, the unit of work per rank and of resume"))
    max_users: int = field(default=0, metadata=field_help("answer only the first N users of the dataset (0: all)"))
    device: str = field(default="auto", metadata=field_help(
        "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'; bf16 on CUDA"))

    def __post_init__(self) -> None:
        check(bool(self.conditions), "conditions", "name at least one condition spec")
        check(self.lag >= 0 and self.max_users >= 0, "lag", "lag and max_users must be >= 0")
        check(self.token_budget >= 2 and self.users_per_shard >= 1, "token_budget",
              f"token_budget={self.token_budget} (>= 2), users_per_shard={self.users_per_shard} (>= 1)")
        check(bool(_DEVICE.fullmatch(self.device)), "device",
              f"{self.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


# ---------------------------------------------------------------------------------------------
# YAML + overrides, checked at load: unknown keys, wrong types and values outside an enum (``Literal``)
# fail before any data is read or any process group is made, naming the key, the value and what is allowed.


class ConfigError(ValueError):
    """A bad configuration value. ``key`` is its dotted path (``train.precision``), when there is one."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def did_you_mean(value: Any, allowed: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for a near miss among ``allowed``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return from_dict(tp, value, key)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}"
                              f"{did_you_mean(value, allowed)}", key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string: accept what Python reads as a number, reject the rest
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}", key) from None
    if tp is float:
        raise ConfigError(f"{key}: expected a number, got {value!r}", key)
    if tp in (int, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}", key)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys; ``where``: the dotted path of ``data``.
    The dataclass's own ``__post_init__`` checks (cross-field rules) run as it is built."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            key = f"{where}.{k}" if where else str(k)
            raise ConfigError(f"{key}: unknown key{did_you_mean(k, names)}; valid keys here: {', '.join(names)}", key)
    for f in dataclasses.fields(cls):
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{where}.{f.name}" if where else f.name
            raise ConfigError(f"{key}: required, and not set", key)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where and e.key and not e.key.startswith(where + "."):  # a nested check names keys relative to itself
            raise ConfigError(str(e).replace(e.key, f"{where}.{e.key}", 1), f"{where}.{e.key}") from None
        raise


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {item!r}: {p} is not a section", key)
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                flags: dict[str, Any] | None = None) -> T:
    """``cls`` from a YAML file (optional) with ``section.key=value`` overrides and then ``flags`` (top-level
    keys whose values argparse already parsed), checked now. A bad key or value raises ConfigError naming it
    and where it came from (the file, or the command line)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    set_on_command_line = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    data = apply_overrides(data, list(overrides))  # its errors already name the command line
    data.update(flags or {})
    set_on_command_line |= set(flags or {})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        key = e.key
        from_cli = any(key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + ".")
                       for k in set_on_command_line if key)
        source = "command line" if from_cli or path is None else str(path)
        raise ConfigError(f"{source}: {e}", key) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# A flat config as command-line flags: one flag per field (``max_users`` -> ``--max-users``), help text and
# allowed values from the dataclass, next to ``--config`` for a YAML file of the same keys. The dataclass keeps
# the defaults: an unset flag is absent from the namespace (SUPPRESS), so a value comes from the flag, else the
# file, else the dataclass, and load_config checks all of them the same way as a pretraining config.


def _flag_kwargs(tp: Any, f: dataclasses.Field) -> dict[str, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    kwargs: dict[str, Any] = {}
    if typing.get_origin(tp) is list:
        kwargs["nargs"] = "+"
        (tp,) = typing.get_args(tp)
    allowed = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = type(allowed[0]) if allowed else tp
    text = f.metadata.get("help", "")
    if allowed:
        text += f" (one of: {', '.join(map(str, allowed))})"
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default is not None:
            text += f"; default: {' '.join(map(str, default)) if isinstance(default, list) else default}"
    else:
        text += "; required"
    return {**kwargs, "help": text}


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """``--config`` and one flag per field of the flat dataclass ``cls`` (but ``skip``)."""
    parser.add_argument("--config", default=None, help="a YAML file of these settings, keyed by the flags' names "
                        "with underscores (--max-users 40 is max_users: 40); flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                            **_flag_kwargs(hints[f.name], f))


def config_from_flags(cls: type[T], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> T:
    """The config ``add_config_flags`` described: flags (and ``extra`` command-line values) over the YAML file
    over the defaults, checked."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return load_config(cls, args.config, flags={**flags, **(extra or {})})
