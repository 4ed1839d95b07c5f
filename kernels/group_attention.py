"""Group-query attention forward as a Triton block-mask kernel (FlashAttention-2 style online softmax).

Mask (see :mod:`lum_dist.ops.group_query`): per packed sequence, ``L`` history tokens attend causally,
then each of ``Q`` query tokens attends to the whole history and to itself only.

Work decomposition (like flash-attn varlen / FlexAttention block masks): the host cuts every sequence's
history and its queries into separate tiles of at most ``BLOCK_M`` rows and writes a tile table (``int32
[tiles, 4]``: sequence start, first row, row end, history end), once per batch (:func:`tile_tables`, one
host->device copy); every layer's launch (:func:`group_attention`) reuses it without touching the host.
One program handles one (tile, head):

* a history tile loops over key tiles from the sequence start up to its diagonal, never beyond;
* a query tile loops over the history key tiles only, then folds in each row's own key/value (the
  diagonal self term) as one more online-softmax step: query-query tiles are never computed.

No dense mask exists anywhere; masks are built in registers from indices. Accumulation is float32;
inputs may be fp16, bf16 or fp32 (fp32 dots run in IEEE precision, not TF32); head dim a power of two
in 16..256 (32/64/128 tested).

Loop bounds (``LOADED_BOUNDS``, chosen by :func:`loaded_bounds_ok`): compiled, the key loop runs over exactly
the tile's blocks, a bound derived from the tile table, and the compiler software-pipelines the K/V loads
(cp.async). The Triton interpreter of 3.6 and older (with numpy >= 2.4) mishandles loops bounded by scalars
loaded from memory, so there the loop is bounded by a kernel argument (``max_kv_blocks``, the longest
history's block count, from the tile tables' ``max_history``) and a tile skips blocks past its own end with
a scalar branch, which also stops the pipelining. Both variants are tested (interpreter), compile for
sm_80/sm_90 (tests/ops/test_group_query.py) and were measured on an H200 (Triton 3.6: the loaded bounds give
the same outputs, 1.3-1.4x faster; benchmarks/group_query_kernel.py).

Tile shapes, warps and pipeline depth per dtype and head dim: :func:`launch_config`.

The launch is the torch custom op ``lum_dist::group_attention_fwd`` (:func:`group_attention_op`, with a
``register_fake`` implementation: a contiguous [T, H, D] like q), so ``torch.compile`` traces models
around it and ``torch.library.opcheck`` checks it (tests/ops/test_group_query.py, in the interpreter).

Forward only, on purpose: training never uses group queries (pretraining has Q = 0, evaluation Q = 1,
which is plain causal attention). ``lum_dist.ops.group_query`` keeps a differentiable reference.
Set ``TRITON_INTERPRET=1`` before importing this module to run it on the CPU (float32 only: the
interpreter computes bf16 dots wrongly).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK_M = 64  # rows per history tile where launch_config has no measured better choice
BLOCK_N = 64  # keys per block


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # rows per history tile (query tiles: see query_block)
    block_n: int  # keys per block
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads


def launch_config(dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """The launch shape per dtype and head dim. Half precision: the fastest variant measured on an H200 with
    Triton 3.6 (benchmarks/group_query_kernel.py; benchmarks/results/group_query_kernel.json): head dim 128,
    128-row tiles, 8 warps, 3 stages, 3.2-3.4x the first kernel's 64 rows and 2 stages (2,048-token
    histories, 16-256 queries); head dim 64, 64 rows, 4 warps, 3 stages, 1.5x. Wider heads (not measured) take
    64 rows and 32 keys, 2 stages, to fit shared memory. float32 (the interpreter tests; not measured on a GPU)
    keeps the first kernel's shapes, with 32 keys per block from head dim 128 (fp32 K/V tiles crowd shared
    memory)."""
    if dtype == torch.float32:
        return LaunchConfig(BLOCK_M, 32 if head_dim >= 128 else BLOCK_N, 4 if head_dim <= 64 else 8, 2)
    if head_dim > 128:
        return LaunchConfig(64, 32, 8, 2)
    if head_dim == 128:
        return LaunchConfig(128, 64, 8, 3)
    return LaunchConfig(64, 64, 4, 3)


@triton.jit
def _kv_block(q, K, V, kv_start, kv_end, rows, dims, head, stride_kt, stride_kh, stride_vt, stride_vh, qk_scale,
              m_i, l_i, acc, BLOCK_N: tl.constexpr, IS_QUERY: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the key block starting at kv_start (keys < kv_end). MASKED=False: the
    caller knows every key of the block is visible to every row, so no mask is built."""
    cols = kv_start + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_end
    k = tl.load(K + cols[:, None] * stride_kt + head * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + head * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        if IS_QUERY:
            keep = col_ok[None, :]
        else:
            keep = col_ok[None, :] & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
    # Every row sees at least the sequence's first key in block 0, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _group_attention_fwd_kernel(
    Q, K, V, Out, Tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    max_kv_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_QUERY: tl.constexpr,
    LOADED_BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq_start = tl.load(Tiles + tile * 4 + 0)
    row_start = tl.load(Tiles + tile * 4 + 1)
    row_end = tl.load(Tiles + tile * 4 + 2)
    hist_end = tl.load(Tiles + tile * 4 + 3)

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys this tile needs: the history up to the diagonal (history tile) or all of it (query tile).
    if IS_QUERY:
        kv_end = hist_end
    else:
        kv_end = row_end
    if LOADED_BOUNDS:
        # Exactly this tile's key blocks; loads are software-pipelined (cp.async). Triton >= 3.7 only.
        # Blocks every row sees whole (below the first row's diagonal / inside the history) skip the mask.
        if IS_QUERY:
            n_full = (kv_end - seq_start) // BLOCK_N
        else:
            n_full = (row_start - seq_start + 1) // BLOCK_N
        for b in range(0, n_full):
            m_i, l_i, acc = _kv_block(q, K, V, seq_start + b * BLOCK_N, kv_end, rows, dims, head, stride_kt, stride_kh,
                                      stride_vt, stride_vh, qk_scale, m_i, l_i, acc, BLOCK_N, IS_QUERY, False,
                                      DOT_PRECISION)
        for b in range(n_full, tl.cdiv(kv_end - seq_start, BLOCK_N)):
            m_i, l_i, acc = _kv_block(q, K, V, seq_start + b * BLOCK_N, kv_end, rows, dims, head, stride_kt, stride_kh,
                                      stride_vt, stride_vh, qk_scale, m_i, l_i, acc, BLOCK_N, IS_QUERY, True,
                                      DOT_PRECISION)
    else:
        # Bounded by an argument (the longest history's block count); blocks past this tile's end are skipped.
        for b in range(0, max_kv_blocks):
            if seq_start + b * BLOCK_N < kv_end:
                m_i, l_i, acc = _kv_block(q, K, V, seq_start + b * BLOCK_N, kv_end, rows, dims, head, stride_kt,
                                          stride_kh, stride_vt, stride_vh, qk_scale, m_i, l_i, acc, BLOCK_N, IS_QUERY,
                                          True, DOT_PRECISION)
    if IS_QUERY:
        # The diagonal: each query row's own key and value, one more online-softmax step.
        k_self = tl.load(K + rows[:, None] * stride_kt + head * stride_kh + dims[None, :], mask=row_ok[:, None], other=0.0)
        v_self = tl.load(V + rows[:, None] * stride_vt + head * stride_vh + dims[None, :], mask=row_ok[:, None], other=0.0)
        s_self = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), 1) * qk_scale
        m_new = tl.maximum(m_i, s_self)
        alpha = tl.exp2(m_i - m_new)
        p_self = tl.exp2(s_self - m_new)
        l_i = l_i * alpha + p_self
        acc = acc * alpha[:, None] + p_self[:, None] * v_self.to(tl.float32)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


