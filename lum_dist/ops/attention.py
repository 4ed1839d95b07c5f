"""Variable-length (packed) attention: one dispatcher, several backends, one plain reference.

Sequences lie end to end on the token axis (``q, k, v: [T, H, D]``, ``cu_seqlens: int32 [S + 1]``
with a leading 0, see :mod:`lum_dist.data.batch`); a token attends only within its own sequence,
and with ``causal=True`` only to itself and earlier tokens.

Backends (``available_backends(device)`` lists those usable here):

* ``flash``        ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16; if installed)
* ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; FlashAttention in torch)
* ``flex``         FlexAttention with a document-causal BlockMask built for this call (CUDA)
* ``sdpa``         SDPA on right-padded sequences, one call per length bucket (lengths within 2x):
                   fused kernels, no mask for causal attention, work ~ sum of L^2; any device, the CPU
                   training path
* ``reference``    a plain per-sequence loop in float32, the ground truth for tests

``auto`` picks flash > torch_varlen > flex on CUDA (half precision), sdpa elsewhere; with attention
dropout, flash (CUDA, half precision) or sdpa.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "torch_varlen", "flex", "sdpa", "reference")


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that run (forward and backward) on ``device``, in ``auto``'s order of preference."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if _has_flash_attn():
            out.append("flash")
        if _has_torch_varlen():
            out.append("torch_varlen")
        out.append("flex")
    return out + ["sdpa", "reference"]


def _auto_backend(q: torch.Tensor, dropout_p: float = 0.0) -> str:
    if dropout_p:  # attention dropout (small-data training): the backends that have it
        return "flash" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_flash_attn() else "sdpa"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return available_backends(q.device)[0]
    if q.is_cuda:
        return "flex"  # the flash kernels take half precision only
    return "sdpa"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    backend: str = "auto",
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention within each packed sequence. q, k, v: [T, H, D] -> [T, H, D].

    ``dropout_p`` drops attention probabilities (training only: pass 0 in eval); ``flash``, ``sdpa`` and
    ``reference`` support it, the others raise."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"varlen_attention: q, k, v must share one [T, H, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"varlen_attention: cu_seqlens must be [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}")
    backend = _auto_backend(q, dropout_p) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"varlen_attention: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if dropout_p and backend not in _DROPOUT_BACKENDS:
        raise ValueError(f"varlen_attention: backend {backend!r} has no attention dropout; use one of {_DROPOUT_BACKENDS}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _IMPLS[backend](q, k, v, cu, int(max_seqlen), causal, scale, dropout_p)


def _reference(q, k, v, cu, max_seqlen, causal, scale, dropout_p=0.0):
    """Each sequence alone: dense scores, explicit causal mask, softmax in float32."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[start:end].float().transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            n = end - start
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = F.dropout(scores.softmax(-1), dropout_p) if dropout_p else scores.softmax(-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


def document_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [T]: the sequence index of every token."""
    lens = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)


def block_causal_mask(cu: torch.Tensor, total: int, causal: bool = True) -> torch.Tensor:
    """bool [T, T]: True where query i may attend key j (same sequence, and j <= i if causal)."""
    doc = document_ids(cu, total)
    mask = doc[:, None] == doc[None, :]
    if causal:
        idx = torch.arange(total, device=cu.device)
        mask &= idx[None, :] <= idx[:, None]
    return mask


def length_buckets(seq_lens: list[int]) -> list[list[int]]:
    """Indices of the non-empty sequences grouped by ceil(log2(length)): padding a group to its longest
    member at most doubles its tokens (sorted within a group, groups by increasing length)."""
    groups: dict[int, list[int]] = {}
    for s in sorted(range(len(seq_lens)), key=seq_lens.__getitem__):
        if seq_lens[s] > 0:
            groups.setdefault((seq_lens[s] - 1).bit_length(), []).append(s)
    return [groups[b] for b in sorted(groups)]


def _pad(x: torch.Tensor, src: torch.Tensor, slots: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """Tokens ``x[src]`` into the ``slots`` of a zero [rows, length] grid -> [rows, H, length, D]."""
    grid = x.new_zeros(rows * length, *x.shape[1:]).index_copy(0, slots, x[src])
    return grid.view(rows, length, *x.shape[1:]).transpose(1, 2)


def _sdpa(q, k, v, cu, max_seqlen, causal, scale, dropout_p=0.0):
    """One SDPA call per length bucket on right-padded [G, H, L, D] sequences. Causal attention needs no
    mask (a real token only sees earlier, real keys), so SDPA runs its fused kernels (flash on the CPU too);
    non-causal attention masks the padded keys. Work ~ sum of L^2, not (packed tokens)^2."""
    bounds = cu.tolist()
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    heads, dim = q.shape[1:]
    outs, srcs = [], []  # per bucket: outputs of its real tokens, and their packed token indices
    for group in length_buckets(lens):
        longest = max(lens[s] for s in group)
        glens = torch.tensor([lens[s] for s in group], device=q.device)
        starts = torch.tensor([bounds[s] for s in group], device=q.device)
        col = torch.arange(longest, device=q.device)
        real = col[None, :] < glens[:, None]  # [G, L]
        src = (starts[:, None] + col[None, :])[real]  # token index of every real slot, row-major
        slots = real.reshape(-1).nonzero().squeeze(1)

        qp, kp, vp = (_pad(x, src, slots, len(group), longest) for x in (q, k, v))
        mask = None if causal else real[:, None, None, :]
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale,
                                           dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(-1, heads, dim)[slots])
        srcs.append(src)
    if not outs:
        return torch.zeros_like(q)
    out = torch.cat(outs)  # every token once, in bucket order: scatter back to the packed order
    return out.new_empty(out.shape).index_copy(0, torch.cat(srcs), out)


def _flash(q, k, v, cu, max_seqlen, causal, scale, dropout_p=0.0):
    from flash_attn import flash_attn_varlen_func

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # q, k, v are views of one fused qkv projection
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal,
                                  dropout_p=dropout_p)


def _torch_varlen(q, k, v, cu, max_seqlen, causal, scale, dropout_p=0.0):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.10
        kwargs = {"window_size": (-1, 0) if causal else (-1, -1), "scale": scale}
    else:  # torch 2.9: is_causal, default scale only
        if not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
            raise ValueError("torch_varlen on this torch version supports only the default softmax_scale")
        kwargs = {"is_causal": causal}
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, cu, max_seqlen, causal, scale, dropout_p=0.0):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    doc = document_ids(cu, total)

    def mask_mod(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        return same & (ki <= qi) if causal else same

    # The mask depends on this call's cu_seqlens, so it is built per call and never cached.
    # Compiled on CUDA: the eager builder materialises the dense [T, T] mask first.
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device, _compile=q.is_cuda)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    attn = _compiled_flex() if q.is_cuda else flex_attention
    out = attn(qh, kh, vh, block_mask=block_mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


_DROPOUT_BACKENDS = ("flash", "sdpa", "reference")
_IMPLS = {"flash": _flash, "torch_varlen": _torch_varlen, "flex": _flex, "sdpa": _sdpa, "reference": _reference}
