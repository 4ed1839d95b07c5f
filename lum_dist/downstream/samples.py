"""Downstream samples built from a prepared dataset, without leakage.

A *request* is one user at one moment: the features known when the system is asked to recommend (the most
recent behaviours before the target, right-aligned and PAD-padded) and the behaviour that followed.

    train requests  target = behaviour t, history = behaviours [0, t), for the user's last ``per_user``
                    positions t <= train_end (t = train_end: the validation behaviour)
    eval  request   target = behaviour valid_end, history = behaviours [0, valid_end)

The step-2 outputs used with them are computed before the request: query_valid (history up to the first
training request: train_end - lag) for training, query_test (history up to valid_end) for evaluation, as
stored outputs refreshed offline serve the requests that follow; each request records ``position`` so
the history length of the output it uses can be checked against it. Ranking samples add ``neg_ratio``
negatives per positive, drawn uniformly (seeded) from items the user never interacted with: in [0, valid_end] for training
(so a test target is never a training negative), in the whole sequence for evaluation. Targets unseen in
training (UNK) cannot be scored by an id-based model and are dropped (counted in ``Requests.dropped_unk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lum_dist.data.prepare import load_items, load_meta, load_vocab, read_users
from lum_dist.data.schema import COND_PREFIX, ITEM_FIELD, NUM_SPECIAL_IDS, PAD_ID, DatasetMeta


@dataclass
class Dataset:
    """The parts of a prepared dataset the downstream stage reads."""

    meta: DatasetMeta
    users: pa.Table  # user rows, shard order
    attr_field: str  # item-attribute condition field
    item_attr: np.ndarray  # [num_items] dense attribute id of every item (PAD for reserved ids)
    item_raw: list[str]  # [num_items] raw item id
    attr_raw: list[str]  # [attr vocab size] raw attribute value

    @property
    def num_items(self) -> int:
        return self.meta.num_items

    @property
    def num_attrs(self) -> int:
        return self.meta.vocab_sizes[self.attr_field]


@dataclass
class Requests:
    user_idx: np.ndarray  # [R] row of the user in Dataset.users (also the user-id feature)
    user_id: list[str]  # [R] raw user id
    hist_items: np.ndarray  # [R, N] most recent history items, right-aligned, PAD-padded
    hist_attrs: np.ndarray  # [R, N] their attribute field values
    target: np.ndarray  # [R] item of the target behaviour
    position: np.ndarray  # [R] index of the target behaviour in the user's sequence (= history length)
    history: list[np.ndarray]  # [R] every history item (excluded from retrieval ranking)
    interacted: list[np.ndarray]  # [R] items never to be drawn as negatives
    dropped_unk: int = 0


@dataclass
class CTRSamples:
    request: np.ndarray  # [S] index into Requests
    cand: np.ndarray  # [S] candidate item
    label: np.ndarray  # [S] float32, 1 = the target, 0 = a sampled negative


def load_dataset(path: str | Path, attr_field: str = "", max_users: int = 0) -> Dataset:
    root = Path(path)
    meta = load_meta(root)
    attr_field = attr_field or (meta.item_cond_fields[0] if meta.item_cond_fields else "")
    if attr_field not in meta.item_cond_fields:
        raise ValueError(f"{root}/meta.json: attr_field {attr_field!r} is not an item-attribute field "
                         f"(item_cond_fields: {meta.item_cond_fields})")
    users = read_users(root)
    if max_users:
        users = users.slice(0, max_users)
    items = load_items(root).sort_by("id")
    if items.num_rows != meta.num_items or attr_field not in items.column_names:
        raise ValueError(f"{root}/items.parquet: expected {meta.num_items} rows with column {attr_field!r}, "
                         f"got {items.num_rows} rows, columns {items.column_names}")
    attr_vocab = load_vocab(root, attr_field).sort_by("id")
    return Dataset(meta=meta, users=users, attr_field=attr_field,
                   item_attr=items.column(attr_field).to_numpy().astype(np.int64),
                   item_raw=items.column("raw").to_pylist(), attr_raw=attr_vocab.column("raw").to_pylist())


def build_requests(data: Dataset, split: str, max_history: int, per_user: int = 1) -> Requests:
    """Requests of the users that have the split's target behaviour (see the module docstring): up to
    ``per_user`` per user for "train", one for "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    items_col = data.users.column(ITEM_FIELD).to_pylist()
    attrs_col = data.users.column(COND_PREFIX + data.attr_field).to_pylist()
    train_end = data.users.column("train_end").to_numpy()
    valid_end = data.users.column("valid_end").to_numpy()
    uids = data.users.column("user_id").to_pylist()
    rows, positions, hist_i, hist_a, targets, history, interacted, dropped = [], [], [], [], [], [], [], 0
    for u, (items, attrs) in enumerate(zip(items_col, attrs_col, strict=True)):
        items, attrs = np.asarray(items, np.int64), np.asarray(attrs, np.int64)
        if split == "train":  # training behaviours up to the validation one, never a test-time item
            last, seen = int(train_end[u]), items[: int(valid_end[u]) + 1]
            if last >= int(valid_end[u]) or last >= len(items):
                continue
            ends = range(max(1, last - per_user + 1), last + 1)
        else:  # the test behaviour, seen from everything before it
            ends, seen = [int(valid_end[u])], items
            if ends[0] >= len(items):
                continue
        for end in ends:
            if items[end] < NUM_SPECIAL_IDS:
                dropped += 1
                continue
            n = min(end, max_history)
            hi, ha = np.full(max_history, PAD_ID, np.int64), np.full(max_history, PAD_ID, np.int64)
            if n:
                hi[-n:], ha[-n:] = items[end - n:end], attrs[end - n:end]
            rows.append(u)
            positions.append(end)
            hist_i.append(hi)
            hist_a.append(ha)
            targets.append(items[end])
            history.append(items[:end])
            interacted.append(seen)
    if not rows:
        raise ValueError(f"no {split} request: no user has a {'validation' if split == 'train' else 'test'} "
                         f"behaviour seen in training")
    return Requests(user_idx=np.array(rows, np.int64), user_id=[uids[u] for u in rows],
                    hist_items=np.stack(hist_i), hist_attrs=np.stack(hist_a), target=np.array(targets, np.int64),
                    position=np.array(positions, np.int64),
                    history=history, interacted=interacted, dropped_unk=dropped)


