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

Speed: a buffer is tokenized at once, by array operations over all its users (``tokenize_block``,
``cond_dropout_block``: numpy's per-user generators reproduced over arrays of keys, see
``fast_random``), and batches are gathered from it (``collate_blocks``), not one user and one sequence
at a time; the batches are exactly those of ``tokenize_train`` + ``apply_cond_dropout`` + ``collate``
per user (``tests/data/test_fast_paths.py`` runs that plain algorithm beside the loader).
``lum_dist.data.workers`` runs this loader in worker processes (``data.num_workers``).

Exact resume: every sequence is a pure function of its key ``(epoch, user, window)``, so the state is
small: epoch, read position, buffers made so far, and the keys of the queued rows. Loading it rebuilds
the queue from the keys; the batches that follow equal those of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lum_dist.config import DataConfig
from lum_dist.data.batch import PackedBatch
from lum_dist.data.errors import DataError
from lum_dist.data.packing import best_fit_decreasing, collate, collate_blocks, pad_rows
from lum_dist.data.prepare import iter_user_shards, load_meta
from lum_dist.data.schema import COND_PREFIX, ITEM_FIELD, NUM_PREFIX, DatasetMeta
from lum_dist.data.tokenize import (
    TokenBlock,
    TokenSeq,
    cond_dropout_block,
    segment_arange,
    tokenize_block,
    tokenize_eval,
    train_windows,
)

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


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


@dataclass(frozen=True)
class LoaderPosition:
    """Where a PackedLoader stands: what ``state_dict`` holds, as arrays (cheap to take after every batch
    and to send between processes)."""

    epoch: int
    pos: int
    buffers: int
    keys: np.ndarray  # int64 [n, 3]: (epoch, user, window) of every queued sequence, row after row
    row_sizes: np.ndarray  # int64 [rows]: sequences per queued row

    def after_batch(self, rows: int) -> LoaderPosition:
        """The position after a batch of ``rows`` rows that needed no new buffer: the queue's first rows
        gone, nothing else changed."""
        return LoaderPosition(self.epoch, self.pos, self.buffers, self.keys[int(self.row_sizes[:rows].sum()):],
                              self.row_sizes[rows:])

    def state_dict(self, fingerprint: str, rank: int, world_size: int, seed: int) -> dict[str, Any]:
        """The PackedLoader state format (plain Python values, for checkpoints)."""
        keys = self.keys.tolist()
        bounds = np.concatenate([[0], np.cumsum(self.row_sizes)]).tolist()
        return {"version": STATE_VERSION, "fingerprint": fingerprint, "rank": rank, "world_size": world_size,
                "seed": seed, "epoch": self.epoch, "pos": self.pos, "buffers": self.buffers,
                "queue": [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]}


