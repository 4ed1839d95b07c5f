"""Rank-sharded, shuffled, packed and exactly resumable training loader; packed evaluation batches.

Sharding: user ``g`` (its index in the dataset, shards in order) belongs to rank ``g % world_size``,
so ranks hold disjoint, near-equal (+-1 user) subsets that together cover every user. Each rank reads
the shards once, shard by shard, and keeps only its own users, as flat numpy columns.

Order: epoch ``e`` visits the rank's users in the order of ``permutation(num_users)`` drawn from
``(seed, e)``, restricted to the rank's users. Each user yields ``tokenize_train`` sequences with
condition dropout drawn from ``(seed, e, rank, g)``. Sequences fill a buffer of
``shuffle_buffer``; a full buffer is shuffled, packed into rows of ``token_budget`` (best fit
decreasing, or one sequence per row padded to the budget for ``packing="pad"``), the rows are
shuffled and queued, and batches take ``rows_per_batch`` rows off the queue (rows left over wait for the next buffer). The
stream is infinite: epochs follow one another, a buffer may straddle two.

Exact resume: every sequence is a pure function of its key ``(epoch, user, window)``, so the state is
small: epoch, read position, buffers made so far, and the keys of the queued rows. Loading it rebuilds
the queue from the keys; the batches that follow equal those of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lum_dist.config import DataConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.errors import DataError
from lum_dist.data.packing import best_fit_decreasing, collate, pad_rows
from lum_dist.data.prepare import iter_user_shards, load_meta
from lum_dist.data.schema import COND_PREFIX, ITEM_FIELD, NUM_PREFIX, DatasetMeta
from lum_dist.data.tokenize import TokenSeq, apply_cond_dropout, tokenize_eval, tokenize_train

STATE_VERSION = 1
EVAL_CHUNK = 4096  # eval sequences packed together


def _columns(meta: DatasetMeta) -> list[str]:
    return ["user_id", ITEM_FIELD, *[COND_PREFIX + f for f in meta.cond_fields], "ts",
            *[NUM_PREFIX + g for g in meta.numeric_fields], "train_end", "valid_end"]


def _checked_shards(path: Path, meta: DatasetMeta) -> Iterator[pa.Table]:
    """The user shards (tokenization's columns), each checked: list columns as long as ``item``,
    0 <= train_end <= valid_end <= length. A bad row raises DataError naming shard, row and field."""
    for rel, table in zip(meta.shards, iter_user_shards(path, _columns(meta)), strict=True):
        n = table.column(ITEM_FIELD).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        checks = [(name, table.column(name).combine_chunks().value_lengths().to_numpy(zero_copy_only=False) != n,
                   "length differs from the item list's")
                  for name in table.column_names if name != ITEM_FIELD and pa.types.is_list(table.column(name).type)]
        te, ve = table.column("train_end").to_numpy(), table.column("valid_end").to_numpy()
        checks += [("train_end", (te < 0) | (te > ve), "must satisfy 0 <= train_end <= valid_end"),
                   ("valid_end", ve > n, "exceeds the number of behaviours")]
        for name, bad, message in checks:
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(path / rel, row + 1, name, f"user {table.column('user_id')[row]}: {message}")
        yield table


class UserColumns:
    """Users as flat numpy columns (values + offsets per list column): compact, O(1) row access."""

    def __init__(self, table: pa.Table):
        self.user_id = table.column("user_id").to_pylist()
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                arr = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
                self.lists[name] = (arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy())
        self.train_end = table.column("train_end").to_numpy()
        self.valid_end = table.column("valid_end").to_numpy()

    def __len__(self) -> int:
        return len(self.user_id)

    def lengths(self) -> np.ndarray:
        offsets = self.lists[ITEM_FIELD][1]
        return offsets[1:] - offsets[:-1]

    def row(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {name: v[o[i]:o[i + 1]] for name, (v, o) in self.lists.items()}
        out.update(user_id=self.user_id[i], train_end=int(self.train_end[i]), valid_end=int(self.valid_end[i]))
        return out


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


class PackedLoader:
    """Infinite iterator of PackedBatch (``data_cfg.rows_per_batch`` rows each) for one rank."""

    def __init__(self, path: str | Path, data_cfg: DataConfig, split: str = "train", rank: int = 0,
                 world_size: int = 1):
        if split != "train":
            raise ValueError(f"PackedLoader streams the training split; use eval_batches for {split!r}")
        _check_rank(rank, world_size)
        if data_cfg.packing not in ("pack", "pad"):
            raise ValueError(f"data.packing={data_cfg.packing!r}: expected 'pack' or 'pad'")
        if data_cfg.max_seq_len > data_cfg.token_budget:
            raise ValueError(f"data.max_seq_len={data_cfg.max_seq_len} > data.token_budget={data_cfg.token_budget}")
        self.path, self.cfg, self.rank, self.world_size = Path(path), data_cfg, rank, world_size
        self.meta = load_meta(self.path)
        tables, total, tokens = [], 0, 0
        for table in _checked_shards(self.path, self.meta):
            mine = np.flatnonzero((total + np.arange(table.num_rows)) % world_size == rank)
            tables.append(table.take(mine))
            total += table.num_rows
            tokens += train_tokens(table.column("train_end").to_numpy(), data_cfg.max_seq_len, data_cfg.long_sequences)
        self.num_users_total = total
        self.tokens_per_epoch = tokens  # every rank's users: one pass over the training split
        self.users = UserColumns(pa.concat_tables(tables))
        if len(self.users) == 0:
            raise ValueError(f"{self.path}: rank {rank} of {world_size} gets no users ({total} in all)")
        self.epoch, self.pos, self.buffers = 0, 0, 0
        self._queue: list[list[tuple[tuple[int, int, int], TokenSeq]]] = []
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def epochs_done(self) -> float:
        """Passes over this rank's users so far (epoch + fraction read), as of the last buffer filled."""
        return self.epoch + self.pos / max(1, len(self._epoch_order(self.epoch)))

    # -- sequence generation: pure functions of (epoch, user, window) --------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Global ids of this rank's users in epoch ``epoch``'s order."""
        if epoch != self._order_epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.num_users_total)
            self._order, self._order_epoch = perm[perm % self.world_size == self.rank], epoch
        return self._order

    def _user_seqs(self, epoch: int, user: int) -> list[TokenSeq]:
        seqs = tokenize_train(self.users.row(user // self.world_size), self.meta, self.cfg.max_seq_len,
                              self.cfg.long_sequences, self.cfg.item_attributes)
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, user])
        return [apply_cond_dropout(s, self.cfg.cond_dropout, rng) for s in seqs]

    def _refill(self) -> None:
        pool: list[tuple[tuple[int, int, int], TokenSeq]] = []
        visited = 0
        while len(pool) < self.cfg.shuffle_buffer:
            order = self._epoch_order(self.epoch)
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            if visited > len(order) and not pool:
                raise ValueError(f"{self.path}: rank {self.rank} has no user with a training behaviour")
            user = int(order[self.pos])
            self.pos += 1
            visited += 1
            pool.extend(((self.epoch, user, w), s) for w, s in enumerate(self._user_seqs(self.epoch, user)))
        rng = np.random.default_rng([self.cfg.seed, self.rank, self.buffers, 1])
        self.buffers += 1
        pool = [pool[i] for i in rng.permutation(len(pool))]
        lengths = np.array([len(s) for _, s in pool])
        pack = best_fit_decreasing if self.cfg.packing == "pack" else pad_rows
        rows = pack(lengths, self.cfg.token_budget)
        self._queue.extend([pool[i] for i in rows[r]] for r in rng.permutation(len(rows)))

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        while len(self._queue) < self.cfg.rows_per_batch:
            self._refill()
        rows, self._queue = self._queue[:self.cfg.rows_per_batch], self._queue[self.cfg.rows_per_batch:]
        seqs = [s for row in rows for _, s in row]
        index, start = [], 0
        for row in rows:
            index.append(list(range(start, start + len(row))))
            start += len(row)
        return collate(seqs, index, self.cfg.token_budget, pad=self.cfg.packing == "pad")

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "fingerprint": self.meta.fingerprint, "rank": self.rank,
            "world_size": self.world_size, "seed": self.cfg.seed, "epoch": self.epoch, "pos": self.pos,
            "buffers": self.buffers, "queue": [[list(key) for key, _ in row] for row in self._queue],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.meta.fingerprint:
            raise ValueError(f"{self.path}: dataset fingerprint {self.meta.fingerprint!r} differs from the "
                             f"checkpoint's {state['fingerprint']!r}; refusing to resume on different data")
        for key, mine in (("rank", self.rank), ("world_size", self.world_size), ("seed", self.cfg.seed)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {key}={mine}: cannot resume")
        self.epoch, self.pos, self.buffers = int(state["epoch"]), int(state["pos"]), int(state["buffers"])
        cache: dict[tuple[int, int], list[TokenSeq]] = {}
        queue = []
        for row in state["queue"]:
            entries = []
            for epoch, user, w in row:
                if (epoch, user) not in cache:
                    cache[epoch, user] = self._user_seqs(epoch, user)
                entries.append(((epoch, user, w), cache[epoch, user][w]))
            queue.append(entries)
        self._queue = queue


def train_tokens(train_end: np.ndarray, max_seq_len: int, long_sequences: str) -> int:
    """Tokens ``tokenize_train`` makes from users with these ``train_end`` (two per training behaviour kept)."""
    behaviours = np.asarray(train_end, dtype=np.int64)
    if long_sequences == "truncate":
        behaviours = np.minimum(behaviours, max_seq_len // 2)
    return int(2 * behaviours.clip(min=0).sum())


def eval_target_index(users: UserColumns, split: str) -> np.ndarray:
    """Per user, the index of its held-out behaviour in ``split``, or -1 if it has none."""
    n, te, ve = users.lengths(), users.train_end, users.valid_end
    if split == "valid":
        return np.where((te < n) & (ve > te), te, -1)
    if split == "test":
        return np.where(ve < n, ve, -1)
    raise ValueError(f"split={split!r}: expected 'valid' or 'test'")


def eval_batches(path: str | Path, meta: DatasetMeta, split: str, max_seq_len: int, token_budget: int,
                 max_users: int = 0, rank: int = 0, world_size: int = 1,
                 item_attributes: bool = False) -> Iterator[PackedBatch]:
    """One packed row per batch of eval sequences (history + one query token, the last of each
    sequence). Eligible users in dataset order, the first ``max_users`` (0 = all), the i-th to rank
    ``i % world_size``."""
    _check_rank(rank, world_size)
    if max_seq_len > token_budget:
        raise ValueError(f"max_seq_len={max_seq_len} > token_budget={token_budget}")
    path = Path(path)
    seen, pending = 0, []
    for table in _checked_shards(path, meta):
        users = UserColumns(table)
        for i in np.flatnonzero(eval_target_index(users, split) >= 0).tolist():
            if max_users and seen >= max_users:
                break
            if seen % world_size == rank:
                row = users.row(i)
                end = row["train_end"] if split == "valid" else row["valid_end"]
                pending.append(tokenize_eval(row, meta, max_seq_len, end, item_attributes))
            seen += 1
        done = bool(max_users) and seen >= max_users
        if len(pending) >= EVAL_CHUNK or done:
            yield from _eval_rows(pending, token_budget)
            pending = []
        if done:
            return
    yield from _eval_rows(pending, token_budget)


def _eval_rows(seqs: list[TokenSeq], token_budget: int) -> Iterator[PackedBatch]:
    if not seqs:
        return
    for row in best_fit_decreasing(np.array([len(s) for s in seqs]), token_budget):
        yield collate(seqs, [row], token_budget)
