"""Raw public formats -> a prepared UBS dataset (:mod:`lum_dist.data.schema`), and its readers.

``prepare(source, out)`` runs an ingest adapter (:mod:`lum_dist.data.ingest`), orders each user's
behaviours by (ts, input order), drops users with fewer than ``min_behaviours``, splits
(:mod:`lum_dist.data.split`), builds vocabularies from training behaviours only, and writes
``users/part-XXXXX.parquet`` shards one at a time, then ``meta.json``, all inside a temporary sibling
directory renamed into place at the end (a failure leaves no ``out``). The normalised source spec
is stored in ``meta.split_params["source"]``, so a second call with the same spec is a no-op.

Command line::

    lum-prepare --format s3rec --input $LUM_DATA_DIR/s3rec-seq/Beauty.txt --out runs/data/beauty
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from lum_dist.cli import DEBUG_FLAG, DEBUG_HELP
from lum_dist.config import ConfigError, add_config_flags, check, config_from_flags, did_you_mean, field_help
from lum_dist.data import split as S
from lum_dist.data.errors import DataError
from lum_dist.data.ingest import ADAPTER_OPTIONS, ADAPTERS, RawBehaviours, get_adapter
from lum_dist.data.schema import (
    COND_PREFIX,
    ITEM_FIELD,
    NUM_PREFIX,
    NUM_SPECIAL_IDS,
    PAD_ID,
    RESERVED_RAW,
    TAGS_FIELD,
    UNK_ID,
    VOCAB_SCHEMA,
    DatasetMeta,
    float_list_column,
    user_schema,
)
from lum_dist.utils import atomic_dir, expand_source


@dataclass
class PrepareConfig:
    """``launch/prepare.py``: a source (a format, its raw files and options) and where the dataset goes. A
    pretraining config's ``data.prepare`` mapping is the same source: format, input, meta, split,
    min_behaviours, users_per_shard, skip_bad and the adapter's own options side by side."""
    format: str = field(metadata=field_help("the raw format (see the README's table of formats)"))
    out: str = field(metadata=field_help("the prepared dataset's folder (written atomically)"))
    input: str | None = field(default=None, metadata=field_help("raw file or folder (${LUM_DATA_DIR} is expanded)"))
    meta: str | None = field(default=None, metadata=field_help("item metadata file, where the format takes one"))
    split: Literal["loo", "temporal"] = field(default="loo", metadata=field_help(
        "'loo': last behaviour = test, second last = validation; 'temporal': global time cut-offs"))
    min_behaviours: int = field(default=3, metadata=field_help("drop users with fewer behaviours"))
    users_per_shard: int = field(default=50000, metadata=field_help("users per parquet shard"))
    skip_bad: bool = field(default=False, metadata=field_help("skip malformed lines (counted in meta.skipped)"))
    force: bool = field(default=False, metadata=field_help("rebuild even if --out exists"))
    options: dict[str, Any] = field(default_factory=dict, metadata=field_help(
        "the adapter's own options (e.g. num_users, temporal_cutoffs); on the command line: --set KEY=VALUE"))

    def __post_init__(self) -> None:
        check(self.format in ADAPTERS, "format",
              f"{self.format!r} is not one of {', '.join(sorted(ADAPTERS))}{did_you_mean(self.format, ADAPTERS)}")
        check(self.min_behaviours >= 1 and self.users_per_shard >= 1, "min_behaviours",
              "min_behaviours and users_per_shard must be >= 1")

    def source(self) -> dict[str, Any]:
        """The source mapping ``prepare`` takes (the form of a pretraining config's ``data.prepare``)."""
        spec = {k: getattr(self, k) for k in SOURCE_DEFAULTS} | {"format": self.format}
        return spec | {k: getattr(self, k) for k in ("input", "meta") if getattr(self, k)} | self.options


# what a source spec may leave out, with the command line's defaults
SOURCE_DEFAULTS = {f.name: f.default for f in fields(PrepareConfig)
                   if f.name in ("split", "min_behaviours", "users_per_shard", "skip_bad")}


