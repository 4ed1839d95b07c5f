"""User row -> token sequence, in the layout of :mod:`lum_dist.data.batch`.

Behaviour ``i`` becomes two tokens: a condition token (the behaviour's condition fields, item PAD,
type 0, target ``item[i]``) then an item token (the item id, conditions PAD, type 1, target 0).
Positions restart at 0 per sequence. ``time_gaps`` bucket the seconds since the previous behaviour
as ``floor(log2(gap + 1)) + 1`` (0 = unknown or first behaviour), capped at ``NUM_TIME_BUCKETS - 1``;
gaps come from the user's full history, so a truncated sequence still knows how long ago its first
behaviour followed the one before it. ``max_seq_len`` counts tokens and only whole behaviours are kept.

Query tokens (evaluation, group query) carry time gap 0 and numeric features 0: they must not reveal
anything about the behaviour they predict. Condition dropout (training) turns condition tokens into such
generic queries, so evaluation asks the model something it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN
from lum_dist.data.fast_random import uniform
from lum_dist.data.schema import COND_PREFIX, ITEM_FIELD, MASK_ID, NUM_PREFIX, DatasetMeta

NUM_TIME_BUCKETS = 32  # bucket ids 0..31; 0 = unknown / first behaviour


@dataclass
class TokenSeq:
    item: np.ndarray  # int64 [n]; PAD_ID on condition tokens
    cond: np.ndarray  # int64 [n, F]; PAD_ID on item tokens
    token_type: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    time_gaps: np.ndarray  # int64 [n]
    targets: np.ndarray  # int64 [n]; item to predict, 0 = no loss
    numeric: np.ndarray | None  # float32 [n, G], or None without numeric fields
    num_queries: int
    user_id: str
    # Evaluation only: every item the user had before the target, even those cut off by max_seq_len
    # (excluded from the full ranking).
    seen_items: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.item.shape[0])


def time_gap_buckets(ts: np.ndarray, has_timestamps: bool) -> np.ndarray:
    """int64 [n]: bucketed log2(seconds since the previous behaviour + 1) + 1; 0 for the first."""
    out = np.zeros(len(ts), dtype=np.int64)
    if not has_timestamps or len(ts) < 2:
        return out
    out[1:] = time_gap_buckets_of(np.diff(np.asarray(ts, dtype=np.int64)))
    return out


def _behaviours(row: dict[str, Any], meta: DatasetMeta, lo: int, hi: int, item_attributes: bool) -> TokenSeq:
    """Tokens of behaviours [lo, hi) of ``row``: 2 * (hi - lo) tokens, positions from 0 (zeros are PAD_ID).
    ``item_attributes``: item tokens also carry their item's attribute fields (``meta.item_cond_fields``,
    e.g. its category), which condition dropout never hides; otherwise their condition slots are PAD."""
    n = hi - lo
    items = np.asarray(row[ITEM_FIELD], dtype=np.int64)[lo:hi]
    item = np.zeros(2 * n, dtype=np.int64)
    item[1::2] = items
    cond = np.zeros((2 * n, len(meta.cond_fields)), dtype=np.int64)
    for j, f in enumerate(meta.cond_fields):
        cond[0::2, j] = np.asarray(row[COND_PREFIX + f], dtype=np.int64)[lo:hi]
        if item_attributes and f in meta.item_cond_fields:
            cond[1::2, j] = cond[0::2, j]  # the behaviour's value of an item-attribute field is its item's
    token_type = np.tile(np.array([COND_TOKEN, ITEM_TOKEN], dtype=np.int64), n)
    targets = np.zeros(2 * n, dtype=np.int64)
    targets[0::2] = items
    gaps = np.repeat(time_gap_buckets(np.asarray(row["ts"])[:hi], meta.has_timestamps)[lo:hi], 2)
    numeric = None
    if meta.numeric_fields:
        cols = [np.asarray(row[NUM_PREFIX + g], dtype=np.float32)[lo:hi] for g in meta.numeric_fields]
        numeric = np.repeat(np.stack(cols, axis=1), 2, axis=0)
    return TokenSeq(item, cond, token_type, np.arange(2 * n, dtype=np.int64), gaps, targets, numeric, 0,
                    str(row["user_id"]))


def _append_queries(seq: TokenSeq, queries: np.ndarray, targets: np.ndarray) -> TokenSeq:
    """``seq`` + one condition token per row of ``queries``, all at position len(seq)."""
    q = len(queries)
    zeros = np.zeros(q, dtype=np.int64)
    numeric = None if seq.numeric is None else np.concatenate([seq.numeric, np.zeros((q, seq.numeric.shape[1]),
                                                                                         np.float32)])
    return TokenSeq(
        item=np.concatenate([seq.item, zeros]),
        cond=np.concatenate([seq.cond, np.asarray(queries, dtype=np.int64).reshape(q, seq.cond.shape[1])]),
        token_type=np.concatenate([seq.token_type, np.full(q, COND_TOKEN, np.int64)]),
        positions=np.concatenate([seq.positions, np.full(q, len(seq), np.int64)]),
        time_gaps=np.concatenate([seq.time_gaps, zeros]),
        targets=np.concatenate([seq.targets, np.asarray(targets, dtype=np.int64)]),
        numeric=numeric,
        num_queries=q,
        user_id=seq.user_id,
    )


def _check_len(max_seq_len: int, need: int) -> None:
    if max_seq_len < need:
        raise ValueError(f"max_seq_len={max_seq_len} is too short: need at least {need} tokens")


def tokenize_train(row: dict[str, Any], meta: DatasetMeta, max_seq_len: int,
                   long_sequences: str = "truncate", item_attributes: bool = False) -> list[TokenSeq]:
    """Training sequences of behaviours [0, train_end): the most recent ones ("truncate") or
    consecutive windows of whole behaviours, the newest ending at train_end ("window")."""
    _check_len(max_seq_len, 2)
    end, per = int(row["train_end"]), max_seq_len // 2
    if end <= 0:
        return []
    if long_sequences == "truncate":
        return [_behaviours(row, meta, max(0, end - per), end, item_attributes)]
    if long_sequences == "window":
        starts = range(end - per, -per, -per)
        return [_behaviours(row, meta, max(0, s), s + per, item_attributes) for s in reversed(starts)]
    raise ValueError(f"long_sequences={long_sequences!r}: expected 'truncate' or 'window'")


def tokenize_eval(row: dict[str, Any], meta: DatasetMeta, max_seq_len: int, end: int,
                  item_attributes: bool = False, extra_queries: np.ndarray | None = None,
                  condition_query: bool = False) -> TokenSeq:
    """History [0, end) (the most recent behaviours fitting in max_seq_len - 1 tokens) + one generic
    query condition token (every field MASK_ID) whose target is item[end]; with ``condition_query``, then the
    held-out behaviour's own condition token (its condition fields, time gap and numeric features, exactly as
    training saw it: the next-condition-item task); then one query per row of ``extra_queries`` (condition ids
    [Q, F], same target). ``seen_items`` = the distinct items of the whole history [0, end)."""
    _check_len(max_seq_len, 1)
    items = row[ITEM_FIELD]
    if not 0 <= end < len(items):
        raise ValueError(f"user {row['user_id']}: eval target index {end} outside [0, {len(items)})")
    hist = _behaviours(row, meta, max(0, end - (max_seq_len - 1) // 2), end, item_attributes)
    query = np.full((1, len(meta.cond_fields)), MASK_ID, dtype=np.int64)
    own = _behaviours(row, meta, end, end + 1, item_attributes) if condition_query else None
    if own is not None:
        query = np.concatenate([query, own.cond[:1]])
    if extra_queries is not None:
        query = np.concatenate([query, np.asarray(extra_queries, dtype=np.int64).reshape(-1, query.shape[1])])
    seq = _append_queries(hist, query, np.full(len(query), int(items[end])))
    if own is not None:  # query tokens carry no time gap or statistics, except this one: it is the real token
        seq.time_gaps[len(hist) + 1] = own.time_gaps[0]
        if seq.numeric is not None:
            seq.numeric[len(hist) + 1] = own.numeric[0]
    return replace(seq, seen_items=np.unique(np.asarray(items[:end], dtype=np.int64)))


def tokenize_group_query(row: dict[str, Any], meta: DatasetMeta, max_seq_len: int, end: int,
                         queries: np.ndarray, item_attributes: bool = False) -> TokenSeq:
    """History [0, end) (<= max_seq_len tokens) + Q query condition tokens at position L (targets 0)."""
    _check_len(max_seq_len, 0)
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != len(meta.cond_fields):
        raise ValueError(f"queries: expected shape [Q, {len(meta.cond_fields)}], got {queries.shape}")
    end = min(int(end), len(row[ITEM_FIELD]))
    hist = _behaviours(row, meta, max(0, end - max_seq_len // 2), end, item_attributes)
    return _append_queries(hist, queries, np.zeros(len(queries), np.int64))


def apply_cond_dropout(seq: TokenSeq, p: float, rng: np.random.Generator) -> TokenSeq:
    """Each condition token (query tokens excluded) becomes a generic query with probability p: every
    field MASK_ID, time gap 0 (unknown) and numeric features 0, exactly the query token of evaluation
    and of the generic group query, so that query is in the training distribution."""
    if p <= 0.0:
        return seq
    n_hist = len(seq) - seq.num_queries
    drop = np.zeros(len(seq), dtype=bool)
    drop[:n_hist] = (rng.random(n_hist) < p) & (seq.token_type[:n_hist] == COND_TOKEN)
    cond, gaps = seq.cond.copy(), seq.time_gaps.copy()
    cond[drop], gaps[drop] = MASK_ID, 0
    numeric = None
    if seq.numeric is not None:
        numeric = seq.numeric.copy()
        numeric[drop] = 0.0
    return replace(seq, cond=cond, time_gaps=gaps, numeric=numeric)


# ---------------------------------------------------------------------------------------------
# Vectorised training tokenization: many users at once, identical to tokenize_train + apply_cond_dropout
# (the loop above costs tens of microseconds per user; the loader needs millions of tokens per second).

ListColumns = dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (flat values, offsets [users + 1])


@dataclass
class TokenBlock:
    """Training sequences laid end to end: the columns of a list of TokenSeq concatenated. Positions
    restart at 0 per sequence and token types alternate condition/item, so neither is stored."""

    item: np.ndarray  # int64 [T]
    cond: np.ndarray  # int64 [T, F]
    time_gaps: np.ndarray  # int64 [T]
    targets: np.ndarray  # int64 [T]
    numeric: np.ndarray | None  # float32 [T, G]
    offsets: np.ndarray  # int64 [S + 1]: sequence s holds tokens [offsets[s], offsets[s + 1])
    user_ids: np.ndarray  # object [S]: str

    def __len__(self) -> int:
        return len(self.offsets) - 1


def train_windows(train_end: np.ndarray, max_seq_len: int,
                  long_sequences: str = "truncate") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user, lo, hi)`` int64 arrays: the behaviour ranges ``tokenize_train`` cuts from users with
    these ``train_end``, users in order and windows oldest first (users without training behaviour
    have none). A user's condition-dropout draws run over its windows in this order."""
    _check_len(max_seq_len, 2)
    end, per = np.asarray(train_end, dtype=np.int64), max_seq_len // 2
    if long_sequences == "truncate":
        user = np.flatnonzero(end > 0)
        return user, np.maximum(0, end[user] - per), end[user]
    if long_sequences == "window":
        count = np.where(end > 0, -(-end // per), 0)  # ceil(end / per) windows
        user = np.repeat(np.arange(len(end)), count)
        w = np.arange(len(user)) - np.repeat(np.cumsum(count) - count, count)
        start = end[user] - per * (count[user] - w)
        return user, np.maximum(0, start), start + per
    raise ValueError(f"long_sequences={long_sequences!r}: expected 'truncate' or 'window'")


def segment_arange(n: np.ndarray) -> np.ndarray:
    """``[0, 1, ..., n[0] - 1, 0, 1, ..., n[1] - 1, ...]`` (int64)."""
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


def tokenize_block(lists: ListColumns, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, user_ids: np.ndarray,
                   meta: DatasetMeta, item_attributes: bool = False) -> TokenBlock:
    """Sequences of behaviours [lo, hi) of users ``rows`` (indices into ``lists``; ``user_ids`` theirs, an
    object array of str), as ``_behaviours`` makes them one at a time."""
    rows, lo = np.asarray(rows, dtype=np.int64), np.asarray(lo, dtype=np.int64)
    nb = np.asarray(hi, dtype=np.int64) - lo
    within = np.repeat(lo, nb) + segment_arange(nb)  # behaviour index within its user
    rep = np.repeat(np.arange(len(rows)), nb)

    def take(name: str, dtype: type) -> np.ndarray:
        values, offsets = lists[name]
        return values[offsets[rows][rep] + within].astype(dtype, copy=False)

    n = 2 * len(within)
    items = take(ITEM_FIELD, np.int64)
    item, targets = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    item[1::2], targets[0::2] = items, items
    cond = np.zeros((n, len(meta.cond_fields)), dtype=np.int64)
    for j, f in enumerate(meta.cond_fields):
        cond[0::2, j] = take(COND_PREFIX + f, np.int64)
        if item_attributes and f in meta.item_cond_fields:
            cond[1::2, j] = cond[0::2, j]
    gaps = np.zeros(len(within), dtype=np.int64)
    if meta.has_timestamps:
        ts_values, ts_offsets = lists["ts"]
        at = ts_offsets[rows][rep] + within
        later = np.flatnonzero(within > 0)  # a user's first behaviour has no gap
        diff = ts_values[at[later]].astype(np.int64) - ts_values[at[later] - 1].astype(np.int64)
        gaps[later] = time_gap_buckets_of(diff)
    numeric = None
    if meta.numeric_fields:
        numeric = np.repeat(np.stack([take(NUM_PREFIX + g, np.float32) for g in meta.numeric_fields], axis=1), 2,
                            axis=0)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(2 * nb, out=offsets[1:])
    return TokenBlock(item, cond, np.repeat(gaps, 2), targets, numeric, offsets, user_ids)


def time_gap_buckets_of(gaps: np.ndarray) -> np.ndarray:
    """Buckets of second gaps (``time_gap_buckets`` after its diff): floor(log2(max(gap, 0) + 1)) + 1, capped."""
    g = np.maximum(np.asarray(gaps, dtype=np.int64), 0).astype(np.float64)
    return np.minimum(np.floor(np.log2(g + 1.0)).astype(np.int64) + 1, NUM_TIME_BUCKETS - 1)


def cond_dropout_block(block: TokenBlock, p: float, keys: np.ndarray, draw_start: np.ndarray) -> TokenBlock:
    """``apply_cond_dropout`` on every sequence of ``block`` in place: sequence s draws from
    ``default_rng(keys[s])`` from its ``draw_start[s]``-th number on (a user's later windows continue
    its earlier windows' stream), one number per token."""
    if p <= 0.0:
        return block
    lens = np.diff(block.offsets) // 2
    seq = np.repeat(np.arange(len(block)), lens)
    draw = np.repeat(np.asarray(draw_start, dtype=np.int64), lens) + 2 * segment_arange(lens)  # condition tokens
    drop = 2 * np.flatnonzero(uniform(keys, seq, draw) < p)
    block.cond[drop] = MASK_ID
    block.time_gaps[drop] = 0
    if block.numeric is not None:
        block.numeric[drop] = 0.0
    return block
