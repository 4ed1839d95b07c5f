"""The on-disk format of a prepared user-behaviour-sequence (UBS) dataset.

A prepared dataset is a directory::

    <root>/
      meta.json                  DatasetMeta: source, fields, split policy, counts, fingerprint
      vocab/item.parquet         dense id <-> raw id, with training frequency
      vocab/<field>.parquet      one vocabulary per condition field (same columns)
      items.parquet              per item (dense id order): ``id``, ``raw`` and, for each condition
                                 field that is an item attribute (``meta.item_cond_fields``, e.g. genre,
                                 category), the item's value as a dense id in that field's vocabulary
      users/part-00000.parquet   one row per user, USER_SCHEMA below; several shards for large data

Every vocabulary has the columns ``id`` (int32, dense), ``raw`` (string, the id in the raw data)
and ``count`` (int64, occurrences in the *training* portion only). Dense ids are assigned by
descending training frequency (ties: raw id ascending) after the reserved ids below, so id order
is popularity order. Values never seen in training map to ``UNK_ID``: vocabularies and every
statistic come from training data only, so nothing about held-out behaviours leaks into them.

A user row holds the user's whole ordered history (oldest first) and the split boundaries::

    behaviours [0, train_end)         training
    behaviour  train_end              validation target (if valid_end > train_end)
    behaviour  valid_end              test target       (if len > valid_end)

Leave-one-out gives ``train_end = n - 2, valid_end = n - 1``; a global temporal split with cut-offs
t1 < t2 gives ``train_end = #(ts < t1), valid_end = #(ts < t2)``. Evaluation predicts the first
behaviour after a boundary from everything before it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from lum_dist.utils import atomic_write_text

# Reserved ids, shared by every vocabulary (items and condition fields).
PAD_ID = 0  # padding / "no value" (e.g. the item slot of a condition token)
UNK_ID = 1  # a value not in the training vocabulary
MASK_ID = 2  # "any": a generic condition carrying no information about the target
NUM_SPECIAL_IDS = 3
RESERVED_RAW = ["[PAD]", "[UNK]", "[MASK]"]  # raw values of the reserved ids in every vocabulary

ITEM_FIELD = "item"
TAGS_FIELD = "tags"  # items.parquet / vocab: each item's bag of attributes (all its genres, ...)
COND_PREFIX = "cond_"  # user-row column for condition field f is f"cond_{f}"
NUM_PREFIX = "num_"  # user-row column for numeric side feature g is f"num_{g}"

VOCAB_SCHEMA = pa.schema([("id", pa.int32()), ("raw", pa.string()), ("count", pa.int64())])


def user_schema(cond_fields: list[str], numeric_fields: list[str] = ()) -> pa.Schema:
    """Arrow schema of one user row for the given condition and numeric side-feature fields."""
    cols = [
        ("user_id", pa.string()),
        (ITEM_FIELD, pa.list_(pa.int32())),
        *[(COND_PREFIX + f, pa.list_(pa.int32())) for f in cond_fields],
        ("ts", pa.list_(pa.int64())),
        *[(NUM_PREFIX + g, pa.list_(pa.float32())) for g in numeric_fields],
        ("train_end", pa.int32()),
        ("valid_end", pa.int32()),
    ]
    return pa.schema(cols)


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``."""

    name: str
    source_format: str  # ingest adapter name, e.g. "movielens-100k"
    cond_fields: list[str]  # condition fields, in token-feature order
    numeric_fields: list[str] = field(default_factory=list)
    item_cond_fields: list[str] = field(default_factory=list)  # condition fields that are item attributes
    split: str = "loo"  # "loo" | "temporal"
    split_params: dict = field(default_factory=dict)
    has_timestamps: bool = True  # False: ts is the behaviour's ordinal (e.g. the S3-Rec sequences)
    num_users: int = 0
    num_behaviours: int = 0
    num_train_behaviours: int = 0
    vocab_sizes: dict[str, int] = field(default_factory=dict)  # incl. reserved ids; "tags": the item tags
    max_item_tags: int = 0  # most tags an item has (0: the dataset has no item tags)
    shards: list[str] = field(default_factory=list)  # relative paths of users/*.parquet
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (bad input skipped by flag)
    fingerprint: str = ""  # hash of the shards' contents; the loader refuses to resume across a change
    # What the evaluation query token holds for each condition field, documented per dataset.
    eval_condition: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> DatasetMeta:
        return cls(**json.loads(Path(path).read_text()))

    @property
    def num_items(self) -> int:
        return self.vocab_sizes[ITEM_FIELD]

    def cond_vocab_sizes(self) -> list[int]:
        return [self.vocab_sizes[f] for f in self.cond_fields]


def float_list_column(x: np.ndarray) -> pa.Array:
    """A float32 matrix [n, d] as a list<float32> column (the embedding columns of steps 1 and 2)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]).cast(pa.list_(pa.float32()))