def normalize_source(source: dict) -> dict:
    """Defaults filled in, paths absolute, JSON-plain: stored in meta, compared for idempotence."""
    if "format" not in source:
        raise ValueError(f"source spec needs a 'format'; got {source!r}")
    get_adapter(source["format"])  # an unknown format fails here, naming the known ones
    spec = {**SOURCE_DEFAULTS, **expand_source(source)}
    valid = {"format", "temporal_cutoffs", *SOURCE_DEFAULTS, *ADAPTER_OPTIONS.get(source["format"], ())}
    if set(spec) - valid:
        raise ValueError(
            f"{source['format']}: unknown source key(s) {sorted(set(spec) - valid)}; valid: {sorted(valid)}"
        )
    for key in ("input", "meta"):
        if spec.get(key):
            spec[key] = str(Path(spec[key]).resolve())
    if spec["split"] not in S.SPLITS:
        raise ValueError(f"split={spec['split']!r}: expected one of {S.SPLITS}")
    if int(spec["users_per_shard"]) < 1 or int(spec["min_behaviours"]) < 1:
        raise ValueError("users_per_shard and min_behaviours must be >= 1")
    return json.loads(json.dumps(spec))


def prepare(source: dict, out: str | Path, *, force: bool = False) -> DatasetMeta:
    """Build the dataset at ``out`` from ``source`` (see module doc); returns its meta."""
    spec, out = normalize_source(source), Path(out)
    if (out / "meta.json").is_file() and not force:
        meta = load_meta(out)
        if meta.split_params.get("source") == spec:
            return meta
        raise ValueError(
            f"{out} was prepared from another source ({meta.split_params.get('source')}); "
            f"pass force=True (--force) to rebuild it from {spec}"
        )
    raw = get_adapter(spec["format"])(spec)
    with atomic_dir(out) as tmp:
        meta = write_dataset(raw, spec, tmp)
    return meta


# ---------------------------------------------------------------------------------------------
# Pipeline


def _vocab(values: pa.Array, train: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """Dense ids (int32, UNK for values unseen in training) of ``values``, and the vocabulary table."""
    counts = pc.value_counts(values.filter(pa.array(train)))
    table = pa.table({"raw": counts.field("values"), "count": counts.field("counts")})
    table = table.take(pc.sort_indices(table, sort_keys=[("count", "descending"), ("raw", "ascending")]))
    raw = table.column("raw").combine_chunks()
    ids = pc.fill_null(pc.add(pc.index_in(values, value_set=raw), NUM_SPECIAL_IDS), UNK_ID)
    vocab = pa.table(
        {
            "id": pa.array(np.arange(NUM_SPECIAL_IDS + len(raw)), pa.int32()),
            "raw": pa.concat_arrays([pa.array(RESERVED_RAW, pa.string()), raw.cast(pa.string())]),
            "count": pa.concat_arrays(
                [
                    pa.array([0] * NUM_SPECIAL_IDS, pa.int64()),
                    table.column("count").combine_chunks().cast(pa.int64()),
                ]
            ),
        },
        schema=VOCAB_SCHEMA,
    )
    return ids.to_numpy(zero_copy_only=False).astype(np.int32), vocab


def _items_table(item_vocab: pa.Table, raw: RawBehaviours,
                 field_vocabs: dict[str, pa.Table]) -> tuple[pa.Table, pa.Table | None]:
    """Per item id: raw id and, per item-attribute field, the attribute's dense id (PAD for reserved ids);
    with item tags also ``tags`` (list of dense tag ids) and the tag vocabulary."""
    cols = {"id": item_vocab.column("id"), "raw": item_vocab.column("raw")}
    real = item_vocab.column("raw").combine_chunks()[NUM_SPECIAL_IDS:]
    attrs = raw.item_attrs.combine_chunks() if raw.item_attrs is not None else None
    at = pc.index_in(real, value_set=attrs.column("item").chunk(0)) if attrs is not None else None
    for f in raw.item_cond_fields:
        attr_raw = pc.take(attrs.column(f).chunk(0), at)
        ids = pc.fill_null(pc.index_in(attr_raw, value_set=field_vocabs[f].column("raw")), UNK_ID)
        cols[f] = pa.concat_arrays([pa.array([PAD_ID] * NUM_SPECIAL_IDS, pa.int32()), ids.cast(pa.int32())])
    tag_vocab = None
    if attrs is not None and TAGS_FIELD in attrs.column_names:
        # The items of the item vocabulary (seen in training) define the tags; reserved items have none.
        tags = pc.fill_null(pc.take(attrs.column(TAGS_FIELD).chunk(0), at), pa.scalar([], pa.list_(pa.string())))
        flat = pc.list_flatten(tags)
        ids, tag_vocab = _vocab(flat, np.ones(len(flat), bool))
        offsets = np.r_[np.zeros(NUM_SPECIAL_IDS, np.int64), tags.offsets.to_numpy() - tags.offsets[0].as_py()]
        cols[TAGS_FIELD] = _list(ids, offsets, pa.int32())
    return pa.table(cols), tag_vocab


def _list(values: np.ndarray, offsets: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type_))


