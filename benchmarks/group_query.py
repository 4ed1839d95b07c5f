"""Group-query attention forward (LUM step 2): time, TFLOP/s and peak memory per method.

Each case packs ``--users`` sequences in one row, each ``L`` history tokens + ``Q`` query tokens
(history causal; each query sees the history and itself). Methods:

* ``naive``    the definition: one causal SDPA pass over history + [query j] per query (Q + 1 passes/user)
* ``sdpa``     one SDPA call with a dense boolean [T, T] mask (mask built outside the timed region)
* ``flex``     FlexAttention with a block mask (built outside the timed region; compiled on CUDA)
* ``cascade``  history once with varlen causal attention, queries over the cached history K/V, LSE merge (its
               plan prebuilt, as the model builds one per batch for all its layers)
* ``triton``   the block-mask kernel (lum_dist.kernels.group_attention), CUDA only (its plan, the tile tables,
               prebuilt likewise)
* ``reference`` plain PyTorch per sequence (float32), only in ``--smoke``

FLOPs are counted by the exact pair formula for every method (the work the mask asks for, not what a
method happens to compute): ``4 * H * D * sum_s (L_s (L_s + 1) / 2 + Q_s (L_s + 1))``. On CUDA the run
also measures a bf16 matmul (8192^3) as the device's practical peak and reports each method's % of it,
plus the peak memory a call allocates beyond its inputs.

    python benchmarks/group_query.py            # CUDA, bf16, L 256..8192, Q 1..512, head dim 64/128
    python benchmarks/group_query.py --smoke    # tiny float32 shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.ops.group_query import (  # noqa: E402
    flops,
    group_query_attention,
    group_query_attention_plan,
    plan_group_query,
)

MAX_DIFF = {torch.float32: 1e-4, torch.bfloat16: 6e-2}  # a method further from the dense-mask output is wrong
FLOP_FORMULA = "4 * H * D * sum_s (L_s * (L_s + 1) / 2 + Q_s * (L_s + 1))  (forward: QK^T and PV; exact pairs)"


def packed(L: int, Q: int, users: int, heads: int, dim: int, device, dtype):
    T = users * (L + Q)
    q, k, v = (torch.randn(T, heads, dim, device=device, dtype=dtype) for _ in range(3))
    cu = torch.arange(users + 1, dtype=torch.int32, device=device) * (L + Q)
    return q, k, v, cu, torch.full((users,), Q, dtype=torch.int32, device=device)


def token_layout(cu: torch.Tensor, nq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its sequence index, and whether it is a history token."""
    lens = (cu[1:] - cu[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens)
    pos = torch.arange(doc.numel(), device=cu.device) - cu[:-1].long()[doc]
    return doc, pos < (lens - nq.long())[doc]


def dense_mask(cu: torch.Tensor, nq: torch.Tensor) -> torch.Tensor:
    doc, hist = token_layout(cu, nq)
    idx = torch.arange(doc.numel(), device=cu.device)
    causal_hist = hist[None, :] & (idx[None, :] <= idx[:, None])
    return (doc[:, None] == doc[None, :]) & (causal_hist | (idx[None, :] == idx[:, None]))


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)  # one graph for every case (no recompile limit)


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]


def sdpa_fn(q, k, v, cu, nq) -> Callable[[], torch.Tensor]:
    mask = dense_mask(cu, nq)
    return lambda: F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v), attn_mask=mask)[0].transpose(0, 1)


def flex_fn(q, k, v, cu, nq) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc, hist = token_layout(cu, nq)

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & ((hist[ki] & (ki <= qi)) | (ki == qi))

    block = create_block_mask(mask_mod, None, None, q.shape[0], q.shape[0], device=q.device)
    attn = compiled_flex() if q.is_cuda else flex_attention
    return lambda: attn(_heads(q), _heads(k), _heads(v), block_mask=block)[0].transpose(0, 1)


def method_fn(name: str, q, k, v, cu, nq, max_len: int) -> Callable[[], torch.Tensor]:
    """A zero-argument forward of ``name``; what it prepares once per batch (mask, block mask, or the plan: layout
    read, tile tables, indices, as the model does for all its layers) is built here, outside the timed calls."""
    builders = {"sdpa": sdpa_fn, "flex": flex_fn}
    if name in builders:
        return builders[name](q, k, v, cu, nq)
    if name in ("triton", "cascade"):
        plan = plan_group_query(cu, nq, max_len, backend=name, dtype=q.dtype, head_dim=q.shape[-1])
        return functools.partial(group_query_attention_plan, q, k, v, plan)
    return functools.partial(group_query_attention, q, k, v, cu, nq, max_len, backend=name)


