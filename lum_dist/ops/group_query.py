"""Group-query attention (LUM step 2): many condition queries answered in one pass over a user's history.

Layout: sequences lie end to end on the token axis (``q, k, v: [T, H, D]``, ``cu_seqlens: int32 [S + 1]``,
see :mod:`lum_dist.data.batch`). Sequence ``s`` is ``L_s`` history tokens followed by ``Q_s =
num_queries[s]`` query tokens. History tokens attend causally among themselves; query ``j`` attends to
all ``L_s`` history tokens and to itself, never to another query; nothing crosses sequences. Query ``j``'s
output therefore equals a causal pass over ``history + [query j]`` alone (:func:`group_query_naive`).

Backends of :func:`group_query_attention`:

* ``triton``     the block-mask kernel in ``lum_dist.kernels.group_attention`` (CUDA, forward only)
* ``cascade``    history once with varlen causal attention, then the queries as non-causal attention over
                 the history K/V, merged with each query's self term by log-sum-exp
* ``reference``  plain PyTorch per sequence (causal history block + query rows over history keys and the
                 diagonal), float32, differentiable; never builds a dense mask over the whole batch
* ``naive``      the definition: one causal pass over ``history + [query j]`` per query

``auto`` is ``triton`` on CUDA when Triton imports and no gradient is needed, else ``reference``. The
kernel has no backward on purpose: training never uses group queries (pretraining has Q = 0, evaluation
Q = 1, which is plain causal attention); the reference is differentiable for anyone who needs gradients.

Work: a sequence has ``group_query_pairs(L, Q) = L(L + 1)/2 + Q(L + 1)`` (query, key) pairs, and the
forward costs ``4 * pairs * H * D`` FLOPs (QK^T and PV, 2 FLOPs per multiply-add each).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from lum_dist.ops.attention import varlen_attention

BACKENDS = ("triton", "cascade", "reference", "naive")


def group_query_pairs(L: int, Q: int) -> int:
    """(query, key) pairs computed for one sequence: causal history plus Q queries over history + self."""
    return L * (L + 1) // 2 + Q * (L + 1)


def flops(L: int, Q: int, H: int, D: int) -> int:
    """Forward FLOPs of one sequence: QK^T and PV, 2 * D each per pair and head."""
    return 4 * group_query_pairs(L, Q) * H * D


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _check(q, k, v, cu_seqlens, num_queries) -> tuple[list[int], list[int]]:
    """Validate shapes; return cu_seqlens and num_queries as Python lists."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"group_query_attention: q, k, v must share one [T, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"group_query_attention: cu_seqlens must be [S + 1] with S >= 1, got {tuple(cu_seqlens.shape)}")
    cu, nq = cu_seqlens.tolist(), num_queries.reshape(-1).tolist()
    if len(nq) != len(cu) - 1:
        raise ValueError(f"group_query_attention: num_queries has {len(nq)} entries for {len(cu) - 1} sequences")
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"group_query_attention: cu_seqlens must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}")
    for s, (a, b, n) in enumerate(zip(cu[:-1], cu[1:], nq, strict=True)):
        if not 0 <= n <= b - a:
            raise ValueError(f"group_query_attention: sequence {s} has {b - a} tokens and num_queries={n}")
    return cu, nq


def group_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_queries: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """History-causal, query-isolated attention per packed sequence. q, k, v: [T, H, D] -> [T, H, D]."""
    cu, nq = _check(q, k, v, cu_seqlens, num_queries)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _has_triton() and not _needs_grad(q, k, v) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"group_query_attention: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        if _needs_grad(q, k, v):
            raise ValueError("group_query_attention: the triton backend is forward-only; use backend='reference' for gradients")
        from lum_dist.kernels.group_attention import group_attention_fwd

        return group_attention_fwd(q, k, v, cu, nq, scale)
    return _IMPLS[backend](q, k, v, cu, nq, int(max_seqlen), scale)


def group_query_reference(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale=None, backend="reference"):
    """Plain PyTorch ground truth (float32, differentiable); same signature as group_query_attention."""
    return group_query_attention(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale, backend="reference")


def group_query_naive(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale=None, backend="naive"):
    """The definition: one causal pass per query; same signature as group_query_attention."""
    return group_query_attention(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale, backend="naive")


def group_query_cascade(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale=None, backend="cascade"):
    """History once + queries over the cached history K/V, merged by LSE; same signature as group_query_attention."""
    return group_query_attention(q, k, v, cu_seqlens, num_queries, max_seqlen, softmax_scale, backend="cascade")


def _reference(q, k, v, cu, nq, max_seqlen, scale):
    outs = []
    for a, b, n in zip(cu[:-1], cu[1:], nq, strict=True):
        L = b - a - n
        qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))  # [H, len, D]
        qh, kh, vh = qs[:, :L], ks[:, :L], vs[:, :L]
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        hist = ((qh @ kh.transpose(1, 2)) * scale).masked_fill(future, float("-inf")).softmax(-1) @ vh
        qq, kq, vq = qs[:, L:], ks[:, L:], vs[:, L:]
        # Query rows: scores over the history keys, plus the diagonal (the query's own key) as one more column.
        scores = torch.cat([qq @ kh.transpose(1, 2), (qq * kq).sum(-1, keepdim=True)], dim=-1) * scale
        p = scores.softmax(-1)
        query = p[..., :L] @ vh + p[..., L:] * vq
        outs.append(torch.cat([hist, query], dim=1).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def _causal_pass(q, k, v, scale):
    """One sequence, [n, H, D] -> [n, H, D], causal (SDPA: flash on CUDA half precision)."""
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, n, D]: the flash kernel wants 4-D
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)[0].transpose(0, 1)


