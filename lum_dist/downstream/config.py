"""Configuration of step 3 (downstream DLRMs): YAML in configs/downstream/, ``key=value`` overrides.

Loaded with ``lum_dist.config.load_config(DownstreamConfig, path, overrides)``; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RANKING_VARIANTS = ("base", "lum_direct", "lum_match", "lum_both")
RETRIEVAL_VARIANTS = ("base", "lum")


@dataclass
class RankingConfig:
    """DIN-style CTR model: target attention over the recent behaviours, then an MLP."""

    variants: list[str] = field(default_factory=lambda: list(RANKING_VARIANTS))
    embed_dim: int = 16  # per id field (item, attribute); a behaviour is their concatenation
    attention_hidden: int = 36
    mlp: list[int] = field(default_factory=lambda: [200, 80])
    activation: str = "dice"  # "dice" | "prelu"
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        _check_variants("ranking", self.variants, RANKING_VARIANTS)
        if self.activation not in ("dice", "prelu"):
            raise ValueError(f"ranking.activation={self.activation!r}: expected 'dice' or 'prelu'")


@dataclass
class RetrievalConfig:
    """Two-tower retrieval with in-batch softmax; evaluated by full ranking over every item."""

    variants: list[str] = field(default_factory=lambda: list(RETRIEVAL_VARIANTS))
    embed_dim: int = 32
    hidden: int = 64
    out_dim: int = 32
    temperature: float = 0.05
    logq_correction: bool = True  # in-batch negatives are popularity-sampled (see lum_dist/losses.py)
    lum_item_tower: bool = True  # variant "lum" also feeds the LUM item embedding to the item tower
    ks: list[int] = field(default_factory=lambda: [10, 50])
    epochs: int = 20
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        _check_variants("retrieval", self.variants, RETRIEVAL_VARIANTS)


@dataclass
class DownstreamConfig:
    name: str = "synthetic"  # results go to <output_dir>/<name>.{json,md}
    data_path: str = "runs/data/synthetic"  # the prepared dataset the LUM was trained on
    # Step-2 outputs (lum_dist/query/job.py): history up to train_end (split=valid) for the training
    # samples, history up to valid_end (split=test) for the evaluation samples.
    query_valid: str = "runs/pretrain-synthetic/query-valid"
    query_test: str = "runs/pretrain-synthetic/query-test"
    output_dir: str = "benchmarks/results/downstream"
    attr_field: str = ""  # the item-attribute condition field; "" = the dataset's first item_cond field
    max_history: int = 50  # recent behaviours fed to the models
    # Training requests per user: its last N training behaviours up to the validation one (positions
    # train_end - N + 1 .. train_end). Their LUM features come from query_valid, which must have been
    # computed with lag >= N - 1 (history ending before the first of them): checked, never a leak.
    train_requests_per_user: int = 1
    neg_ratio: int = 4  # sampled negatives per positive (ranking)
    max_users: int = 0  # 0: all users; else the first N in shard order (as the query job's max_users)
    sample_seed: int = 0  # negatives (and the holdout) are drawn once: every variant and seed sees the same samples
    holdout_fraction: float = 0.1  # training requests held out for early stopping; 0: train all epochs
    patience: int = 2  # epochs without a better holdout loss before stopping
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # model seeds, per variant
    ranking: RankingConfig = field(default_factory=RankingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"downstream config: holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.neg_ratio < 1 or self.max_history < 1 or self.train_requests_per_user < 1 or not self.seeds:
            raise ValueError(f"downstream config: neg_ratio ({self.neg_ratio}), max_history ({self.max_history}) "
                             f"and train_requests_per_user ({self.train_requests_per_user}) must be >= 1 and "
                             f"seeds ({self.seeds}) non-empty")


def _check_variants(section: str, variants: list[str], allowed: tuple[str, ...]) -> None:
    bad = [v for v in variants if v not in allowed]
    if bad or not variants or variants[0] != "base":
        raise ValueError(f"{section}.variants={variants}: must start with 'base' and use only {list(allowed)}")
