"""LUMConfig (a transformers config), the presets in ``configs/model/``, parameter and FLOP counts.

A preset fixes the architecture (width, depth, heads); the dataset fixes the embedding tables
(``num_items``, ``cond_vocab_sizes``, ``num_numeric``), so a run combines the two with
:func:`load_preset`. Counts are closed-form so that the trainer can report MFU and the scaling
code can size models without building them; a test checks them against real modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from transformers import PretrainedConfig

from lum_dist.config import REPO_ROOT, ConfigError

PRESET_DIR = REPO_ROOT / "configs" / "model"


class LUMConfig(PretrainedConfig):
    """Hyperparameters of :class:`lum_dist.model.LUMModel`.

    Tying: the InfoNCE target space IS the item embedding table that item tokens read
    (``num_items x item_emb_dim``), so ``item_emb_dim`` is both the item token feature width and
    the output dimension of the user encoder; there is no separate output item table.
    """

    model_type = "lum"

    def __init__(
        self,
        hidden_size: int = 128,
        num_layers: int = 1,
        num_heads: int = 2,
        intermediate_size: int = 256,  # SwiGLU inner width
        num_items: int = 16,  # item vocabulary incl. the reserved ids
        cond_vocab_sizes: list[int] | None = None,  # one vocabulary size per condition field
        cond_emb_dim: int = 16,  # width of each condition-field and time-gap embedding
        item_emb_dim: int = 64,  # item table width = InfoNCE space
        num_numeric: int = 0,  # numeric side features appended to the token features
        num_time_buckets: int = 32,  # bucketed log2 time gaps, 0 = unknown
        max_position: int = 8192,  # longest sequence the rotary positions are meant for
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        dropout: float = 0.0,  # on the token features and on every residual branch (small datasets)
        attn_backend: str = "auto",  # see lum_dist.ops.attention.varlen_attention
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.num_items = num_items
        self.cond_vocab_sizes = list(cond_vocab_sizes if cond_vocab_sizes is not None else [8])
        self.cond_emb_dim = cond_emb_dim
        self.item_emb_dim = item_emb_dim
        self.num_numeric = num_numeric
        self.num_time_buckets = num_time_buckets
        self.max_position = max_position
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.dropout = dropout
        self.attn_backend = attn_backend
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ConfigError(f"LUMConfig: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if (hidden_size // num_heads) % 2:
            raise ConfigError(f"LUMConfig: head dim {hidden_size // num_heads} must be even for rotary positions")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LUMConfig: dropout {dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_feature_dim(self) -> int:
        """Width of the concatenated token features fed to the input projection."""
        return self.item_emb_dim + (len(self.cond_vocab_sizes) + 1) * self.cond_emb_dim + self.num_numeric


# What a preset file or a run's ``model.overrides`` may set (the dataset sets the table sizes).
ARCH_KEYS = frozenset({
    "hidden_size", "num_layers", "num_heads", "intermediate_size", "cond_emb_dim", "item_emb_dim",
    "num_time_buckets", "max_position", "rope_theta", "rms_norm_eps", "initializer_range", "dropout", "attn_backend",
})


def preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return PRESET_DIR / f"{name_or_path}.yaml"


def load_preset(
    name_or_path: str | Path, num_items: int, cond_vocab_sizes: list[int], num_numeric: int = 0, **overrides: Any
) -> LUMConfig:
    """The preset's architecture (``configs/model/<name>.yaml`` or a YAML path) sized for a dataset."""
    path = preset_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"model preset {name_or_path!r} not found ({path}); known presets: {known}")
    values = yaml.safe_load(path.read_text()) or {}
    values.update(overrides)
    unknown = set(values) - ARCH_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown model key(s) {sorted(unknown)}; valid: {sorted(ARCH_KEYS)}")
    return LUMConfig(num_items=num_items, cond_vocab_sizes=list(cond_vocab_sizes), num_numeric=num_numeric, **values)


def matmul_params(cfg: LUMConfig) -> int:
    """Weights of every matrix multiply per token: input projection, blocks, output projection."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * h * h + 3 * h * i  # q, k, v, o + SwiGLU gate, up, down
    return cfg.token_feature_dim * h + cfg.num_layers * per_layer + h * cfg.item_emb_dim


def param_counts(cfg: LUMConfig) -> dict[str, int]:
    """Parameter counts by formula. dense = everything but the lookup tables (matmuls, biases, norms)."""
    h = cfg.hidden_size
    dense = matmul_params(cfg) + h + cfg.num_layers * 2 * h + h  # + input bias, 2 norms per block, final norm
    embedding = (
        cfg.num_items * cfg.item_emb_dim
        + (sum(cfg.cond_vocab_sizes) + cfg.num_time_buckets) * cfg.cond_emb_dim
        + 2 * h  # token-type embedding
    )
    return {"dense": dense, "embedding": embedding, "total": dense + embedding}


def flops_per_token(cfg: LUMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the user encoder.

    Forward counts 2 FLOPs per multiply-accumulate; backward costs twice the forward. With
    N = :func:`matmul_params` (input projection, q/k/v/o, SwiGLU, output projection)::

        flops = 6 * N + 6 * num_layers * hidden_size * seq_len

    The attention term is ``12 * L * d * seq_len / 2``: QK^T and AV are ``2 * d * keys`` FLOPs
    each per token forward, x3 for training, and a causal token sees ``seq_len / 2`` keys on
    average. Embedding lookups, norms, softmax and the InfoNCE logits (which depend on the batch,
    not on the model) are not counted.
    """
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.num_layers * cfg.hidden_size * seq_len
