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

Plans (no host sync per layer): :func:`plan_group_query` reads ``cu_seqlens``/``num_queries`` once (one
device->host copy), validates them and prepares what the backend needs: Python lists for the reference
and naive loops, the Triton tile tables on the device (one host->device copy), the cascade's gather
indices on the device. :func:`group_query_attention_plan` then runs one layer with host arithmetic only
(no ``.tolist()``, ``.item()`` or host->device copy). ``LUMModel.forward`` reads the layout once
(:func:`read_group_layout`), skips the plan when every sequence has at most one query (plain causal
attention) and hands one plan to every block. :func:`group_query_attention` is the one-off form: it builds
a plan per call. The Triton launch is the torch custom op ``lum_dist::group_attention_fwd`` (with a fake
implementation), so ``torch.compile`` traces a model around it.

Work: a sequence has ``group_query_pairs(L, Q) = L(L + 1)/2 + Q(L + 1)`` (query, key) pairs, and the
forward costs ``4 * pairs * H * D`` FLOPs (QK^T and PV, 2 FLOPs per multiply-add each).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lum_dist.ops.attention import varlen_attention

if TYPE_CHECKING:  # Triton is optional: the kernel module is imported on first use (_kernels)
    from lum_dist.kernels.group_attention import TileTables

BACKENDS = ("triton", "cascade", "reference", "naive")
_FORWARD_ONLY = "group_query_attention: the triton backend is forward-only; use backend='reference' for gradients"


def group_query_pairs(L: int, Q: int) -> int:
    """(query, key) pairs computed for one sequence: causal history plus Q queries over history + self."""
    return L * (L + 1) // 2 + Q * (L + 1)


def flops(L: int, Q: int, H: int, D: int) -> int:
    """Forward FLOPs of one sequence: QK^T and PV, 2 * D each per pair and head."""
    return 4 * group_query_pairs(L, Q) * H * D


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


_kernel_module: ModuleType | None = None


def _kernels() -> ModuleType:
    """The Triton kernel module, imported on first use: Triton is optional (the ``gpu``/``dev`` extras), its
    import is slow, and ``TRITON_INTERPRET`` must be set before it (tests on the CPU). A plain global, not
    functools.cache: torch.compile then reads the module instead of breaking the graph at the import."""
    global _kernel_module
    if _kernel_module is None:
        _kernel_module = importlib.import_module("lum_dist.kernels.group_attention")
    return _kernel_module


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _auto_backend(device: torch.device, needs_grad: bool) -> str:
    return "triton" if device.type == "cuda" and _has_triton() and not needs_grad else "reference"


@dataclass(frozen=True)
class GroupQueryLayout:
    """A packed batch's sequence bounds and query counts as validated Python lists (host values)."""

    cu: list[int]  # cu_seqlens: sequence s is tokens cu[s]..cu[s + 1]
    num_queries: list[int]  # trailing query tokens of each sequence
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.cu[-1]

    @property
    def causal(self) -> bool:
        """At most one query per sequence: exactly causal attention, no group-query op needed."""
        return max(self.num_queries, default=0) <= 1

    def history_lens(self) -> list[int]:
        return [b - a - n for a, b, n in zip(self.cu[:-1], self.cu[1:], self.num_queries, strict=True)]


def read_group_layout(cu_seqlens: torch.Tensor, num_queries: torch.Tensor, max_seqlen: int,
                num_tokens: int | None = None) -> GroupQueryLayout:
    """Read and validate a batch's layout: a group-query batch's one host read (one device->host copy)."""
    nq_flat = num_queries.reshape(-1)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"group query: cu_seqlens must be [S + 1] with S >= 1, got "
                         f"{tuple(cu_seqlens.shape)}")
    if nq_flat.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"group query: num_queries has {nq_flat.numel()} entries for "
                         f"{cu_seqlens.numel() - 1} sequences")
    both = torch.cat([cu_seqlens.long(), nq_flat.to(cu_seqlens.device, torch.long)]).tolist()
    cu, nq = both[: cu_seqlens.numel()], both[cu_seqlens.numel():]
    total = cu[-1] if num_tokens is None else num_tokens
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"group query: cu_seqlens must run from 0 to T={total}, got {cu[0]}..{cu[-1]}")
    for s, (a, b, n) in enumerate(zip(cu[:-1], cu[1:], nq, strict=True)):
        if not 0 <= n <= b - a:
            raise ValueError(f"group query: sequence {s} has {b - a} tokens and num_queries={n}")
    return GroupQueryLayout(cu, nq, int(max_seqlen))