def write_dataset(raw: RawBehaviours, spec: dict, root: Path) -> DatasetMeta:
    """Order, filter, split, encode and write ``raw`` under ``root`` (a fresh directory)."""
    table = raw.table
    if table.num_rows == 0:
        raise ValueError(f"{spec['format']}: the input {spec.get('input')} holds no behaviours")
    encoded = pc.dictionary_encode(table.column("user").combine_chunks())
    user, names = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary
    ts = table.column("ts").to_numpy().astype(np.int64)
    order = S.behaviour_order(user, ts)
    table, user, ts = table.take(pa.array(order)), user[order], ts[order]

    # Drop short users, split, drop users without a training behaviour.
    lens = np.bincount(user, minlength=len(names))
    keep = lens >= int(spec["min_behaviours"])
    split_params: dict = {"source": spec}
    if spec["split"] == "temporal":
        if not raw.has_timestamps:
            raise ValueError(
                f"{spec['format']}: split 'temporal' needs timestamps; this format has none (use 'loo')"
            )
        cutoffs = spec.get("temporal_cutoffs") or S.default_cutoffs(ts[keep[user]])
        train_end, valid_end = S.temporal_bounds(user, ts, len(names), cutoffs)
        split_params["temporal_cutoffs"] = [int(c) for c in cutoffs]
    else:
        train_end, valid_end = S.loo_bounds(lens)
    keep &= train_end > 0
    split_params["dropped_users"] = int((lens > 0).sum() - keep.sum())
    rows = keep[user]
    table, ts = table.filter(pa.array(rows)), ts[rows]
    new_code = np.cumsum(keep) - 1
    user, names = new_code[user[rows]], pc.take(names, pa.array(np.flatnonzero(keep)))
    train_end, valid_end = train_end[keep], valid_end[keep]
    num_users = len(names)
    if num_users == 0:
        raise ValueError(
            f"{spec['format']}: no user has >= {spec['min_behaviours']} behaviours and a training one"
        )
    offsets = S.user_offsets(user, num_users)
    train = S.positions(user, offsets) < train_end[user]

    # Vocabularies from training behaviours only.
    item_ids, item_vocab = _vocab(table.column("item").combine_chunks(), train)
    cond_ids, field_vocabs = {}, {}
    for f in raw.cond_fields:
        cond_ids[f], field_vocabs[f] = _vocab(table.column(COND_PREFIX + f).combine_chunks(), train)
    (root / "vocab").mkdir(parents=True)
    (root / "users").mkdir()
    pq.write_table(item_vocab, root / "vocab" / f"{ITEM_FIELD}.parquet")
    for f, v in field_vocabs.items():
        pq.write_table(v, root / "vocab" / f"{f}.parquet")
    items, tag_vocab = _items_table(item_vocab, raw, field_vocabs)
    pq.write_table(items, root / "items.parquet")
    if tag_vocab is not None:
        pq.write_table(tag_vocab, root / "vocab" / f"{TAGS_FIELD}.parquet")

    # User shards, one at a time.
    schema = user_schema(raw.cond_fields, raw.numeric_fields)
    numeric = {g: table.column(NUM_PREFIX + g).to_numpy().astype(np.float32) for g in raw.numeric_fields}
    shards, per = [], int(spec["users_per_shard"])
    for s, a in enumerate(range(0, num_users, per)):
        b = min(a + per, num_users)
        lo, hi = offsets[a], offsets[b]
        off = offsets[a : b + 1] - lo
        cols = [
            pc.take(names, pa.array(np.arange(a, b))).cast(pa.string()),
            _list(item_ids[lo:hi], off, pa.int32()),
            *[_list(cond_ids[f][lo:hi], off, pa.int32()) for f in raw.cond_fields],
            _list(ts[lo:hi], off, pa.int64()),
            *[_list(numeric[g][lo:hi], off, pa.float32()) for g in raw.numeric_fields],
            pa.array(train_end[a:b], pa.int32()),
            pa.array(valid_end[a:b], pa.int32()),
        ]
        rel = f"users/part-{s:05d}.parquet"
        with pq.ParquetWriter(root / rel, schema) as writer:
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
        shards.append(rel)

    meta = DatasetMeta(
        name=raw.name,
        source_format=spec["format"],
        cond_fields=list(raw.cond_fields),
        numeric_fields=list(raw.numeric_fields),
        item_cond_fields=list(raw.item_cond_fields),
        split=spec["split"],
        split_params=split_params,
        has_timestamps=raw.has_timestamps,
        num_users=num_users,
        num_behaviours=int(len(user)),
        num_train_behaviours=int(train.sum()),
        vocab_sizes={ITEM_FIELD: item_vocab.num_rows, **{f: v.num_rows for f, v in field_vocabs.items()},
                     **({TAGS_FIELD: tag_vocab.num_rows} if tag_vocab is not None else {})},
        max_item_tags=_max_tags(items),
        shards=shards,
        skipped=dict(raw.skipped),
        fingerprint=shards_fingerprint(root, shards),
        eval_condition=dict(raw.eval_condition),
    )
    meta.save(root / "meta.json")  # last: its presence marks a complete dataset
    return meta