def loaded_bounds_ok(version: str = triton.__version__, interpreting: bool | None = None) -> bool:
    """Whether the key loop may be bounded by scalars loaded from the tile table: compiled, always; in the
    interpreter (``TRITON_INTERPRET=1``) from Triton 3.7 on."""
    if interpreting is None:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    major, minor = (int(x) for x in version.split(".")[:2])
    return not interpreting or (major, minor) >= (3, 7)


def tile_table(cu: list[int], num_queries: list[int], block_hist: int, block_query: int) -> tuple[np.ndarray, np.ndarray]:
    """Host-side tile -> sequence map: (history tiles, query tiles), each int32 [n, 4] rows of
    (sequence start, first row, row end, history end), longest key range first for load balance."""
    hist, qry = [], []
    for a, b, n in zip(cu[:-1], cu[1:], num_queries, strict=True):
        h = b - n
        hist += [(a, r, min(r + block_hist, h), h) for r in range(a, h, block_hist)]
        qry += [(a, r, min(r + block_query, b), h) for r in range(h, b, block_query)]
    out = []
    for tiles, key_end in ((hist, 2), (qry, 3)):
        arr = np.asarray(tiles, dtype=np.int32).reshape(-1, 4)
        out.append(arr[np.argsort(-(arr[:, key_end] - arr[:, 0]), kind="stable")])
    return out[0], out[1]


def query_block(num_queries: list[int], block_m: int = BLOCK_M) -> int:
    """Rows per query tile. Few queries per user (Q = 1 in evaluation) would leave most rows of a 64-row
    tile empty: query tiles shrink to the largest Q's power of two, down to 16 (the smallest tl.dot)."""
    return min(block_m, max(16, triton.next_power_of_2(max(num_queries, default=1))))


