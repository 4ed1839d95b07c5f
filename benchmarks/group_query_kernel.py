"""The Triton group-query kernel's launch variants side by side on one GPU: how the key loop is bounded
(``arg``: the longest history's block count, blocks past a tile's end skipped by a branch; ``loaded``: each
tile's own bounds, read from its tile table), rows per history tile, keys per block, warps, pipeline stages.

Every variant runs the same packed inputs (``--row-tokens`` // (L + Q) sequences of ``L`` history + ``Q`` query
tokens) through the model's launch (the torch op over prebuilt tile tables) and is checked against the float32
reference. Time is the median of ``triton.testing.do_bench``; FLOPs by the exact pair formula of
benchmarks/group_query.py.

    python benchmarks/group_query_kernel.py            # CUDA, bf16
    python benchmarks/group_query_kernel.py --smoke    # the Triton interpreter on the CPU, float32, tiny
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: the interpreter replaces the compiler
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402
from group_query import FLOP_FORMULA, MAX_DIFF, matmul_peak_tflops, packed  # noqa: E402

from lum_dist.kernels.group_attention import group_attention_op, launch_config, tile_tables  # noqa: E402
from lum_dist.ops.group_query import flops, group_query_reference  # noqa: E402

# (key loop bound, history tile rows, keys per block, warps, stages); None warps: launch_config's for the case
VARIANTS = [("arg", 64, 64, None, 2), ("loaded", 64, 64, None, 2), ("loaded", 64, 64, None, 3),
            ("loaded", 128, 64, 8, 3), ("loaded", 128, 128, 8, 2), ("loaded", 64, 128, 8, 2), ("arg", 128, 64, 8, 3)]
CASES = [(2048, 16, 16, 128), (2048, 256, 16, 128), (2048, 64, 8, 64)]  # (L, Q, heads, head dim)
SMOKE_VARIANTS = [("arg", 16, 16, None, 2), ("loaded", 16, 16, None, 2), ("loaded", 32, 16, 4, 3)]
SMOKE_CASES = [(40, 5, 2, 16)]


def launch(q, k, v, cu: list[int], nq: list[int], variant: tuple, scale: float) -> Callable[[], torch.Tensor]:
    """The model's launch (the op lum_dist::group_attention_fwd over prebuilt tile tables) with the variant's
    parameters (warps resolved)."""
    bound, block_m, block_n, warps, stages = variant
    tables = tile_tables(cu, nq, q.device, block_m, loaded_bounds=bound == "loaded")
    max_kv_blocks = math.ceil(tables.max_history / block_n)
    return lambda: group_attention_op(q, k, v, tables.hist, tables.query, scale, max_kv_blocks, tables.block_m,
                                      tables.block_q, block_n, tables.loaded_bounds, warps, stages)


def measure(case: tuple, variants: list[tuple], users: int, device, dtype, budget_s: float) -> list[dict]:
    L, Q, H, D = case
    q, k, v, cu_t, nq_t = packed(L, Q, users, H, D, device, dtype)
    cu, nq = cu_t.tolist(), nq_t.tolist()
    with torch.no_grad():
        ref = group_query_reference(q.float(), k.float(), v.float(), cu_t, nq_t, L + Q)
    work = users * flops(L, Q, H, D)
    rows, t_end = [], time.monotonic() + budget_s
    for bound, block_m, block_n, warps, stages in variants:
        variant = (bound, block_m, block_n, warps or launch_config(dtype, D).num_warps, stages)
        row = {"L": L, "Q": Q, "users": users, "heads": H, "head_dim": D,
               **dict(zip(("bound", "block_m", "block_n", "warps", "stages"), variant, strict=True))}
        if time.monotonic() > t_end:
            rows.append({**row, "status": "skipped (budget)"})
            continue
        try:
            run = launch(q, k, v, cu, nq, variant, 1 / math.sqrt(D))
            diff = float((run().float() - ref).abs().max())  # NaN compares false below
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
