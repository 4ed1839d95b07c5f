"""The one packed-batch layout every stage reads: pretraining, evaluation, group query.

Sequences (one per user, or per window of a long user) are laid end to end on a single token axis,
jagged-tensor style: values are ``[T, ...]`` and ``cu_seqlens`` (int32, ``[S + 1]``, leading 0) marks
where each sequence starts. Attention never crosses a boundary and ``positions`` restart at 0 at
every sequence. ``row_splits`` groups sequences into the fixed token-budget rows they were packed
into (``[R + 1]`` indices into the sequence axis); it only matters for utilisation and for backends
that want fixed shapes. The "pad" policy (the classic padded ``[B, L]`` batch, a baseline) really pads:
each row's sequence is followed by PAD tokens up to the budget (item tokens with target 0 after the
real ones, so causal attention keeps them out of every real output), counted in ``num_pad_tokens``.

Token layout of one sequence: each behaviour is two tokens ``<condition, item>``::

    tokens    c_0  i_0  c_1  i_1 ... c_{n-1} i_{n-1}  [q_0 ... q_{Q-1}]
    type       0    1    0    1        0       1        0 ...  0
    targets   i_0   0   i_1   0      i_{n-1}   0       (eval / query targets or 0)

The output at a condition token predicts the item of the same behaviour (it has seen the history
and the condition), so ``targets`` holds that item's id at condition tokens and 0 (no loss)
elsewhere. Evaluation appends one query condition token (``num_queries = 1``); group query appends
``Q`` of them, which see the history and themselves but never each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from lum_dist.data.schema import PAD_ID

COND_TOKEN = 0
ITEM_TOKEN = 1


@dataclass
class PackedBatch:
    item_ids: torch.Tensor  # int64 [T]; PAD_ID on condition tokens
    cond_ids: torch.Tensor  # int64 [T, F]; PAD_ID on item tokens
    token_type: torch.Tensor  # int64 [T]; COND_TOKEN or ITEM_TOKEN
    positions: torch.Tensor  # int64 [T]; index within the sequence (group queries share position L)
    time_gaps: torch.Tensor  # int64 [T]; bucketed log2 seconds since the previous behaviour, 0 = unknown
    targets: torch.Tensor  # int64 [T]; item id to predict at this token, 0 = no loss
    cu_seqlens: torch.Tensor  # int32 [S + 1]
    max_seqlen: int
    num_queries: torch.Tensor  # int32 [S]; trailing group-query tokens per sequence (0 in pretraining)
    row_splits: torch.Tensor  # int32 [R + 1]; sequence index range of each packed row
    token_budget: int  # tokens per row the packer filled to (rows * budget = padded size)
    user_ids: list[str]  # raw user id of every sequence
    numeric: torch.Tensor | None = None  # float32 [T, G] numeric side features, or None
    # Evaluation batches: per sequence, every item the user had before the target (CPU int64 tensors),
    # also those older than the packed history; excluded from the full ranking. None elsewhere.
    seen_items: list[torch.Tensor] | None = None
    num_pad_tokens: int = 0  # trailing PAD tokens of the "pad" policy (part of the token axis, not real)
    max_queries: int = 0  # max(num_queries), known on the host: > 1 means group queries (no device read needed)

    @property
    def num_tokens(self) -> int:
        """Tokens on the token axis (what the model computes on), padding included."""
        return int(self.item_ids.numel())

    @property
    def num_real_tokens(self) -> int:
        return self.num_tokens - self.num_pad_tokens

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    @property
    def num_rows(self) -> int:
        return int(self.row_splits.numel() - 1)

    @property
    def utilization(self) -> float:
        """Real tokens / padded size of the rows they were packed into."""
        return self.num_real_tokens / max(1, self.num_rows * self.token_budget)

    def seq_lens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def real_seq_lens(self) -> torch.Tensor:
        """Sequence lengths without the padding of the "pad" policy (PAD tokens: item tokens holding PAD_ID)."""
        lens = self.seq_lens()
        if not self.num_pad_tokens:
            return lens
        is_pad = (self.token_type == ITEM_TOKEN) & (self.item_ids == PAD_ID)
        return lens - torch.bincount(self.seq_index()[is_pad], minlength=self.num_sequences).to(lens.dtype)

    def query_index(self) -> torch.Tensor:
        """int64 [sum(num_queries)]: the query tokens, the last ``num_queries[s]`` of each sequence in order (one
        per sequence in evaluation batches, where it is the last token)."""
        ends = self.cu_seqlens[1:].long()
        nq = self.num_queries.long().to(ends.device)
        first = torch.repeat_interleave(ends - nq, nq)
        offset = torch.arange(first.numel(), device=ends.device) - torch.repeat_interleave(torch.cumsum(nq, 0) - nq, nq)
        return first + offset

    def seq_index(self) -> torch.Tensor:
        """int64 [T]: which sequence each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_sequences), self.seq_lens().long().cpu()).to(
            self.item_ids.device
        )

    def items_before(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, item) pairs, sorted by k: ``item`` is on an item token of the same sequence before ``tokens[k]`` and
        is not ``targets[tokens[k]]`` (a repeated item stays a positive); an item the user had twice is listed
        twice. What the user had already had, as far as this packed sequence shows, for the loss to leave out of
        the candidates as evaluation does.

        Sequences are contiguous, so a token's pairs are the item tokens from its sequence's start up to it:
        O(sum of history lengths) memory, never [targets x tokens]. (4 sequences of 4,096 tokens: 8.4M pairs.)"""
        tokens = tokens.long()
        is_item = (self.token_type == ITEM_TOKEN) & (self.item_ids != PAD_ID)
        item_tokens = is_item.nonzero().squeeze(1)
        items_before = torch.cumsum(is_item, 0) - is_item.long()  # item tokens strictly before each token
        starts = self.cu_seqlens.long().to(tokens.device)[self.seq_index()[tokens]]
        lo, hi = items_before[starts], items_before[tokens]
        lens = hi - lo
        k = torch.repeat_interleave(torch.arange(tokens.numel(), device=tokens.device), lens)
        offset = torch.arange(k.numel(), device=tokens.device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        item = self.item_ids[item_tokens[lo[k] + offset]]
        keep = item != self.targets[tokens][k]
        return k[keep], item[keep]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in pinned.items():
            if isinstance(v, torch.Tensor):
                pinned[k] = v.pin_memory()
        return replace(self, **pinned)