def sample_negatives(rng: np.random.Generator, num_items: int, interacted: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct real items not in ``interacted``, uniformly (rejection sampling: fast when items >> n)."""
    banned = np.unique(interacted[interacted >= NUM_SPECIAL_IDS])
    if num_items - NUM_SPECIAL_IDS - len(banned) < n:
        raise ValueError(f"cannot draw {n} negatives: only {num_items - NUM_SPECIAL_IDS - len(banned)} "
                         f"items were never interacted with")
    out = np.empty(0, np.int64)
    while len(out) < n:
        draw = rng.integers(NUM_SPECIAL_IDS, num_items, size=2 * n)
        draw = draw[~np.isin(draw, banned) & ~np.isin(draw, out)]
        _, first = np.unique(draw, return_index=True)
        out = np.concatenate([out, draw[np.sort(first)]])[:n]
    return out


def ctr_samples(req: Requests, num_items: int, neg_ratio: int, seed: int) -> CTRSamples:
    """Each request's target as a positive plus ``neg_ratio`` sampled negatives, grouped per request."""
    rng = np.random.default_rng(seed)
    cands = [np.concatenate([[t], sample_negatives(rng, num_items, seen, neg_ratio)])
             for t, seen in zip(req.target, req.interacted, strict=True)]
    label = np.zeros((len(cands), neg_ratio + 1), np.float32)
    label[:, 0] = 1.0
    return CTRSamples(request=np.repeat(np.arange(len(cands)), neg_ratio + 1),
                      cand=np.concatenate(cands).astype(np.int64), label=label.reshape(-1))