@dataclass(frozen=True, eq=False)
class CascadeIndex:
    """The cascade backend's gather indices and bounds: device tensors beside their host lists."""

    hist_idx: torch.Tensor  # int64 [history tokens]: token index of every history token, in sequence order
    query_idx: torch.Tensor  # int64 [query tokens]
    cu_hist: torch.Tensor  # int32: cu_seqlens of the non-empty histories (varlen kernels reject empty ones)
    max_hist: int
    cu_q: list[int]  # query bounds per sequence in query_idx order
    cu_k: list[int]  # history bounds per sequence in hist_idx order (empty ones too)
    cu_q_dev: torch.Tensor  # int32 [S + 1], cu_q on the device
    cu_k_dev: torch.Tensor  # int32 [S + 1], cu_k on the device


@dataclass(frozen=True, eq=False)
class GroupQueryPlan:
    """Everything the group-query layers of one forward pass need, built once per batch by
    :func:`plan_group_query` (one host read, host work, one host->device copy), so that each layer's
    :func:`group_query_attention_plan` does no ``.tolist()``, no ``.item()`` and no host->device copy."""

    layout: GroupQueryLayout
    backend: str  # what calls without gradients run
    auto: bool  # backend was chosen by "auto": calls that need gradients run the reference instead
    kernel: TileTables | None = None  # triton: the tile tables on the device
    cascade: CascadeIndex | None = None  # cascade: its indices on the device


def _cumsum0(xs: list[int]) -> list[int]:
    return [0, *itertools.accumulate(xs)]


def _cascade_index(layout: GroupQueryLayout, device: torch.device) -> CascadeIndex:
    cu, nq, hist_lens = layout.cu, layout.num_queries, layout.history_lens()
    hist = [i for a, h in zip(cu[:-1], hist_lens, strict=True) for i in range(a, a + h)]
    qry = [i for b, n in zip(cu[1:], nq, strict=True) for i in range(b - n, b)]
    cu_hist, cu_q, cu_k = _cumsum0([h for h in hist_lens if h > 0]), _cumsum0(nq), _cumsum0(hist_lens)
    idx = torch.tensor(hist + qry + cu_hist + cu_q + cu_k, dtype=torch.long).to(device)  # one copy
    cuts = list(itertools.accumulate([len(hist), len(qry), len(cu_hist), len(cu_q), len(cu_k)]))
    hist_idx, query_idx, *bounds = idx.tensor_split(cuts[:-1])
    cu_hist_dev, cu_q_dev, cu_k_dev = (x.to(torch.int32) for x in bounds)
    return CascadeIndex(hist_idx, query_idx, cu_hist_dev, max(hist_lens, default=0), cu_q, cu_k,
                        cu_q_dev, cu_k_dev)


