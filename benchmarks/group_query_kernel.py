"""The Triton group-query kernel's launch variants side by side on one GPU: how the key loop is bounded
(``arg``: the longest history's block count, blocks past a tile's end skipped by a branch; ``loaded``: each
tile's own bounds, read from its tile table), rows per history tile, keys per block, warps, pipeline stages.

Every variant runs the same packed inputs (``--users`` sequences of ``L`` history + ``Q`` query tokens) and is
checked against the float32 reference (outputs poisoned with NaN first: an unwritten row fails). Time is the
median of ``triton.testing.do_bench``; FLOPs by the exact pair formula of benchmarks/group_query.py.

    python benchmarks/group_query_kernel.py            # CUDA, bf16
    python benchmarks/group_query_kernel.py --smoke    # the Triton interpreter on the CPU, float32, tiny
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: the interpreter replaces the compiler
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402
from group_query import FLOP_FORMULA, MAX_DIFF, matmul_peak_tflops, packed  # noqa: E402

from lum_dist.kernels.group_attention import (  # noqa: E402
    _group_attention_fwd_kernel,
    query_block,
    tile_table,
)
from lum_dist.ops.group_query import flops, group_query_reference  # noqa: E402

# (key loop bound, history tile rows, keys per block, warps, stages); None warps: the op's rule (4 if D <= 64 else 8)
VARIANTS = [("arg", 64, 64, None, 2), ("loaded", 64, 64, None, 2), ("loaded", 64, 64, None, 3),
            ("loaded", 128, 64, 8, 3), ("loaded", 128, 128, 8, 2), ("loaded", 64, 128, 8, 2), ("arg", 128, 64, 8, 3)]
CASES = [(2048, 16, 16, 128), (2048, 256, 16, 128), (2048, 64, 8, 64)]  # (L, Q, heads, head dim)
SMOKE_VARIANTS = [("arg", 16, 16, None, 2), ("loaded", 16, 16, None, 2), ("loaded", 32, 16, 4, 3)]
SMOKE_CASES = [(40, 5, 2, 16)]


def launch(q, k, v, cu: list[int], nq: list[int], variant: tuple, scale: float):
    """The op's launch (kernels/group_attention.py: group_attention_op) with the variant's parameters, into
    a NaN-poisoned output; returns a closure that runs it and the output."""
    bound, block_m, block_n, warps, stages = variant
    T, H, D = q.shape
    block_q = query_block(nq, block_m)
    hist, query = (torch.from_numpy(t).to(q.device) for t in tile_table(cu, nq, block_m, block_q))
    max_kv_blocks = math.ceil(max(b - a - n for a, b, n in zip(cu[:-1], cu[1:], nq, strict=True)) / block_n)
    out = torch.full_like(q, float("nan"))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def run() -> torch.Tensor:
        for tiles, is_query, rows in ((hist, False, block_m), (query, True, block_q)):
            _group_attention_fwd_kernel[(tiles.shape[0], H)](
                q, k, v, out, tiles, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), scale * math.log2(math.e), max_kv_blocks,
                HEAD_DIM=D, BLOCK_M=rows, BLOCK_N=block_n, IS_QUERY=is_query, LOADED_BOUNDS=bound == "loaded",
                DOT_PRECISION=precision, num_warps=warps or (4 if D <= 64 else 8), num_stages=stages)
        return out

    return run, out


def measure(case: tuple, variants: list[tuple], users: int, device, dtype, budget_s: float) -> list[dict]:
    L, Q, H, D = case
    q, k, v, cu_t, nq_t = packed(L, Q, users, H, D, device, dtype)
    cu, nq = cu_t.tolist(), nq_t.tolist()
    with torch.no_grad():
        ref = group_query_reference(q.float(), k.float(), v.float(), cu_t, nq_t, L + Q)
    work = users * flops(L, Q, H, D)
    rows, t_end = [], time.monotonic() + budget_s
    for variant in variants:
        row = {"L": L, "Q": Q, "users": users, "heads": H, "head_dim": D, "bound": variant[0],
               "block_m": variant[1], "block_n": variant[2], "warps": variant[3] or (4 if D <= 64 else 8),
               "stages": variant[4]}
        if time.monotonic() > t_end:
            rows.append({**row, "status": "skipped (budget)"})
            continue
        try:
            run, out = launch(q, k, v, cu, nq, variant, 1 / math.sqrt(D))
            run()
            diff = float((out.float() - ref).abs().max())  # NaN (an unwritten row) compares false below
            if device.type == "cuda":
                import triton.testing

                ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
            else:
                t0 = time.perf_counter()
                run()
                ms = (time.perf_counter() - t0) * 1e3
            ok = diff <= MAX_DIFF[dtype]
            rows.append({**row, "status": "ok" if ok else "WRONG", "ms": ms, "tflops": work / ms / 1e9,
                         "max_abs_diff": diff})
        except Exception as e:  # a variant the compiler rejects (shared memory, registers) is a result too
            rows.append({**row, "status": f"failed: {type(e).__name__}: {str(e)[:120]}"})
        print(f"[group_query_kernel] {case} {variant}: {rows[-1]['status']} {rows[-1].get('ms', '')}", flush=True)
    base = next((r["ms"] for r in rows if r.get("ms") and r["status"] == "ok"), None)
    for r in rows:
        if base and r.get("ms"):
            r["speedup_vs_first"] = base / r["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes in the Triton interpreter (CPU)")
    ap.add_argument("--row-tokens", type=int, default=16384, help="users per case = this // (L + Q)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="seconds; later variants are skipped past it")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cases, variants = (SMOKE_CASES, SMOKE_VARIANTS) if args.smoke else (CASES, VARIANTS)
    t0, rows = time.monotonic(), []
    for i, case in enumerate(cases):
        left = args.budget_s - (time.monotonic() - t0)
        users = max(2, (64 if args.smoke else args.row_tokens) // (case[0] + case[1]))
        rows += measure(case, variants, users, device, dtype, left / (len(cases) - i))
    print_table(rows)
    peak = matmul_peak_tflops(device)
    meta = {"dtype": str(dtype).removeprefix("torch."), "flop_formula": FLOP_FORMULA, "matmul_peak_tflops_bf16": peak,
            "variants": "(key loop bound, history tile rows, keys per block, warps, stages)",
            "smoke": args.smoke, "max_abs_diff": f"against the float32 reference; ok within {MAX_DIFF[dtype]}"}
    print(f"wrote {write_result('group_query_kernel' + ('_smoke' if args.smoke else ''), rows, meta)}")


if __name__ == "__main__":
    main()
