"""The LUM model (arXiv 2502.08309): token encoder + causal user encoder over packed sequences.

Reads top to bottom: token encoder, rotary positions, attention, MLP, block, model. It knows nothing
about DeepSpeed or process groups; the trainer shards it from outside.

* Token encoder: every token is ``concat[item vector, one emb per condition field, time-gap bucket emb,
  numeric features] -> Linear -> hidden`` plus a token-type embedding. An item's vector is its id embedding,
  plus the mean id embedding of the items it co-occurs with most in training with ``item_neighbours`` (item-based
  CF as a feature), plus the mean of its tags' embeddings with ``item_tags`` (all its genres or attributes).
  Item tokens carry PAD_ID in the condition slots and condition tokens PAD_ID in the item slot; PAD rows are
  zero (and get no gradient), so a condition token's item part and an item token's condition part are zero.
* User encoder: pre-norm decoder blocks (RMSNorm, rotary positions from ``positions``, SwiGLU MLP),
  a final RMSNorm and ``Linear(hidden -> item_emb_dim)``. Dropout (0 in the large presets, as in LLM
  pretraining; small datasets need it) acts on the token features, the attention probabilities and each
  residual branch, each with its own rate.
* Options for the newest behaviour: ``previous_item_slot`` (the previous item as the predicting condition token's
  own input) and ``previous_item_skip`` (``W dropout(v)`` of the previous item's scored vector added to that
  token's output, SASRec's residual path); ``item_id_dropout`` hides a share of item ids in training, and
  ``target_id_dropout`` a share of the scored items' ids.
* The output lives in the item embedding space: InfoNCE compares it with the SAME item vectors that item
  tokens read (see :class:`LUMConfig`). With ``attribute_targets`` an item's row also adds an embedding of
  each of its attributes (e.g. its category): most items are seen a handful of times, and an attribute shared
  by hundreds of items learns from all of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from lum_dist.data.batch import COND_TOKEN, ITEM_TOKEN, PackedBatch
from lum_dist.data.schema import PAD_ID
from lum_dist.model.config import NUM_COUNT_BUCKETS, LUMConfig
from lum_dist.ops.attention import varlen_attention
from lum_dist.ops.group_query import (
    GroupQueryPlan,
    build_group_query_plan,
    group_query_attention_plan,
    read_group_layout,
)


def popularity_bucket(counts: torch.Tensor) -> torch.Tensor:
    """The neighbour gate's bucket of each item: floor(log2(1 + training count)), the last of NUM_COUNT_BUCKETS open
    (doubling counts: the gate's weight is learnt per order of magnitude)."""
    return torch.log2(1 + counts.double()).floor().long().clamp(max=NUM_COUNT_BUCKETS - 1)


def bag_mean(table: nn.Embedding, bags: torch.Tensor) -> torch.Tensor:
    """The mean embedding of each PAD-padded bag of ids ``[..., n]`` (zero for an empty bag; PAD rows are zero)."""
    count = (bags != PAD_ID).sum(-1, keepdim=True).clamp(min=1)
    return table(bags).sum(-2) / count


class TokenEncoder(nn.Module):
    def __init__(self, cfg: LUMConfig):
        super().__init__()
        self.num_time_buckets, self.num_numeric = cfg.num_time_buckets, cfg.num_numeric
        self.item_emb = nn.Embedding(cfg.num_items, cfg.item_emb_dim, padding_idx=PAD_ID)
        self.cond_embs = nn.ModuleList(
            nn.Embedding(v, cfg.cond_emb_dim, padding_idx=PAD_ID) for v in cfg.cond_vocab_sizes
        )
        self.time_emb = nn.Embedding(cfg.num_time_buckets, cfg.cond_emb_dim)
        self.type_emb = nn.Embedding(2, cfg.hidden_size)
        self.proj = nn.Linear(cfg.token_feature_dim, cfg.hidden_size)
        self.proj.reads_token_features = True  # its fan-in does not grow with width (parallel.param_groups)
        self.tag_emb = nn.Embedding(cfg.num_item_tags, cfg.item_emb_dim, padding_idx=PAD_ID) if cfg.item_tags else None
        # Each item's tag ids, PAD-padded. The dataset is their source of truth (set_item_tags): not saved.
        self.register_buffer("item_tags", torch.zeros(cfg.num_items, cfg.max_item_tags if cfg.item_tags else 0,
                                                      dtype=torch.long), persistent=False)
        # Each item's co-occurrence neighbours, PAD-padded; from the dataset too (set_item_neighbours): not saved.
        self.register_buffer("item_nbrs", torch.zeros(cfg.num_items, cfg.item_neighbours, dtype=torch.long),
                             persistent=False)
        # neighbour_gate: one learned weight per popularity bucket (1 at init), and each item's bucket.
        gated = bool(cfg.item_neighbours and cfg.neighbour_gate)
        self.neighbour_gate = nn.Embedding(NUM_COUNT_BUCKETS, 1) if gated else None
        if gated:
            self.neighbour_gate.ones_init = True
        self.register_buffer("item_count_bucket", torch.zeros(cfg.num_items if gated else 0, dtype=torch.long),
                             persistent=False)

    def item_vectors(self, ids: torch.Tensor, id_dropout: float = 0.0) -> torch.Tensor:
        """Items ``ids`` as the model sees them: the id embedding, plus the mean id embedding of the item's
        co-occurrence neighbours with ``item_neighbours`` (times its popularity bucket's gate with ``neighbour_gate``),
        plus the mean of the tags' embeddings with ``item_tags`` (PAD ids, e.g. a condition token's item slot, have
        no neighbours or tags: their vector stays zero).
        ``id_dropout``: that share of the rows, drawn at random, without their id embedding."""
        emb = self.item_emb(ids)
        if id_dropout > 0:
            emb = emb * (torch.rand(ids.shape, device=ids.device) >= id_dropout).unsqueeze(-1).to(emb.dtype)
        if self.item_nbrs.shape[-1]:
            nbrs = bag_mean(self.item_emb, self.item_nbrs[ids])
            if self.neighbour_gate is not None:
                nbrs = nbrs * self.neighbour_gate(self.item_count_bucket[ids])
            emb = emb + nbrs
        if self.tag_emb is not None:
            emb = emb + bag_mean(self.tag_emb, self.item_tags[ids])
        return emb

    def forward(self, item_ids, cond_ids, token_type, time_gaps, numeric=None) -> torch.Tensor:
        parts = [self.item_vectors(item_ids)]
        parts += [emb(cond_ids[:, f]) for f, emb in enumerate(self.cond_embs)]
        parts.append(self.time_emb(time_gaps.clamp(0, self.num_time_buckets - 1)))
        width = 0 if numeric is None else numeric.shape[-1]
        if width != self.num_numeric:
            raise ValueError(f"LUMModel: batch has {width} numeric features, config.num_numeric = {self.num_numeric}")
        if numeric is not None:
            parts.append(numeric.to(parts[0].dtype))
        return self.proj(torch.cat(parts, dim=-1)) + self.type_emb(token_type)


def previous_items(item_ids: torch.Tensor, token_type: torch.Tensor, positions: torch.Tensor,
                   cu_seqlens: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """``item_ids`` with each condition token's item slot holding the item at position p - 1 of its sequence:
    the user's previous behaviour (for group queries, which all sit at position L, the history's last item).
    Condition tokens with no item token before them, and every other token, keep their ids; so does a
    ``dropout`` share of the rest, drawn at random (training: the model must also predict without the slot)."""
    t = torch.arange(item_ids.shape[0], device=item_ids.device)
    cu = cu_seqlens.long()
    start = cu[(torch.searchsorted(cu, t, right=True) - 1).clamp(0, cu.numel() - 1)]
    prev = (start + positions - 1).clamp(0, item_ids.shape[0] - 1)
    use = (token_type == COND_TOKEN) & (positions > 0) & (token_type[prev] == ITEM_TOKEN)
    if dropout > 0:
        use &= torch.rand(use.shape, device=use.device) >= dropout
    return torch.where(use, item_ids[prev], item_ids)


def drop_item_ids(item_ids: torch.Tensor, token_type: torch.Tensor, p: float) -> torch.Tensor:
    """``item_ids`` with a ``p`` share of the item tokens, drawn at random, reading PAD: such a token still says
    that the user acted, and on what attributes (its condition fields), but not on which item."""
    drop = (token_type == ITEM_TOKEN) & (torch.rand(item_ids.shape, device=item_ids.device) < p)
    return item_ids.masked_fill(drop, PAD_ID)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, head_dim / 2] for each token's position (computed per call: no buffers to shard)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (GPT-NeoX / Llama layout); x: [T, H, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LUMConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = cfg.num_heads, cfg.head_dim, cfg.attn_backend
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.out.is_residual_out = True

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, plan: GroupQueryPlan | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if plan is not None:
            y = group_query_attention_plan(q, k, v, plan)
        else:
            y = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.backend,
                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.reshape(x.shape))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LUMConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(GradientCheckpointingLayer):
    """Pre-norm decoder block; checkpointed as a unit by ``enable_activation_checkpointing``."""

    def __init__(self, cfg: LUMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.residual_dropout)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, plan: GroupQueryPlan | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, plan))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class LUMModel(PreTrainedModel):
    config_class = LUMConfig
    base_model_prefix = "lum"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: LUMConfig):
        super().__init__(config)
        self.tokens = TokenEncoder(config)
        self.dropout = nn.Dropout(config.feature_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.item_emb_dim, bias=False)
        self.attr_targets = nn.ModuleList(
            nn.Embedding(v, config.item_emb_dim, padding_idx=PAD_ID) for v in config.item_attr_vocab_sizes
        ) if config.attribute_targets else nn.ModuleList()
        self.previous_item_skip = nn.Linear(config.item_emb_dim, config.item_emb_dim, bias=False) \
            if config.previous_item_skip else None
        if self.previous_item_skip is not None:
            self.previous_item_skip.zero_init = True  # the model starts as it would without it
        # Each item's attribute ids. The dataset is their source of truth (set_item_attributes), so they are not
        # saved with the weights.
        self.register_buffer("item_attrs", torch.zeros(config.num_items, len(self.attr_targets), dtype=torch.long),
                             persistent=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) matrices and tables, zero biases and PAD rows, unit norms.

        With ``scaled_init`` the projections that write into the residual stream (attention output, MLP
        down) start ``sqrt(2 * num_layers)`` smaller (GPT-2), so the stream's variance at init does not
        grow with depth; modules marked ``zero_init`` (the previous-item skip) start at zero. Called per module
        (also by the trainer under ZeRO-3 with the module's parameters gathered); modules that are not ours
        (e.g. the loss) are left alone.
        """
        std = self.config.initializer_range
        if getattr(module, "zero_init", False):
            std = 0.0
        if isinstance(module, nn.Linear):
            if self.config.scaled_init and getattr(module, "is_residual_out", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and getattr(module, "ones_init", False):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            # Under ZeRO-3 a parameter outside a gather is empty: the trainer re-runs this gathered.
            if module.padding_idx is not None and module.weight.numel() > 0:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tokens.item_emb

    def set_item_attributes(self, item_attrs: torch.Tensor) -> None:
        """Each item's attribute ids, ``[num_items, len(item_attr_vocab_sizes)]`` (``attribute_targets``)."""
        if item_attrs.shape != self.item_attrs.shape:
            raise ValueError(f"LUMModel: item attributes of shape {tuple(item_attrs.shape)}, the model expects "
                             f"{tuple(self.item_attrs.shape)} (num_items x item-attribute fields)")
        self.item_attrs.copy_(item_attrs)

    def set_item_tags(self, item_tags: torch.Tensor) -> None:
        """Each item's tag ids, ``[num_items, max_item_tags]``, PAD-padded (``item_tags``)."""
        if item_tags.shape != self.tokens.item_tags.shape:
            raise ValueError(f"LUMModel: item tags of shape {tuple(item_tags.shape)}, the model expects "
                             f"{tuple(self.tokens.item_tags.shape)} (num_items x max_item_tags)")
        self.tokens.item_tags.copy_(item_tags)

    def set_item_neighbours(self, item_nbrs: torch.Tensor, item_counts: torch.Tensor | None = None) -> None:
        """Each item's co-occurrence neighbours, ``[num_items, item_neighbours]``, PAD-padded, and training count
        (``[num_items]``; ``neighbour_gate`` weighs the neighbours by its :func:`popularity_bucket`)."""
        if item_nbrs.shape != self.tokens.item_nbrs.shape:
            raise ValueError(f"LUMModel: item neighbours of shape {tuple(item_nbrs.shape)}, the model expects "
                             f"{tuple(self.tokens.item_nbrs.shape)} (num_items x item_neighbours)")
        self.tokens.item_nbrs.copy_(item_nbrs)
        if self.tokens.neighbour_gate is not None:
            if item_counts is None or item_counts.shape != self.tokens.item_count_bucket.shape:
                raise ValueError("LUMModel: neighbour_gate needs each item's training count, [num_items]")
            self.tokens.item_count_bucket.copy_(popularity_bucket(item_counts))

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The InfoNCE targets and scoring rows of items ``ids`` (``None`` = all ``num_items``): the item vectors
        that item tokens read (:meth:`TokenEncoder.item_vectors`), plus each item's attribute
        embeddings with ``attribute_targets``.

        In training the full table (``ids`` None, the full softmax's) hides the ids of a ``target_id_dropout``
        share of its rows. Always calls the modules, so under ZeRO-3 the tables are gathered (``.weight`` is a
        placeholder).
        """
        id_dropout = self.config.target_id_dropout if self.training and ids is None else 0.0
        if ids is None:
            ids = torch.arange(self.config.num_items, device=self.item_attrs.device)
        emb = self.tokens.item_vectors(ids, id_dropout)
        attrs = self.item_attrs[ids]
        for f, table in enumerate(self.attr_targets):
            emb = emb + table(attrs[:, f])
        return emb

    def forward(
        self,
        item_ids: torch.Tensor,
        cond_ids: torch.Tensor,
        token_type: torch.Tensor,
        positions: torch.Tensor,
        time_gaps: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        num_queries: torch.Tensor | None = None,
        numeric: torch.Tensor | None = None,
        return_skip: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """[T, item_emb_dim]: the user representation after every token. ``return_skip``: also the previous-item
        skip's share of it (None without the skip), for a loss that scores the representation without it."""
        if self.config.previous_item_slot or self.previous_item_skip is not None:
            # One draw of previous_item_dropout: a condition token loses slot and skip together.
            dropout = self.config.previous_item_dropout if self.training else 0.0
            before = previous_items(item_ids, token_type, positions, cu_seqlens, dropout)
            if self.config.previous_item_slot:
                item_ids = before
        if self.training and self.config.item_id_dropout > 0:
            item_ids = drop_item_ids(item_ids, token_type, self.config.item_id_dropout)
        x = self.dropout(self.tokens(item_ids, cond_ids, token_type, time_gaps, numeric))
        cos, sin = rotary(positions, self.config.head_dim, self.config.rope_theta)
        # Group queries: the layout is read (one host sync) and the plan built once here, not in every layer.
        # One query token per sequence is exactly causal attention: no plan.
        plan = None
        if num_queries is not None:
            layout = read_group_layout(cu_seqlens, num_queries, max_seqlen, num_tokens=x.shape[0])
            if not layout.causal:
                needs_grad = torch.is_grad_enabled() and x.requires_grad
                plan = build_group_query_plan(layout, x.device, needs_grad=needs_grad, dtype=x.dtype,
                                              head_dim=self.config.head_dim)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens, max_seqlen, plan)
        out, skip = self.head(self.norm(x)), None
        if self.previous_item_skip is not None:
            last_item = torch.where(token_type == COND_TOKEN, before, PAD_ID)  # PAD (zero vector): item tokens
            skip = self.previous_item_skip(self.dropout(self.item_embeddings(last_item)))
            out = out + skip
        return (out, skip) if return_skip else out

    def can_predict(self, batch: PackedBatch) -> torch.Tensor:
        """bool [T]: every token's output is a prediction (the condition token carries what it needs)."""
        return torch.ones_like(batch.targets, dtype=torch.bool)

    def forward_batch(self, batch: PackedBatch,
                      return_skip: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        # Training and evaluation batches (at most one query per sequence) skip the group-query layout read.
        num_queries = batch.num_queries if batch.max_queries > 1 else None
        return self(
            batch.item_ids, batch.cond_ids, batch.token_type, batch.positions, batch.time_gaps,
            batch.cu_seqlens, batch.max_seqlen, num_queries, batch.numeric, return_skip,
        )