@dataclass(frozen=True, eq=False)
class TileTables:
    """One packed batch's launch plan, already on the device: built once per batch (host work and one
    host->device copy), read by every layer's launch without touching the host again."""

    hist: torch.Tensor  # int32 [history tiles, 4] (see tile_table), a view of one device buffer
    query: torch.Tensor  # int32 [query tiles, 4], the rest of that buffer
    block_m: int  # rows per history tile
    block_q: int  # rows per query tile
    max_history: int  # the longest history: bounds the key loop when loaded_bounds is off
    loaded_bounds: bool  # key loops bounded by loaded scalars (Triton >= 3.7), see loaded_bounds_ok


def tile_tables(cu: list[int], num_queries: list[int], device: torch.device | str, block_m: int = BLOCK_M,
                loaded_bounds: bool | None = None) -> TileTables:
    """Tile tables of a validated layout (cu_seqlens and num_queries as Python lists) on ``device``."""
    block_q = query_block(num_queries, block_m)
    hist, query = tile_table(cu, num_queries, block_m, block_q)
    table = torch.from_numpy(np.concatenate([hist, query])).to(device)  # one copy for both tables
    return TileTables(
        hist=table[: len(hist)], query=table[len(hist):], block_m=block_m, block_q=block_q,
        max_history=max((b - a - n for a, b, n in zip(cu[:-1], cu[1:], num_queries, strict=True)), default=0),
        loaded_bounds=loaded_bounds_ok() if loaded_bounds is None else loaded_bounds,
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Host-only checks (shapes, head dim, dtype): no device read."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"group_attention: q, k, v must share one [T, H, D] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"group_attention: head dim must be a power of two in 16..256, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"group_attention: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


# A torch custom op, so that torch.compile traces a model around the kernel (it cannot trace a Triton launch
# with host-side arguments itself) and FakeTensor/meta propagation knows the output without running it.
@torch.library.custom_op("lum_dist::group_attention_fwd", mutates_args=())
def group_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hist_tiles: torch.Tensor,
    query_tiles: torch.Tensor,
    scale: float,
    max_kv_blocks: int,
    block_m: int,
    block_q: int,
    block_n: int,
    loaded_bounds: bool,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """q, k, v [T, H, D] (any strides) and int32 [n, 4] tile tables on q's device -> contiguous [T, H, D].
    Launch parameters are host values (see :func:`group_attention`): nothing here reads the device."""
    _check_inputs(q, k, v)
    T, H, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if max(x.stride(0) for x in (q, k, v, out)) * T >= 2**31:
        raise ValueError(f"group_attention: {T} tokens x token stride overflow the kernel's int32 offsets; split the batch")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # ignored for half-precision inputs
    for tiles, is_query, rows in ((hist_tiles, False, block_m), (query_tiles, True, block_q)):
        if tiles.shape[0] == 0:
            continue
        tiles = tiles.contiguous()  # the kernel reads row t at Tiles + 4 t
        _group_attention_fwd_kernel[(tiles.shape[0], H)](
            q, k, v, out, tiles,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            scale * math.log2(math.e), max_kv_blocks,
            HEAD_DIM=D, BLOCK_M=rows, BLOCK_N=block_n, IS_QUERY=is_query, LOADED_BOUNDS=loaded_bounds,
            DOT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


@group_attention_op.register_fake
def _group_attention_fake(q, k, v, hist_tiles, query_tiles, scale, max_kv_blocks, block_m, block_q, block_n,
                          loaded_bounds, num_warps, num_stages):
    _check_inputs(q, k, v)
    return q.new_empty(q.shape)  # contiguous, like the real output


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: TileTables, scale: float,
                    block_n: int | None = None) -> torch.Tensor:
    """One layer's launch over a batch's prebuilt tile tables: host arithmetic only, no sync, no copy.
    ``block_n``: keys per block, at most :func:`launch_config`'s (None: that one)."""
    if tables.hist.device != q.device:
        raise ValueError(f"group_attention: tile tables live on {tables.hist.device}, q on {q.device}")
    cfg = launch_config(q.dtype, q.shape[-1])
    block_n = cfg.block_n if block_n is None else min(block_n, cfg.block_n)
    max_kv_blocks = triton.cdiv(tables.max_history, block_n)
    return group_attention_op(q, k, v, tables.hist, tables.query, scale, max_kv_blocks, tables.block_m,
                              tables.block_q, block_n, tables.loaded_bounds, cfg.num_warps, cfg.num_stages)


def group_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: list[int],
    num_queries: list[int],
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    loaded_bounds: bool | None = None,
) -> torch.Tensor:
    """One call on its own: builds the tile tables, then launches. cu / num_queries as Python lists
    (validated by the caller, see :func:`lum_dist.ops.group_query.plan_group_query`). Several calls over
    one batch (a model's layers) should build :func:`tile_tables` once and call :func:`group_attention`."""
    block_m = block_m or launch_config(q.dtype, q.shape[-1]).block_m
    tables = tile_tables(cu, num_queries, q.device, block_m, loaded_bounds)
    return group_attention(q, k, v, tables, scale, block_n)
