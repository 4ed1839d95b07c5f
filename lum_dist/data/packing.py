"""Packing token sequences into fixed token-budget rows, and collating them into a PackedBatch.

``best_fit_decreasing`` is the classic bin-packing heuristic: sequences longest first, each into the
row whose remaining room is the smallest that still fits (a new row if none does). The open rows are
kept in a list sorted by (room, row id) and searched with bisect, so a placement costs a binary
search plus a memmove, not a scan of every row. ``best_fit_reference`` is the plain quadratic version
the tests compare it with. ``pad_rows`` (one sequence per row) is the "pad" policy, for comparison:
``collate(..., pad=True)`` then fills each row with PAD tokens up to the budget, as a padded [B, L]
batch would, so the model really pays for the padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from lum_dist.data.batch import ITEM_TOKEN, PackedBatch
from lum_dist.data.schema import PAD_ID
from lum_dist.data.tokenize import TokenSeq


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
    room: list[int] = []
    open_rows: list[tuple[int, int]] = []  # (remaining room, row id), sorted
    for i in _decreasing(lengths).tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(open_rows, (n, -1))
        if k < len(open_rows):
            _, r = open_rows.pop(k)
        else:
            r = len(rows)
            rows.append([])
            room.append(budget)
        rows[r].append(i)
        room[r] -= n
        if room[r] > 0:
            bisect.insort(open_rows, (room[r], r))
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
