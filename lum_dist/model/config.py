"""LUMConfig (a transformers config), the presets in ``configs/model/``, parameter and FLOP counts.

A preset fixes the architecture (width, depth, heads); the dataset fixes the embedding tables
(``num_items``, ``cond_vocab_sizes``, ``num_numeric``), so a run combines the two with
:func:`load_preset`. Counts are closed-form so that the trainer can report MFU and the scaling
code can size models without building them; a test checks them against real modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from transformers import PretrainedConfig

from lum_dist.config import REPO_ROOT, ConfigError, did_you_mean
from lum_dist.model.sasrec import SASRecConfig
from lum_dist.ops.attention import BACKENDS

ATTENTION_BACKENDS = ("auto", *BACKENDS)
NUM_COUNT_BUCKETS = 16  # an item's popularity bucket: floor(log2(1 + training count)), the last one open

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
        scaled_init: bool = True,  # residual output projections start at initializer_range / sqrt(2 * layers)
        # Dropout (0 in the large presets, as in LLM pretraining; small datasets need it):
        feature_dropout: float = 0.0,  # on the projected token features
        attention_dropout: float = 0.0,  # on the attention probabilities
        residual_dropout: float = 0.0,  # on every residual branch (attention and MLP outputs)
        attn_backend: str = "auto",  # see lum_dist.ops.attention.varlen_attention
        # An item's InfoNCE target (and scoring row) is its id embedding plus one embedding per attribute of the
        # item (e.g. its category), so the many rarely seen items share what their attribute learned:
        attribute_targets: bool = False,
        item_attr_vocab_sizes: list[int] | None = None,  # vocabulary size of each item-attribute field (dataset)
        # An item's embedding (what its token reads and its InfoNCE target) is its id embedding plus the mean
        # of its tags' embeddings (all its genres, all its S3-Rec attributes): an item seen a handful of
        # times shares what each of its attributes learned from all the items that carry it.
        item_tags: bool = False,
        num_item_tags: int = 0,  # tag vocabulary incl. the reserved ids (dataset; 0: items have no tags)
        max_item_tags: int = 0,  # most tags an item has (dataset)
        # An item's embedding also adds the mean id embedding of the (up to) this many items that most often sit
        # within ``neighbour_window`` behaviours of it in the training sequences (0: off). An item bought twice is
        # then placed among what it was bought with, each of which learns from many users (item-based CF as a
        # feature, a one-hop graph convolution over the co-occurrence graph, as in LightGCN):
        item_neighbours: int = 0,
        neighbour_window: int = 3,
        # How much an item leans on its neighbours is learned per popularity bucket (log2 of its training count;
        # 1 at init): a rare item is known by its neighbours, a popular one by its own id.
        neighbour_gate: bool = False,
        # Pairs d behaviours apart count 1/d toward who an item's neighbours are (adjacent ones lead; the window
        # breaks a rare item's ties); off: every pair in the window counts 1.
        neighbour_distance_weighted: bool = False,
        # A condition token's item slot (PAD otherwise) carries the item of the user's previous behaviour, so the
        # token that predicts reads the last item as its own input feature, as SASRec's last item token does:
        previous_item_slot: bool = False,
        # Training only: for this share of condition tokens the slot stays PAD and the skip (below) adds nothing
        # (one draw for both):
        previous_item_dropout: float = 0.0,
        # Training only: this share of item tokens read PAD in place of their id (their attribute fields stay), a
        # regulariser against memorised item sequences (the item-mask augmentation of CL4SRec, Xie et al. 2022):
        item_id_dropout: float = 0.0,
        # Training only, full softmax: each step this share of the scored items, drawn afresh, are scored without
        # their id embedding (their tags and attributes stay), as DropoutNet trains for items it knows little of
        # (Volkovs et al. 2017). On Beauty it trades remembered transitions for inferred ones, so no config sets it
        # (round 29, benchmarks/results/quality/ablation-beauty.md):
        target_id_dropout: float = 0.0,
        # A condition token's output also adds W dropout(v), v the previous behaviour's item as scored (W zero at init;
        # feature_dropout): SASRec's residual path from its last item to its output, so an item-to-item transition
        # is a bilinear v_i W v_j of the shared item vectors, remembered beside the transformer, which generalises.
        previous_item_skip: bool = False,
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
        self.scaled_init = scaled_init
        self.feature_dropout = feature_dropout
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.attn_backend = attn_backend
        self.attribute_targets = attribute_targets
        self.item_attr_vocab_sizes = list(item_attr_vocab_sizes or [])
        self.item_tags = item_tags
        self.num_item_tags = num_item_tags
        self.max_item_tags = max_item_tags
        self.item_neighbours = item_neighbours
        self.neighbour_window = neighbour_window
        self.neighbour_gate = neighbour_gate
        self.neighbour_distance_weighted = neighbour_distance_weighted
        self.previous_item_slot = previous_item_slot
        self.previous_item_dropout = previous_item_dropout
        self.item_id_dropout = item_id_dropout
        self.target_id_dropout = target_id_dropout
        self.previous_item_skip = previous_item_skip
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ConfigError(f"LUMConfig: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if (hidden_size // num_heads) % 2:
            raise ConfigError(f"LUMConfig: head dim {hidden_size // num_heads} must be even for rotary positions")
        if attn_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"LUMConfig: attn_backend {attn_backend!r} is not one of {ATTENTION_BACKENDS}"
                              f"{did_you_mean(attn_backend, ATTENTION_BACKENDS)}")
        if attribute_targets and not self.item_attr_vocab_sizes:
            raise ConfigError("LUMConfig: attribute_targets needs a dataset whose items have attributes "
                              "(meta.item_cond_fields is empty)")
        if item_tags and not (num_item_tags > 0 and max_item_tags > 0):
            raise ConfigError("LUMConfig: item_tags needs a dataset whose items have tags (meta.max_item_tags is 0; "
                              "a dataset prepared before item tags existed: lum-prepare --force)")
        if item_neighbours < 0 or neighbour_window < 1:
            raise ConfigError(f"LUMConfig: item_neighbours {item_neighbours} must be >= 0 and neighbour_window "
                              f"{neighbour_window} >= 1")
        if previous_item_dropout and not (previous_item_slot or previous_item_skip):
            raise ConfigError("LUMConfig: previous_item_dropout needs previous_item_slot or previous_item_skip")
        for name in ("feature_dropout", "attention_dropout", "residual_dropout", "previous_item_dropout",
                     "item_id_dropout", "target_id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"LUMConfig: {name} {getattr(self, name)} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_feature_dim(self) -> int:
        """Width of the concatenated token features fed to the input projection."""
        return self.item_emb_dim + (len(self.cond_vocab_sizes) + 1) * self.cond_emb_dim + self.num_numeric

    # -- sizes and work (closed form: the trainer reports MFU and the scaling code sizes models from these) --

    ARCH_KEYS = frozenset({  # what a preset file or a run's ``model.overrides`` may set (data sets the tables)
        "hidden_size", "num_layers", "num_heads", "intermediate_size", "cond_emb_dim", "item_emb_dim",
        "num_time_buckets", "max_position", "rope_theta", "rms_norm_eps", "initializer_range", "scaled_init",
        "feature_dropout", "attention_dropout", "residual_dropout", "attn_backend", "attribute_targets",
        "item_tags", "item_neighbours", "neighbour_window", "neighbour_gate", "neighbour_distance_weighted",
        "previous_item_slot", "previous_item_dropout", "item_id_dropout", "target_id_dropout", "previous_item_skip",
    })

    @classmethod
    def for_dataset(cls, num_items: int, cond_vocab_sizes: list[int], num_numeric: int = 0,
                    item_attr_vocab_sizes: list[int] | None = None, *, num_item_tags: int = 0,
                    max_item_tags: int = 0, **arch: Any) -> LUMConfig:
        return cls(num_items=num_items, cond_vocab_sizes=list(cond_vocab_sizes), num_numeric=num_numeric,
                   item_attr_vocab_sizes=item_attr_vocab_sizes, num_item_tags=num_item_tags,
                   max_item_tags=max_item_tags, **arch)

    def matmul_params(self) -> int:
        """Weights of every matrix multiply per token: input projection, blocks, output projection (and the
        previous-item skip)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.item_emb_dim
        per_layer = 4 * h * h + 3 * h * i  # q, k, v, o + SwiGLU gate, up, down
        skip = e * e if self.previous_item_skip else 0
        return self.token_feature_dim * h + self.num_layers * per_layer + h * e + skip

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by formula. dense = everything but the lookup tables (matmuls, biases, norms)."""
        h = self.hidden_size
        dense = self.matmul_params() + h + self.num_layers * 2 * h + h  # + input bias, 2 norms per block, final
        embedding = (
            self.num_items * self.item_emb_dim
            + (sum(self.cond_vocab_sizes) + self.num_time_buckets) * self.cond_emb_dim
            + 2 * h  # token-type embedding
            + (sum(self.item_attr_vocab_sizes) * self.item_emb_dim if self.attribute_targets else 0)
            + (self.num_item_tags * self.item_emb_dim if self.item_tags else 0)
            + (NUM_COUNT_BUCKETS if self.item_neighbours and self.neighbour_gate else 0)
        )
        return {"dense": dense, "embedding": embedding, "total": dense + embedding}


    def train_flops(self, seq_lens: np.ndarray) -> float:
        """Training FLOPs (forward + backward) of a packed batch with these real sequence lengths (tokens).

        ``6 * N`` per token (:meth:`matmul_params`, 2 FLOPs per multiply-add, backward twice the forward)
        plus causal attention: a sequence of L tokens has L(L + 1)/2 (query, key) pairs, each costing
        ``2 * hidden`` FLOPs in QK^T and again in AV per layer, x3 for training. From the batch's real
        lengths, not ``max_seq_len``: packed users are short, and attention is quadratic in each of them.
        """
        lens = np.asarray(seq_lens, dtype=np.float64)
        pairs = float((lens * (lens + 1) / 2).sum())
        return 6.0 * self.matmul_params() * float(lens.sum()) + 12.0 * self.num_layers * self.hidden_size * pairs


def preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return PRESET_DIR / f"{name_or_path}.yaml"


ARCHS: dict[str, type[PretrainedConfig]] = {"lum": LUMConfig, "sasrec": SASRecConfig}


def load_preset(
    name_or_path: str | Path, num_items: int, cond_vocab_sizes: list[int], num_numeric: int = 0,
    item_attr_vocab_sizes: list[int] | None = None, *, num_item_tags: int = 0, max_item_tags: int = 0,
    **overrides: Any
) -> LUMConfig | SASRecConfig:
    """The preset's architecture (``configs/model/<name>.yaml`` or a YAML path) sized for a dataset.

    A preset names its architecture with ``arch`` (``lum``, the default, or ``sasrec``)."""
    path = preset_path(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"model preset {name_or_path!r} not found ({path}){did_you_mean(name_or_path, known)}; "
                          f"known presets: {', '.join(known)}")
    values = yaml.safe_load(path.read_text()) or {}
    values.update(overrides)
    arch = values.pop("arch", "lum")
    if arch not in ARCHS:
        raise ConfigError(f"{path}: arch {arch!r} is not one of {sorted(ARCHS)}")
    cls = ARCHS[arch]
    unknown = sorted(set(values) - cls.ARCH_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown {arch} model key {unknown[0]!r}{did_you_mean(unknown[0], cls.ARCH_KEYS)}; "
                          f"valid: {', '.join(sorted(cls.ARCH_KEYS))}")
    return cls.for_dataset(num_items, cond_vocab_sizes, num_numeric, item_attr_vocab_sizes,
                           num_item_tags=num_item_tags, max_item_tags=max_item_tags, **values)


def check_model_spec(preset: str, overrides: dict[str, Any]) -> LUMConfig | SASRecConfig:
    """Fail now, before any data is read, if the preset or its overrides are bad; else the architecture's config
    (with stand-in table sizes: for its kind and widths, not for building a model)."""
    try:
        return load_preset(preset, num_items=16, cond_vocab_sizes=[8], item_attr_vocab_sizes=[8], num_item_tags=8,
                           max_item_tags=2, **overrides)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}", "model") from None


def param_counts(cfg: LUMConfig | SASRecConfig) -> dict[str, int]:
    """``{"dense", "embedding", "total"}`` parameters of a model config, by formula."""
    return cfg.param_counts()


def matmul_params(cfg: LUMConfig | SASRecConfig) -> int:
    return cfg.matmul_params()


def flops_per_token(cfg: LUMConfig | SASRecConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the user encoder.

    Forward counts 2 FLOPs per multiply-accumulate; backward costs twice the forward. With
    N = ``cfg.matmul_params()`` (every weight matrix a token passes through)::

        flops = 6 * N + 6 * num_layers * hidden_size * seq_len

    The attention term is ``12 * L * d * seq_len / 2``: QK^T and AV are ``2 * d * keys`` FLOPs
    each per token forward, x3 for training, and a causal token sees ``seq_len / 2`` keys on
    average. Embedding lookups, norms, softmax and the InfoNCE logits (which depend on the batch,
    not on the model) are not counted.
    """
    return 6.0 * cfg.matmul_params() + 6.0 * cfg.num_layers * cfg.hidden_size * seq_len