def _naive(q, k, v, cu, nq, max_seqlen, scale):
    outs = []
    for a, b, n in zip(cu[:-1], cu[1:], nq, strict=True):
        h = b - n  # end of the history
        if h > a:
            outs.append(_causal_pass(q[a:h], k[a:h], v[a:h], scale))
        for j in range(h, b):
            idx = [slice(a, h), slice(j, j + 1)]
            qj, kj, vj = (torch.cat([x[i] for i in idx]) for x in (q, k, v))
            outs.append(_causal_pass(qj, kj, vj, scale)[-1:])
    return torch.cat(outs)


def _split_index(cu: list[int], nq: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of all history tokens and of all query tokens, each in sequence order."""
    hist = [torch.arange(a, b - n) for a, b, n in zip(cu[:-1], cu[1:], nq, strict=True)]
    qry = [torch.arange(b - n, b) for b, n in zip(cu[1:], nq, strict=True)]
    return torch.cat(hist).to(device), torch.cat(qry).to(device)


def _cumsum0(xs: list[int], device) -> torch.Tensor:
    out = torch.zeros(len(xs) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(xs).cumsum(0)
    return out.to(device)


def cross_attention_lse(qq, kh, vh, cu_q: list[int], cu_k: list[int], scale: float):
    """Non-causal attention of packed queries over their own sequence's keys.

    Returns (out [Tq, H, D] in qq's dtype, lse [Tq, H] float32; -inf where a sequence has no keys).
    CUDA half precision uses FlashAttention (``torch.nn.attention.varlen.varlen_attn``, else ``flash_attn``)
    when it can return the LSE; otherwise a plain float32 loop over sequences.
    """
    if qq.is_cuda and qq.dtype in (torch.float16, torch.bfloat16) and min(
            b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)) > 0:
        fast = _varlen_lse(qq, kh, vh, cu_q, cu_k, scale)
        if fast is not None:
            return fast
    out = torch.empty_like(qq)
    lse = torch.full(qq.shape[:2], float("-inf"), device=qq.device)
    for qa, qb, ka, kb in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        if qb == qa:
            continue
        if kb == ka:
            out[qa:qb] = 0
            continue
        qs, ks, vs = (x.float().transpose(0, 1) for x in (qq[qa:qb], kh[ka:kb], vh[ka:kb]))
        s = qs @ ks.transpose(1, 2) * scale  # [H, nq, nk]
        m = s.logsumexp(-1)  # [H, nq]
        out[qa:qb] = ((s - m[..., None]).exp() @ vs).transpose(0, 1).to(qq.dtype)
        lse[qa:qb] = m.transpose(0, 1)
    return out, lse


def _varlen_lse(qq, kh, vh, cu_q, cu_k, scale):
    """FlashAttention over packed queries/keys with its LSE ([Tq, H] float32), or None when neither
    ``torch.nn.attention.varlen`` nor ``flash_attn`` can return it here."""
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=qq.device) for c in (cu_q, cu_k))
    max_q = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:], strict=True))
    max_k = max(b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True))
    res = None
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn

        res = varlen_attn(qq, kh, vh, cq, ck, max_q, max_k, return_aux=AuxRequest(lse=True), scale=scale)
    except (ImportError, TypeError):  # an older torch: no varlen module, or no scale / return_aux
        if importlib.util.find_spec("flash_attn") is not None:
            from flash_attn import flash_attn_varlen_func

            res = flash_attn_varlen_func(qq, kh, vh, cq, ck, max_q, max_k, softmax_scale=scale, causal=False,
                                         return_attn_probs=True)[:2]
    if res is None:
        return None
    out, lse = res
    T, H = qq.shape[:2]
    if lse.shape == (H, T) and H != T:  # FlashAttention's own layout
        lse = lse.transpose(0, 1)
    if lse.shape != (T, H) or H == T:  # a layout we cannot tell apart: use the plain path
        return None
    return out, lse.float().contiguous()


def merge_self_term(out_h, lse_h, q_self, k_self, v_self, scale):
    """Add each query's own key to an attention result over other keys, by log-sum-exp (float32)."""
    s = (q_self.float() * k_self.float()).sum(-1) * scale  # [Tq, H]
    m = torch.maximum(lse_h, s)
    w_h, w_s = (lse_h - m).exp(), (s - m).exp()
    out = (w_h[..., None] * out_h.float() + w_s[..., None] * v_self.float()) / (w_h + w_s)[..., None]
    return out.to(out_h.dtype)


def _cascade(q, k, v, cu, nq, max_seqlen, scale):
    hist_idx, qry_idx = _split_index(cu, nq, q.device)
    hist_lens = [b - a - n for a, b, n in zip(cu[:-1], cu[1:], nq, strict=True)]
    out = torch.empty_like(q)
    keep = [s for s, n in enumerate(hist_lens) if n > 0]  # varlen kernels reject empty sequences
    qh, kh, vh = (x.index_select(0, hist_idx) for x in (q, k, v))
    if keep:
        cu_h = _cumsum0([hist_lens[s] for s in keep], q.device)
        out[hist_idx] = varlen_attention(qh, kh, vh, cu_h, max(hist_lens), causal=True, softmax_scale=scale)
    if qry_idx.numel():
        qq, kq, vq = (x.index_select(0, qry_idx) for x in (q, k, v))
        cu_q, cu_k = _cumsum0(nq, "cpu").tolist(), _cumsum0(hist_lens, "cpu").tolist()
        out_h, lse_h = cross_attention_lse(qq, kh, vh, cu_q, cu_k, scale)
        out[qry_idx] = merge_self_term(out_h, lse_h, qq, kq, vq, scale)
    return out


_IMPLS = {"cascade": _cascade, "reference": _reference, "naive": _naive}