def build_group_query_plan(layout: GroupQueryLayout, device: torch.device | str, backend: str = "auto",
                           needs_grad: bool = False, block_m: int | None = None,
                           loaded_bounds: bool | None = None, dtype: torch.dtype | None = None,
                           head_dim: int | None = None) -> GroupQueryPlan:
    """A plan for ``layout`` on ``device``. ``auto`` is ``triton`` on CUDA when Triton imports and no gradient
    is needed, else ``reference``; ``block_m``/``loaded_bounds`` tune the Triton tiles (None: the kernel's
    launch_config for the attention's ``dtype`` and ``head_dim`` when given, else its defaults)."""
    device = torch.device(device)
    auto = backend == "auto"
    if auto:
        backend = _auto_backend(device, needs_grad)
    if backend not in BACKENDS:
        raise ValueError(f"group query: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    if backend == "triton" and needs_grad:  # refused before Triton is imported (it may not be installed)
        raise ValueError(_FORWARD_ONLY)
    kernel = cascade = None
    if backend == "triton":
        kernels = _kernels()
        if block_m is None:
            block_m = kernels.launch_config(dtype, head_dim).block_m if dtype and head_dim else kernels.BLOCK_M
        kernel = kernels.tile_tables(layout.cu, layout.num_queries, device, block_m, loaded_bounds)
    elif backend == "cascade":
        cascade = _cascade_index(layout, device)
    return GroupQueryPlan(layout, backend, auto, kernel, cascade)


def plan_group_query(cu_seqlens: torch.Tensor, num_queries: torch.Tensor, max_seqlen: int,
                     backend: str = "auto", needs_grad: bool = False, block_m: int | None = None,
                     loaded_bounds: bool | None = None, dtype: torch.dtype | None = None,
                     head_dim: int | None = None) -> GroupQueryPlan:
    """:func:`read_group_layout` then :func:`build_group_query_plan` on cu_seqlens' device."""
    layout = read_group_layout(cu_seqlens, num_queries, max_seqlen)
    return build_group_query_plan(layout, cu_seqlens.device, backend, needs_grad, block_m, loaded_bounds, dtype,
                                  head_dim)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"group_query_attention: q, k, v must share one [T, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupQueryLayout) -> None:
    _check_shapes(q, k, v)
    if q.shape[0] != layout.num_tokens:
        raise ValueError(f"group_query_attention: the plan covers {layout.num_tokens} tokens, "
                         f"q has {q.shape[0]}")


def group_query_attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: GroupQueryPlan,
                               softmax_scale: float | None = None) -> torch.Tensor:
    """One layer over a prebuilt plan: q, k, v [T, H, D] -> [T, H, D]; host arithmetic only (no sync)."""
    _check_qkv(q, k, v, plan.layout)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = plan.backend
    if backend == "triton" and _needs_grad(q, k, v):
        if not plan.auto:
            raise ValueError(_FORWARD_ONLY)
        backend = "reference"
    if backend == "triton":
        return _kernels().group_attention(q, k, v, plan.kernel, scale)
    if backend == "cascade":
        return _cascade(q, k, v, plan, scale)
    layout = plan.layout
    return _IMPLS[backend](q, k, v, layout.cu, layout.num_queries, layout.max_seqlen, scale)


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
    """History-causal, query-isolated attention per packed sequence. q, k, v: [T, H, D] -> [T, H, D].

    A one-off call: it reads the layout (a host sync) and builds a plan. A model calling it in every layer
    builds the plan once with :func:`plan_group_query` and calls :func:`group_query_attention_plan`."""
    _check_shapes(q, k, v)
    layout = read_group_layout(cu_seqlens, num_queries, max_seqlen, num_tokens=q.shape[0])
    plan = build_group_query_plan(layout, q.device, backend, needs_grad=_needs_grad(q, k, v), dtype=q.dtype,
                                  head_dim=q.shape[-1])
    return group_query_attention_plan(q, k, v, plan, softmax_scale)


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


def cross_attention_lse(qq, kh, vh, cu_q: list[int], cu_k: list[int], scale: float,
                        device_bounds: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Non-causal attention of packed queries over their own sequence's keys.

    Returns (out [Tq, H, D] in qq's dtype, lse [Tq, H] float32; -inf where a sequence has no keys).
    CUDA half precision uses FlashAttention (``torch.nn.attention.varlen.varlen_attn``, else ``flash_attn``)
    when it can return the LSE; otherwise a plain float32 loop over sequences. ``device_bounds``: cu_q and
    cu_k already on the device as int32 (a plan's), else copied there per call.
    """
    if qq.is_cuda and qq.dtype in (torch.float16, torch.bfloat16) and min(
            b - a for a, b in zip(cu_k[:-1], cu_k[1:], strict=True)) > 0:
        fast = _varlen_lse(qq, kh, vh, cu_q, cu_k, scale, device_bounds)
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


def _varlen_lse(qq, kh, vh, cu_q, cu_k, scale, device_bounds=None):
    """FlashAttention over packed queries/keys with its LSE ([Tq, H] float32), or None when neither
    ``torch.nn.attention.varlen`` nor ``flash_attn`` can return it here."""
    cq, ck = device_bounds or tuple(torch.tensor(c, dtype=torch.int32, device=qq.device) for c in (cu_q, cu_k))
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


def _cascade(q, k, v, plan: GroupQueryPlan, scale):
    idx = plan.cascade
    out = torch.empty_like(q)
    qh, kh, vh = (x.index_select(0, idx.hist_idx) for x in (q, k, v))
    if idx.max_hist > 0:
        out[idx.hist_idx] = varlen_attention(qh, kh, vh, idx.cu_hist, idx.max_hist, causal=True, softmax_scale=scale)
    if idx.query_idx.numel():
        qq, kq, vq = (x.index_select(0, idx.query_idx) for x in (q, k, v))
        out_h, lse_h = cross_attention_lse(qq, kh, vh, idx.cu_q, idx.cu_k, scale, (idx.cu_q_dev, idx.cu_k_dev))
        out[idx.query_idx] = merge_self_term(out_h, lse_h, qq, kq, vq, scale)
    return out


_IMPLS = {"cascade": _cascade, "reference": _reference, "naive": _naive}