# ---------------------------------------------------------------------------------------------
# Readers: every read error names its file; the shards are checked against meta.json's fingerprint


def load_meta(path: str | Path) -> DatasetMeta:
    file = Path(path) / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not a prepared dataset (run lum-prepare first)")
    try:
        return DatasetMeta.load(file)
    except (ValueError, TypeError) as e:  # not JSON, or not the fields DatasetMeta holds
        raise DataError(file, None, None,
                        f"not a valid meta.json ({e}): rebuild the dataset with lum-prepare --force") from e


def shards_fingerprint(root: str | Path, shards: list[str]) -> str:
    """sha1 of the shard files' bytes, in order: what ``meta.json`` holds as ``fingerprint``."""
    digest = hashlib.sha1()
    for rel in shards:
        with open(Path(root) / rel, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def rebuild_command(path: str | Path, source: dict) -> str:
    """The ``launch/prepare.py`` command that rebuilds the dataset at ``path`` from its stored source spec."""
    args = ["python", "launch/prepare.py", "--format", str(source["format"])]
    args += [a for key in ("input", "meta") if source.get(key) for a in (f"--{key}", str(source[key]))]
    args += ["--out", str(path), "--split", str(source.get("split", SOURCE_DEFAULTS["split"])),
             "--min-behaviours", str(source.get("min_behaviours", SOURCE_DEFAULTS["min_behaviours"])),
             "--users-per-shard", str(source.get("users_per_shard", SOURCE_DEFAULTS["users_per_shard"]))]
    args += ["--skip-bad"] if source.get("skip_bad") else []
    extra = {k: v for k, v in source.items() if k not in {"format", "input", "meta", *SOURCE_DEFAULTS}}
    args += ["--set", *[f"{k}={json.dumps(v)}" for k, v in extra.items()]] if extra else []
    return shlex.join([*args, "--force"])


_verified: set[tuple[str, str]] = set()  # (dataset, fingerprint) already hashed by this process


def verify_fingerprint(path: str | Path, meta: DatasetMeta) -> None:
    """Raise DataError if a shard is missing or the shards changed since ``prepare`` wrote ``meta.json``
    (a bit flip, a truncated copy, a hand edit). Hashed once per process and dataset (~1 s per GB)."""
    path = Path(path)
    key = (str(path.resolve()), meta.fingerprint)
    if not meta.fingerprint or key in _verified:
        return
    source = meta.split_params.get("source", {})
    rebuild = (f"rebuild it with `{rebuild_command(path, source)}`, or delete {path} and re-run (pretraining "
               f"prepares it from data.prepare)" if "format" in source else "rebuild it from its raw data")
    for rel in meta.shards:
        if not (path / rel).is_file():
            raise DataError(path / rel, None, None,
                            f"shard {rel} of the dataset {path} is missing; {rebuild}")
    actual = shards_fingerprint(path, meta.shards)
    if actual != meta.fingerprint:
        for rel in meta.shards:  # name the culprit when one no longer reads (random bytes rarely decode)
            try:
                pq.read_table(path / rel)
            except (OSError, pa.ArrowException) as e:
                raise DataError(path / rel, None, None, f"shard {rel} of the dataset {path} is damaged "
                                f"({e}) and differs from what `prepare` wrote; {rebuild}") from e
        raise DataError(path / "meta.json", None, "fingerprint",
                        f"the shards under {path / 'users'} changed since `prepare` wrote them (sha1 "
                        f"{actual[:12]}, meta.json says {meta.fingerprint[:12]}): the dataset is damaged or "
                        f"was edited; {rebuild}")
    _verified.add(key)


def read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table`` whose errors (damaged file, missing column) name the file."""
    try:
        return pq.read_table(file, columns=columns)
    except FileNotFoundError:
        raise DataError(file, None, None,
                        f"{file} is missing (rebuild the dataset with lum-prepare --force)") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(file, None, None,
                        f"cannot read {file}: {e} (a damaged file: rebuild the dataset with lum-prepare "
                        f"--force)") from e


def iter_user_shards(path: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The user shards in order, after a check that they are the ones ``prepare`` wrote."""
    meta = load_meta(path)
    verify_fingerprint(path, meta)
    for rel in meta.shards:
        yield read_parquet(Path(path) / rel, columns)


def read_users(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All user rows, in shard order."""
    return pa.concat_tables(iter_user_shards(path, columns))


def load_vocab(path: str | Path, field: str) -> pa.Table:
    file = Path(path) / "vocab" / f"{field}.parquet"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no vocabulary for field {field!r}")
    return read_parquet(file)


def item_train_counts(path: str | Path, num_items: int) -> np.ndarray:
    """int64 ``[num_items]``: how often each item occurs in the training behaviours (reserved ids: 0), from the item
    vocabulary. numpy, not torch: under ZeRO-3's ``zero.Init`` torch's tensor constructors are patched."""
    vocab = load_vocab(path, ITEM_FIELD)
    counts = np.zeros(num_items, np.int64)
    counts[vocab.column("id").to_numpy()] = vocab.column("count").to_numpy()
    return counts


def item_log_prob(path: str | Path, num_items: int) -> np.ndarray:
    """log p(item) (float32 [num_items]) from training counts: the popularity baseline and the logQ correction
    (reserved ids and unseen items get a tiny mass)."""
    counts = np.maximum(item_train_counts(path, num_items).astype(np.float64), 1e-3)
    return np.log(counts / counts.sum()).astype(np.float32)


def item_embedding_table(path: str | Path, embeddings: np.ndarray) -> pa.Table:
    """``item_id`` (raw) and ``embedding`` of every real item (reserved ids dropped), from a ``[num_items, E]``
    table indexed by dense id: what export and group query write beside their user outputs."""
    vocab = load_vocab(path, ITEM_FIELD).sort_by("id")
    ids = vocab.column("id").to_numpy()
    keep = ids >= NUM_SPECIAL_IDS
    return pa.table({"item_id": vocab.column("raw").filter(pa.array(keep)),
                     "embedding": float_list_column(np.asarray(embeddings)[ids[keep]])})


def load_items(path: str | Path) -> pa.Table:
    return read_parquet(Path(path) / "items.parquet")


def _items_by_id(path: str | Path, meta: DatasetMeta) -> pa.Table:
    """items.parquet in dense id order, checked against meta.json's item count."""
    items = load_items(path).sort_by("id")
    if items.num_rows != meta.num_items:
        raise ValueError(f"{Path(path) / 'items.parquet'}: {items.num_rows} rows, meta.json has {meta.num_items} items")
    return items


def _max_tags(items: pa.Table) -> int:
    if TAGS_FIELD not in items.column_names:
        return 0
    return int(pc.max(pc.list_value_length(items.column(TAGS_FIELD))).as_py() or 0)


def item_tag_ids(path: str | Path, meta: DatasetMeta) -> np.ndarray:
    """int64 ``[num_items, meta.max_item_tags]``: each item's tag ids by dense item id, PAD-padded."""
    items = _items_by_id(path, meta)
    if TAGS_FIELD not in items.column_names:
        raise ValueError(f"{Path(path) / 'items.parquet'}: no {TAGS_FIELD!r} column (columns {items.column_names}): "
                         f"rebuild the dataset with lum-prepare --force")
    tags = items.column(TAGS_FIELD).combine_chunks()
    lengths = pc.list_value_length(tags).to_numpy(zero_copy_only=False)
    out = np.full((meta.num_items, meta.max_item_tags), PAD_ID, np.int64)
    out[np.arange(meta.max_item_tags) < lengths[:, None]] = pc.list_flatten(tags).to_numpy()
    return out


def item_neighbour_ids(path: str | Path, meta: DatasetMeta, k: int, window: int,
                       distance_weighted: bool = False) -> np.ndarray:
    """int64 ``[num_items, k]``: each item's ``k`` most frequent co-occurrence neighbours by dense item id (ties: the
    smaller id, i.e. the more popular), PAD-padded. Two behaviours co-occur when they are at most ``window`` apart in a
    user's training behaviours (validation and test are never read); an item is not its own neighbour. With
    ``distance_weighted`` a pair ``d`` apart counts ``1/d`` (exactly: integer weights ``lcm(1..window) // d``), so the
    adjacent behaviours lead and the wider window breaks the ties of a rarely seen item. Counted shard by shard: memory
    grows with the distinct pairs, not the behaviours (Beauty, 154k behaviours: 0.6 s)."""
    n = meta.num_items
    scale = math.lcm(*range(1, window + 1))
    weight = [scale // d if distance_weighted else 1 for d in range(1, window + 1)]
    codes, counts = [], []
    for shard in iter_user_shards(path, [ITEM_FIELD, "train_end"]):
        items = shard.column(ITEM_FIELD).combine_chunks()
        flat = pc.list_flatten(items).to_numpy().astype(np.int64)
        lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        room = np.repeat(shard.column("train_end").to_numpy(), lengths) - (np.arange(len(flat)) - starts)
        t = [np.flatnonzero(room > d) for d in range(1, window + 1)]  # t + d is a training behaviour of t's user
        before, after = [flat[t_d] for t_d in t], [flat[t_d + d] for d, t_d in enumerate(t, 1)]
        a, b = np.concatenate(before + after), np.concatenate(after + before)  # both directions
        w = np.concatenate([np.full(len(t_d), w_d, np.int64) for t_d, w_d in zip(t, weight, strict=True)] * 2)
        keep = a != b
        c, inverse = np.unique((a * n + b)[keep], return_inverse=True)
        codes.append(c)
        counts.append(np.bincount(inverse, weights=w[keep]))  # float64: exact for these integer sums
    pairs, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    count = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)
    a, b = pairs // n, pairs % n
    order = np.lexsort((b, -count, a))
    a, b = a[order], b[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a)
    top = rank < k
    out = np.full((n, k), PAD_ID, np.int64)
    out[a[top], rank[top]] = b[top]
    return out


def item_attribute_ids(path: str | Path, meta: DatasetMeta) -> np.ndarray:
    """int64 ``[num_items, len(meta.item_cond_fields)]``: each item's attribute ids, by dense item id."""
    items = _items_by_id(path, meta)
    columns = [items.column(f).to_numpy().astype(np.int64) for f in meta.item_cond_fields]
    return np.stack(columns, axis=1) if columns else np.zeros((meta.num_items, 0), np.int64)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lum-prepare", description="Prepare a raw public dataset as a UBS "
                                "dataset: users/part-*.parquet, vocab/, items.parquet and meta.json (last).")
    add_config_flags(p, PrepareConfig, skip=("options",))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="adapter options, values parsed as YAML, e.g. num_users=500 temporal_cutoffs=[1,2]")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> DatasetMeta:
    args = build_parser().parse_args(argv)
    options = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"command line: --set {item!r} is not of the form KEY=VALUE")
        key, value = item.split("=", 1)
        options[key] = yaml.safe_load(value)
    cfg = config_from_flags(PrepareConfig, args, extra={"options": options} if options else None)
    start = time.perf_counter()
    meta = prepare(cfg.source(), cfg.out, force=cfg.force)
    print(
        f"{cfg.out}: {meta.num_users} users, {meta.num_behaviours} behaviours "
        f"({meta.num_train_behaviours} train), vocab {meta.vocab_sizes}, skipped {meta.skipped}, "
        f"{time.perf_counter() - start:.2f} s"
    )
    return meta


if __name__ == "__main__":
    main()
