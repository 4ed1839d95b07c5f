"""Random but valid PackedBatches (see lum_dist.data.batch) for model and kernel tests."""

from __future__ import annotations

import torch

from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN, PackedBatch
from lum_dist.data.schema import NUM_SPECIAL_IDS, PAD_ID


def random_packed_batch(
    seq_lens: list[int],
    num_items: int,
    cond_vocab_sizes: list[int],
    num_queries: list[int] | None = None,
    seed: int = 0,
    num_numeric: int = 0,
    num_time_buckets: int = 32,
) -> PackedBatch:
    """One packed row of sequences of the given total lengths (history + trailing queries).

    History tokens alternate <condition, item> from a condition token; the output at a condition
    token followed by its item targets that item. The ``num_queries[s]`` trailing tokens are
    condition tokens sharing position L (the history length) with target 0.
    """
    num_queries = list(num_queries) if num_queries is not None else [0] * len(seq_lens)
    if len(num_queries) != len(seq_lens) or any(q > n or q < 0 for q, n in zip(num_queries, seq_lens, strict=True)):
        raise ValueError(f"random_packed_batch: bad num_queries {num_queries} for seq_lens {seq_lens}")
    if any(n < 1 for n in seq_lens):
        raise ValueError(f"random_packed_batch: every sequence needs a token, got {seq_lens}")
    g = torch.Generator().manual_seed(seed)
    token_type, positions = [], []
    for n, q in zip(seq_lens, num_queries, strict=True):
        hist = n - q
        token_type += [i % 2 for i in range(hist)] + [COND_TOKEN] * q
        positions += list(range(hist)) + [hist] * q
    token_type = torch.tensor(token_type, dtype=torch.long)
    total = token_type.numel()
    is_item = token_type == ITEM_TOKEN
    items = torch.randint(NUM_SPECIAL_IDS, num_items, (total,), generator=g)
    item_ids = torch.where(is_item, items, PAD_ID)
    cond_ids = torch.stack([torch.randint(NUM_SPECIAL_IDS - 1, v, (total,), generator=g) for v in cond_vocab_sizes], 1)
    cond_ids = torch.where(is_item[:, None], PAD_ID, cond_ids)
    # A condition token targets the item right after it, when that item belongs to the same behaviour.
    next_is_item = torch.zeros(total, dtype=torch.bool)
    next_is_item[:-1] = is_item[1:] & (token_type[:-1] == COND_TOKEN)
    targets = torch.zeros(total, dtype=torch.long)
    targets[:-1] = torch.where(next_is_item[:-1], item_ids[1:], 0)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
    return PackedBatch(
        item_ids=item_ids,
        cond_ids=cond_ids,
        token_type=token_type,
        positions=torch.tensor(positions, dtype=torch.long),
        time_gaps=torch.randint(0, num_time_buckets, (total,), generator=g),
        targets=targets,
        cu_seqlens=cu,
        max_seqlen=max(seq_lens),
        num_queries=torch.tensor(num_queries, dtype=torch.int32),
        row_splits=torch.tensor([0, len(seq_lens)], dtype=torch.int32),
        token_budget=total,
        user_ids=[f"u{i}" for i in range(len(seq_lens))],
        numeric=torch.randn(total, num_numeric, generator=g) if num_numeric else None,
        max_queries=max(num_queries),
    )
