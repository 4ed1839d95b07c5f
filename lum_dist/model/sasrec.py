"""SASRec (Kang & McAuley, ICDM 2018): the classic sequential baseline every LUM result is printed beside.

The standard model, as in the authors' code and its PyTorch port (pmixer/SASRec.pytorch): item tokens
only, learned absolute positions, embeddings scaled by sqrt(d), dropout on the embeddings, on the attention
probabilities and in the point-wise feed-forward; each block normalises the attention query (``q = LN(x);
x = q + MHA(q, x, x)``), then ``x = LN(x); x = x + FFN(x)``; a final LayerNorm; scores are dot products
with the same item table the input reads. Trained like LUM, through the same trainer and data, with
full-softmax cross-entropy (``loss.negatives=full, similarity=dot, temperature=1``).

It reads the same packed batches as LUM (:mod:`lum_dist.data.batch`) and ignores the condition tokens:
the state that predicts the item of condition token ``t`` is the output at the last item token before
``t`` in the same sequence, so training targets, evaluation queries and group queries line up with
LUM's. A sequence's first condition token has no item before it and predicts nothing
(:meth:`SASRecModel.can_predict`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lum_dist.config import ConfigError
from lum_dist.data.batch import ITEM_TOKEN, PackedBatch
from lum_dist.data.schema import PAD_ID
from lum_dist.ops.attention import BACKENDS, varlen_attention


class SASRecConfig(PretrainedConfig):
    model_type = "sasrec"

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 1,
        num_items: int = 16,  # item vocabulary incl. the reserved ids
        max_position: int = 50,  # items per sequence (learned positions)
        dropout: float = 0.5,
        attn_backend: str = "auto",
        **kwargs,
    ):
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.num_items, self.max_position, self.dropout = num_items, max_position, dropout
        self.attn_backend = attn_backend
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ConfigError(f"SASRecConfig: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"SASRecConfig: dropout {dropout} must be in [0, 1)")
        if attn_backend not in ("auto", *BACKENDS):
            raise ConfigError(f"SASRecConfig: attn_backend {attn_backend!r} is not one of {('auto', *BACKENDS)}")

    @property
    def item_emb_dim(self) -> int:
        """Width of the user state and of the item table (what export and query write)."""
        return self.hidden_size

    ARCH_KEYS = frozenset({"hidden_size", "num_layers", "num_heads", "max_position", "dropout", "attn_backend"})

    @classmethod
    def for_dataset(cls, num_items: int, cond_vocab_sizes: list[int], num_numeric: int = 0,
                    item_attr_vocab_sizes: list[int] | None = None, *, num_item_tags: int = 0,
                    max_item_tags: int = 0, **arch) -> SASRecConfig:
        """Item ids only: the dataset's condition fields, item attributes, tags and numeric features are not
        read."""
        return cls(num_items=num_items, **arch)

    def matmul_params(self) -> int:
        """Weights of every matrix multiply per token: q, k, v, o and the two feed-forward layers."""
        return self.num_layers * 6 * self.hidden_size**2

    def train_flops(self, seq_lens: np.ndarray) -> float:
        """Training FLOPs of a packed batch (see LUMConfig.train_flops): SASRec runs on the item tokens only,
        half of each sequence."""
        items = np.asarray(seq_lens, dtype=np.float64) // 2
        pairs = float((items * (items + 1) / 2).sum())
        return 6.0 * self.matmul_params() * float(items.sum()) + 12.0 * self.num_layers * self.hidden_size * pairs

    def param_counts(self) -> dict[str, int]:
        h = self.hidden_size
        dense = self.matmul_params() + self.num_layers * (6 * h + 4 * h) + 2 * h  # biases, 2 LayerNorms/block, final
        embedding = (self.num_items + self.max_position) * h
        return {"dense": dense, "embedding": embedding, "total": dense + embedding}


class Attention(nn.Module):
    """Multi-head causal self-attention whose query comes from the normalised input (the SASRec block)."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.dropout, self.backend = cfg.dropout, cfg.attn_backend
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, query: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
        n = x.shape[0]
        q = self.q(query).view(n, self.num_heads, self.head_dim)
        k, v = self.kv(x).view(n, 2, self.num_heads, self.head_dim).unbind(1)
        y = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.backend,
                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.reshape(n, -1))