def methods(q, k, v, cu, nq, max_len: int, names: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument forward; masks are prepared here, outside the timed calls."""
    return {name: method_fn(name, q, k, v, cu, nq, max_len) for name in names}


def time_ms(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup * 10, rep=iters * 10))
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def peak_extra_mib(fn: Callable[[], torch.Tensor], device: torch.device) -> float | None:
    """Memory one call allocates beyond what is live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float | None:
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / time_ms(lambda: a @ b, device, 10, 50) / 1e9


def measure_method(name: str, fn: Callable[[], torch.Tensor], work: float, args, device: torch.device,
                   peak: float | None, check: torch.Tensor | None, out: torch.Tensor | None = None) -> dict:
    """Time one method's forward (``out``: its output if already computed); a row without the case's shape."""
    with torch.no_grad():
        out = fn().float() if out is None else out
        ms = time_ms(fn, device, args.warmup, args.iters)
        return {"method": name, "ms": ms, "tflops": work / ms / 1e9,
                "pct_peak": None if peak is None else 100 * work / ms / 1e9 / peak,
                "peak_mib": peak_extra_mib(fn, device),
                "max_abs_diff": None if check is None else (out - check).abs().max().item()}


def disagreeing(rows: list[dict], dtype: torch.dtype) -> list[str]:
    """Methods whose output is further from the check output than ``dtype`` allows."""
    diffs = ((r["method"], r["max_abs_diff"]) for r in rows)
    return [name for name, diff in diffs if diff is not None and diff > MAX_DIFF[dtype]]


def run_case(L, Q, users, heads, dim, names, args, device, dtype, peak) -> list[dict]:
    q, k, v, cu, nq = packed(L, Q, users, heads, dim, device, dtype)
    work = users * flops(L, Q, heads, dim)
    fns = methods(q, k, v, cu, nq, L + Q, names)
    with torch.no_grad():
        outs = {name: fn().float() for name, fn in fns.items()}
    check = outs.get("sdpa", outs.get("reference"))
    shape = {"L": L, "Q": Q, "users": users, "heads": heads, "head_dim": dim}
    rows = []
    for name, fn in fns.items():
        row = measure_method(name, fn, work, args, device, peak, check, outs[name])
        rows.append({"method": name, **shape, **row})
    bad = disagreeing(rows, dtype)
    if bad:
        raise SystemExit(f"L={L} Q={Q} D={dim}: {bad} disagree with the dense-mask SDPA output")
    add_speedup(rows)
    return rows


def add_speedup(rows: list[dict]) -> None:
    """``speedup_vs_naive`` of every row of one case (None without a naive row)."""
    naive = next((r["ms"] for r in rows if r["method"] == "naive"), None)
    for r in rows:
        r["speedup_vs_naive"] = None if naive is None else naive / r["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU (CI)")
    ap.add_argument("--methods", nargs="*", help="default: naive sdpa flex cascade triton (CUDA)")
    ap.add_argument("--hidden", type=int, default=1024, help="heads = hidden / head_dim")
    ap.add_argument("--row-tokens", type=int, default=16384, help="users per row = max(2, this / (L + Q))")
    ap.add_argument("--max-sdpa-tokens", type=int, default=20000, help="skip the dense mask above this")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        dtype, Ls, Qs, dims, hidden = torch.float32, [16, 48], [1, 8], [16, 32], 64
        names = args.methods or ["naive", "sdpa", "flex", "cascade", "reference"]
        args.warmup, args.iters, args.row_tokens = 1, 3, 128
    else:
        if device.type != "cuda":
            sys.exit("the full benchmark needs CUDA; use --smoke on the CPU")
        dtype, Ls, Qs, dims, hidden = torch.bfloat16, [256, 1024, 4096, 8192], [1, 32, 512], [64, 128], args.hidden
        names = args.methods or ["naive", "sdpa", "flex", "cascade", "triton"]
    peak = matmul_peak_tflops(device)
    rows = []
    for dim in dims:
        for L in Ls:
            for Q in Qs:
                users = max(2, args.row_tokens // (L + Q))
                case = [n for n in names if n != "sdpa" or users * (L + Q) <= args.max_sdpa_tokens]
                rows += run_case(L, Q, users, hidden // dim, dim, case, args, device, dtype, peak)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows)
    if peak is not None:
        print(f"bf16 matmul peak measured in this run: {peak:.1f} TFLOP/s")
    meta = {"benchmark": "group-query attention forward", "flop_formula": FLOP_FORMULA,
            "dtype": str(dtype).removeprefix("torch."), "L": Ls, "Q": Qs, "head_dims": dims, "hidden": hidden,
            "row_tokens": args.row_tokens, "matmul_peak_tflops_bf16": peak, "warmup": args.warmup,
            "iters": args.iters, "smoke": args.smoke,
            "notes": "masks, block masks and plans are built outside the timed calls; max_abs_diff is against the "
                     "dense-mask SDPA output (reference in smoke runs when sdpa is skipped)"}
    path = write_result("group_query_cpu_smoke" if args.smoke else "group_query", rows, meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
