"""Packing token sequences into fixed token-budget rows, and collating them into a PackedBatch.

``best_fit_decreasing`` is the classic bin-packing heuristic: sequences longest first, each into the
row whose remaining room is the smallest that still fits, the lowest row id among equal rooms (a new
row if none does). The open rows are kept by remaining room (a sorted list of the distinct rooms,
searched with bisect, each with a heap of its row ids), so a placement costs a binary search and a
heap operation, not a scan of every row; and sequences of equal length are placed a row at a time
(the row that fits the first one best takes as many as fit: it stays the best fit for the next). ``best_fit_reference`` is the plain quadratic version the
tests compare it with. ``pad_rows`` (one sequence per row) is the "pad" policy, for comparison:
``collate(..., pad=True)`` then fills each row with PAD tokens up to the budget, as a padded [B, L]
batch would, so the model really pays for the padding.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np
import torch

from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN, PackedBatch
from lum_dist.data.schema import PAD_ID
from lum_dist.data.tokenize import TokenBlock, TokenSeq, segment_arange


def _check_lengths(lengths: np.ndarray, budget: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    bad = np.flatnonzero((lengths > budget) | (lengths <= 0))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"sequence {i} has length {int(lengths[i])}: must be in [1, budget={budget}]")
    return lengths


def _decreasing(lengths: np.ndarray) -> np.ndarray:
    """Indices by decreasing length, ties by index (stable), so packing is deterministic."""
    return np.argsort(-lengths, kind="stable")


def best_fit_decreasing(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Rows (lists of sequence indices, longest first) of total length <= budget; every index once."""
    lengths = _check_lengths(lengths, budget)
    rows: list[list[int]] = []
    rooms: list[int] = []  # distinct remaining rooms of the open rows, sorted
    open_rows: dict[int, list[int]] = {}  # room -> heap of the row ids with that room
    order = _decreasing(lengths)
    sizes = lengths[order]
    starts = np.flatnonzero(np.diff(sizes, prepend=-1, append=-1)).tolist()
    order_list = order.tolist()
    for a, b in zip(starts[:-1], starts[1:], strict=True):  # runs of equal length n
        n = int(sizes[a])
        while a < b:
            k = bisect.bisect_left(rooms, n)
            if k < len(rooms):  # the smallest room that fits, the lowest row id among those
                room = rooms[k]
                ids = open_rows[room]
                r = heapq.heappop(ids)
                if not ids:
                    del rooms[k], open_rows[room]
            else:
                room, r = budget, len(rows)
                rows.append([])
            # That row stays the best fit for the run's next sequences as long as they fit: its room
            # shrinks below every other room >= n. So it takes them all at once.
            take = min(b - a, room // n)
            rows[r] += order_list[a:a + take]
            a, room = a + take, room - take * n
            if room > 0:
                ids = open_rows.setdefault(room, [])
                if not ids:
                    bisect.insort(rooms, room)
                heapq.heappush(ids, r)
    return rows


def best_fit_reference(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Plain O(n * rows) best fit decreasing: the reference for ``best_fit_decreasing``."""
    lengths = _check_lengths(lengths, budget)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in _decreasing(lengths).tolist():
        n = int(lengths[i])
        fits = [(room[r], r) for r in range(len(rows)) if room[r] >= n]
        if fits:
            _, r = min(fits)
        else:
            r = len(rows)
            rows.append([])
            room.append(budget)
        rows[r].append(i)
        room[r] -= n
    return rows


def pad_rows(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """One sequence per row, in input order: the padded baseline."""
    return [[i] for i in range(len(_check_lengths(lengths, budget)))]


def pad_sequence(seq: TokenSeq, extra: int) -> TokenSeq:
    """``seq`` followed by ``extra`` PAD tokens: item tokens of id PAD_ID, target 0, positions going on.
    They come after every real token, so causal attention keeps them out of all real outputs."""
    if seq.num_queries:
        raise ValueError("pad_sequence: a sequence with query tokens must end with them; it cannot be padded")
    pad = lambda x, value: np.concatenate([x, np.full((extra, *x.shape[1:]), value, x.dtype)])  # noqa: E731
    n = len(seq)
    return TokenSeq(
        item=pad(seq.item, PAD_ID), cond=pad(seq.cond, PAD_ID), token_type=pad(seq.token_type, ITEM_TOKEN),
        positions=np.concatenate([seq.positions, np.arange(n, n + extra, dtype=seq.positions.dtype)]),
        time_gaps=pad(seq.time_gaps, 0), targets=pad(seq.targets, 0),
        numeric=None if seq.numeric is None else pad(seq.numeric, 0.0), num_queries=0, user_id=seq.user_id,
    )


def collate(seqs: Sequence[TokenSeq], rows: list[list[int]], token_budget: int, pad: bool = False) -> PackedBatch:
    """Lay the sequences of ``rows`` end to end (row order, then order within each row). ``pad``: the
    last sequence of every row is padded to fill the row (``num_pad_tokens`` counts them)."""
    order = [i for row in rows for i in row]
    if not order:
        raise ValueError("collate: no sequences")
    room = {}
    for r, row in enumerate(rows):
        used = sum(len(seqs[i]) for i in row)
        if used > token_budget:
            raise ValueError(f"collate: row {r} holds {used} tokens > token_budget={token_budget}")
        if pad and used < token_budget:
            room[row[-1]] = token_budget - used
    picked = [pad_sequence(seqs[i], room[i]) if i in room else seqs[i] for i in order]
    lens = np.array([len(s) for s in picked], dtype=np.int64)

    def cat(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(s, name) for s in picked]))

    numeric = None
    if picked[0].numeric is not None:
        numeric = torch.from_numpy(np.concatenate([s.numeric for s in picked]).astype(np.float32))
    cu = np.zeros(len(picked) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    row_splits = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=row_splits[1:])
    return PackedBatch(
        item_ids=cat("item"),
        cond_ids=cat("cond"),
        token_type=cat("token_type"),
        positions=cat("positions"),
        time_gaps=cat("time_gaps"),
        targets=cat("targets"),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lens.max()),
        num_queries=torch.tensor([s.num_queries for s in picked], dtype=torch.int32),
        row_splits=torch.from_numpy(row_splits),
        token_budget=int(token_budget),
        user_ids=[s.user_id for s in picked],
        numeric=numeric,
        seen_items=[torch.from_numpy(s.seen_items) for s in picked] if picked[0].seen_items is not None else None,
        num_pad_tokens=sum(room.values()),
        max_queries=max(s.num_queries for s in picked),
    )


def collate_blocks(rows: Sequence[tuple[TokenBlock, np.ndarray]], token_budget: int, pad: bool = False) -> PackedBatch:
    """``collate`` of training sequences held in blocks, by gathers instead of per-sequence copies: each
    row is (block, indices of its sequences in the block). Same batch as ``collate`` of those sequences
    as TokenSeq (the tests compare them)."""
    if not rows or not any(len(idx) for _, idx in rows):
        raise ValueError("collate: no sequences")
    per_row = np.array([len(idx) for _, idx in rows], dtype=np.int64)
    src, lens, user_ids = [], [], []
    k = 0
    while k < len(rows):  # consecutive rows from one block: one gather per field
        j = k
        while j < len(rows) and rows[j][0] is rows[k][0]:
            j += 1
        block, idx = rows[k][0], np.concatenate([np.asarray(i, dtype=np.int64) for _, i in rows[k:j]])
        starts, n = block.offsets[idx], block.offsets[idx + 1] - block.offsets[idx]
        src.append((block, np.repeat(starts, n) + segment_arange(n)))
        lens.append(n)
        user_ids += block.user_ids[idx].tolist()
        k = j
    lens_np = np.concatenate(lens)
    used = np.bincount(np.repeat(np.arange(len(rows)), per_row), lens_np, len(rows)).astype(np.int64)
    if (used > token_budget).any():
        r = int(np.flatnonzero(used > token_budget)[0])
        raise ValueError(f"collate: row {r} holds {int(used[r])} tokens > token_budget={token_budget}")
    extra = np.zeros(len(lens_np), dtype=np.int64)
    if pad:  # the last sequence of every row is padded to the budget
        extra[np.cumsum(per_row) - 1] = token_budget - used
    padded = lens_np + extra
    cu = np.zeros(len(padded) + 1, dtype=np.int64)
    np.cumsum(padded, out=cu[1:])
    positions = segment_arange(padded)
    real = None if not extra.any() else np.repeat(cu[:-1], lens_np) + segment_arange(lens_np)

    def gather(name: str, dtype: type) -> np.ndarray:
        parts = [getattr(b, name)[i] for b, i in src]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if real is None:
            return values.astype(dtype, copy=False)
        out = np.zeros((int(cu[-1]), *values.shape[1:]), dtype=dtype)  # PAD_ID / 0 on padding
        out[real] = values
        return out

    # training sequences alternate condition and item tokens; padding is item tokens
    alternate = np.where(segment_arange(lens_np) % 2 == 0, COND_TOKEN, ITEM_TOKEN).astype(np.int64)
    token_type = alternate if real is None else np.full(int(cu[-1]), ITEM_TOKEN, dtype=np.int64)
    if real is not None:
        token_type[real] = alternate
    numeric = None if src[0][0].numeric is None else torch.from_numpy(gather("numeric", np.float32))
    row_splits = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(per_row, out=row_splits[1:])
    return PackedBatch(
        item_ids=torch.from_numpy(gather("item", np.int64)),
        cond_ids=torch.from_numpy(gather("cond", np.int64)),
        token_type=torch.from_numpy(token_type),
        positions=torch.from_numpy(positions),
        time_gaps=torch.from_numpy(gather("time_gaps", np.int64)),
        targets=torch.from_numpy(gather("targets", np.int64)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(padded.max()),
        num_queries=torch.zeros(len(padded), dtype=torch.int32),
        row_splits=torch.from_numpy(row_splits),
        token_budget=int(token_budget),
        user_ids=user_ids,
        numeric=numeric,
        num_pad_tokens=int(extra.sum()),
    )