class FeedForward(nn.Module):
    """Point-wise two-layer ReLU network with dropout after each layer (Conv1d k=1 in the original)."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(cfg.hidden_size, eps=1e-8), Attention(cfg)
        self.ffn_norm, self.ffn = nn.LayerNorm(cfg.hidden_size, eps=1e-8), FeedForward(cfg)

    def forward(self, x, keep, cu_seqlens, max_seqlen):
        q = self.attn_norm(x)
        x = q + self.attn(q, x, cu_seqlens, max_seqlen)
        x = self.ffn_norm(x)
        return (x + self.ffn(x)) * keep  # padding stays zero, as in the original's timeline mask


class SASRecModel(PreTrainedModel):
    config_class = SASRecConfig
    base_model_prefix = "sasrec"

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        self.item_emb = nn.Embedding(config.num_items, config.hidden_size, padding_idx=PAD_ID)
        self.pos_emb = nn.Embedding(config.max_position, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-8)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Xavier-normal matrices and tables (as the reference code), zero biases and PAD row, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module.weight.numel() > 0:  # empty outside a gather under ZeRO-3 (the trainer re-runs this)
                nn.init.xavier_normal_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None and module.weight.numel() > 0:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.item_emb

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the item table (scored by dot product); ``None`` = all ``num_items`` rows."""
        if ids is None:
            ids = torch.arange(self.config.num_items, device=self.pos_emb.weight.device)
        return self.item_emb(ids)

    def forward(self, item_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Item tokens only: item_ids [N] packed by cu_seqlens -> states [N, hidden_size]."""
        seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=item_ids.device),
                                      (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=item_ids.numel())
        positions = torch.arange(item_ids.numel(), device=item_ids.device) - cu_seqlens.long()[seq]
        if item_ids.numel() and int(positions.max()) >= self.config.max_position:
            raise ValueError(f"SASRec: a sequence has {int(positions.max()) + 1} items > max_position="
                             f"{self.config.max_position}; lower data.max_seq_len or raise max_position")
        keep = (item_ids != PAD_ID).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.item_emb(item_ids) * math.sqrt(self.config.hidden_size) + self.pos_emb(positions)
        x = self.dropout(x) * keep
        for block in self.blocks:
            x = block(x, keep, cu_seqlens, max_seqlen)
        return self.norm(x)

    def forward_batch(self, batch: PackedBatch) -> torch.Tensor:
        """[T, hidden]: at every token, the state after the last item token at or before it in its sequence
        (zeros before a sequence's first item)."""
        prev, has_prev, is_item = _previous_item(batch)
        item_seq = batch.seq_index()[is_item]
        counts = torch.bincount(item_seq, minlength=batch.num_sequences)
        cu_items = torch.zeros(batch.num_sequences + 1, dtype=torch.int32, device=counts.device)
        cu_items[1:] = counts.cumsum(0)
        states = self(batch.item_ids[is_item], cu_items, max(1, int(counts.max())) if counts.numel() else 1)
        if states.numel() == 0:
            return states.new_zeros(batch.num_tokens, self.config.hidden_size)
        return states[prev.clamp(min=0)] * has_prev.unsqueeze(-1)

    def can_predict(self, batch: PackedBatch) -> torch.Tensor:
        """bool [T]: tokens with an item before them in their sequence (a state to predict from)."""
        return _previous_item(batch)[1]


def _previous_item(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index among item tokens of the last item token at or before each token, whether it is in the same
    sequence, the item-token mask)."""
    is_item = batch.token_type == ITEM_TOKEN
    prev = is_item.long().cumsum(0) - 1  # item tokens up to and including this token, minus one
    cu = batch.cu_seqlens.long().to(prev.device)
    items_before_seq = torch.cat([prev.new_zeros(1), prev.add(1)])[cu[:-1]]  # item tokens before each sequence
    seq = batch.seq_index()
    return prev, prev >= items_before_seq[seq], is_item