class PackedLoader:
    """Infinite iterator of PackedBatch (``data_cfg.rows_per_batch`` rows each) for one rank, made in the
    calling process (``data.num_workers`` is applied by ``lum_dist.data.workers.train_loader``)."""

    def __init__(self, path: str | Path, data_cfg: DataConfig, split: str = "train", rank: int = 0,
                 world_size: int = 1):
        if split != "train":
            raise ValueError(f"PackedLoader streams the training split; use eval_batches for {split!r}")
        check_rank(rank, world_size)
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
        self._user_ids = np.array([str(u) for u in self.users.user_id], dtype=object)
        # every training sequence of this rank's users: user (local index), behaviours [lo, hi)
        self._seq_user, self._seq_lo, self._seq_hi = train_windows(self.users.train_end, data_cfg.max_seq_len,
                                                                   data_cfg.long_sequences)
        self._num_seqs = np.bincount(self._seq_user, minlength=len(self.users))
        self._first_seq = np.cumsum(self._num_seqs) - self._num_seqs
        self.epoch, self.pos, self.buffers = 0, 0, 0
        # packed rows: (block, the block's keys, indices of the row's sequences in the block)
        self._queue: list[tuple[TokenBlock, np.ndarray, np.ndarray]] = []
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

    def _block(self, keys: np.ndarray) -> TokenBlock:
        """The sequences of ``keys`` (int64 [n, 3]: epoch, global user, window), condition dropout drawn
        from ``default_rng([seed, epoch, rank, user])`` per user, as ``tokenize_train`` and
        ``apply_cond_dropout`` make them one user at a time."""
        local = keys[:, 1] // self.world_size
        seq = self._first_seq[local] + keys[:, 2]
        lo = self._seq_lo[seq]
        block = tokenize_block(self.users.lists, local, lo, self._seq_hi[seq],
                               self._user_ids[local], self.meta, self.cfg.item_attributes)
        rng_keys = np.stack([np.full(len(keys), self.cfg.seed), keys[:, 0], np.full(len(keys), self.rank),
                             keys[:, 1]], axis=1)
        first_lo = self._seq_lo[self._first_seq[local]]  # a user's windows share one stream of draws
        return cond_dropout_block(block, self.cfg.cond_dropout, rng_keys, 2 * (lo - first_lo))

    def _next_users(self) -> np.ndarray:
        """int64 [n, 2] (epoch, user): the users (in epoch order) whose sequences fill the next buffer."""
        if not self._num_seqs.any():
            raise ValueError(f"{self.path}: rank {self.rank} has no user with a training behaviour")
        taken, count = [], 0
        while count < self.cfg.shuffle_buffer:
            order = self._epoch_order(self.epoch)
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            need, span = self.cfg.shuffle_buffer - count, self.cfg.shuffle_buffer
            while True:  # a window of users long enough to hold what is missing (or the epoch's rest)
                users = order[self.pos:self.pos + span]
                seqs = np.cumsum(self._num_seqs[users // self.world_size])
                if seqs[-1] >= need or self.pos + span >= len(order):
                    break
                span *= 2
            take = min(int(np.searchsorted(seqs, need)) + 1, len(users))
            taken.append(np.stack([np.full(take, self.epoch), users[:take]], axis=1))
            count += int(seqs[take - 1])
            self.pos += take
        return np.concatenate(taken)

    def _refill(self) -> None:
        users = self._next_users()
        n = self._num_seqs[users[:, 1] // self.world_size]
        keys = np.concatenate([np.repeat(users, n, axis=0), segment_arange(n)[:, None]], axis=1)
        rng = np.random.default_rng([self.cfg.seed, self.rank, self.buffers, 1])
        self.buffers += 1
        keys = keys[rng.permutation(len(keys))]
        block = self._block(keys)
        pack = best_fit_decreasing if self.cfg.packing == "pack" else pad_rows
        rows = pack(np.diff(block.offsets), self.cfg.token_budget)
        self._queue.extend((block, keys, np.array(rows[r], dtype=np.int64)) for r in rng.permutation(len(rows)))

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        while len(self._queue) < self.cfg.rows_per_batch:
            self._refill()
        rows, self._queue = self._queue[:self.cfg.rows_per_batch], self._queue[self.cfg.rows_per_batch:]
        return collate_blocks([(block, idx) for block, _, idx in rows], self.cfg.token_budget,
                              pad=self.cfg.packing == "pad")

    # -- state --------------------------------------------------------------------------------------

    def position(self) -> LoaderPosition:
        keys = [keys[idx] for _, keys, idx in self._queue]
        return LoaderPosition(self.epoch, self.pos, self.buffers,
                              np.concatenate(keys) if keys else np.empty((0, 3), np.int64),
                              np.array([len(idx) for _, _, idx in self._queue], dtype=np.int64))

    def state_dict(self, position: LoaderPosition | None = None) -> dict[str, Any]:
        """The state after the last batch (or at an earlier ``position``), for ``load_state_dict``."""
        return (position or self.position()).state_dict(self.meta.fingerprint, self.rank, self.world_size,
                                                        self.cfg.seed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("num_workers", 0) != 0:
            raise ValueError(f"loader state of data.num_workers={state['num_workers']}, this loader runs without "
                             "workers: resume with the same data.num_workers")
        if state["fingerprint"] != self.meta.fingerprint:
            raise ValueError(f"{self.path}: dataset fingerprint {self.meta.fingerprint!r} differs from the "
                             f"checkpoint's {state['fingerprint']!r}; refusing to resume on different data")
        for key, mine in (("rank", self.rank), ("world_size", self.world_size), ("seed", self.cfg.seed)):
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader {key}={mine}: cannot resume")
        self.epoch, self.pos, self.buffers = int(state["epoch"]), int(state["pos"]), int(state["buffers"])
        sizes = np.array([len(row) for row in state["queue"]], dtype=np.int64)
        keys = np.array([key for row in state["queue"] for key in row], dtype=np.int64).reshape(-1, 3)
        block = self._block(keys)
        bounds = np.cumsum(sizes) - sizes
        self._queue = [(block, keys, np.arange(a, a + n))
                       for a, n in zip(bounds.tolist(), sizes.tolist(), strict=True)]


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
                 item_attributes: bool = False, extra_queries: np.ndarray | None = None,
                 condition_query: bool = False) -> Iterator[PackedBatch]:
    """One packed row per batch of eval sequences (history + the generic query token, then the held-out
    behaviour's own condition token with ``condition_query`` and the ``extra_queries``, if any: see
    ``tokenize_eval``). Eligible users in dataset order, the first ``max_users``
    (0 = all), the i-th to rank ``i % world_size``."""
    check_rank(rank, world_size)  # max_seq_len <= token_budget: PretrainConfig checks it, the packer enforces it
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
                pending.append(tokenize_eval(row, meta, max_seq_len, end, item_attributes, extra_queries,
                                             condition_query))
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
