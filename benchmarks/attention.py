"""Packed causal attention, forward + backward time per backend (lum_dist.ops.attention).

Each case is one packed row of ``budget`` tokens filled with user sequences whose lengths follow a
log-normal behaviour count (median ``--median`` behaviours, two tokens each, capped at
``--max-seq-len``), the shape the trainer feeds the model. Reported per backend: milliseconds for
forward + backward, achieved TFLOP/s and the largest output difference from the reference backend.

FLOPs (forward + backward, causal, per layer): ``12 * H * D * sum_s L_s (L_s + 1) / 2`` -- QK^T and
AV cost 2 * D FLOPs per (query, key) pair each, a causal sequence of L tokens has L(L + 1)/2 pairs,
and backward is counted as twice the forward (the convention of lum_dist.model.flops_per_token).

    python benchmarks/attention.py            # CUDA, bf16, realistic shapes
    python benchmarks/attention.py --smoke    # tiny float32 shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.ops.attention import available_backends, varlen_attention  # noqa: E402

FLOP_FORMULA = "12 * H * D * sum_s L_s * (L_s + 1) / 2  (fwd + bwd = 3 x fwd; causal pairs only)"


def packed_lengths(budget: int, median: int, max_seq_len: int, seed: int) -> list[int]:
    """Sequence lengths (even, in tokens) filling exactly ``budget`` tokens; the last one is cut to fit."""
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < budget:
        behaviours = int(np.clip(rng.lognormal(np.log(median), 1.0), 1, max_seq_len // 2))
        lens.append(min(2 * behaviours, budget - sum(lens)))
    return lens


def attention_flops(lens: list[int], heads: int, head_dim: int) -> float:
    return 12.0 * heads * head_dim * sum(n * (n + 1) / 2 for n in lens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_backend(backend, q, k, v, cu, max_seqlen, warmup: int, iters: int) -> float:
    """Mean seconds of one forward + backward."""
    grad = torch.randn_like(q)
    for i in range(warmup + iters):
        if i == warmup:
            sync(q.device)
            start = time.perf_counter()
        out = varlen_attention(q, k, v, cu, max_seqlen, backend=backend)
        torch.autograd.grad(out, (q, k, v), grad)
    sync(q.device)
    return (time.perf_counter() - start) / iters


@dataclass
class Case:
    """One packed row: its sequence lengths, inputs (with gradients) and the reference output."""

    lens: list[int]
    cu: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    want: torch.Tensor
    flops: float


def make_case(budget: int, heads: int, head_dim: int, args, device: torch.device, dtype: torch.dtype) -> Case:
    lens = packed_lengths(budget, args.median, args.max_seq_len, args.seed)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    cu = cu.to(device)
    q, k, v = (torch.randn(budget, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        want = varlen_attention(q, k, v, cu, max(lens), backend="reference").float()
    return Case(lens, cu, q, k, v, want, attention_flops(lens, heads, head_dim))


def measure_backend(case: Case, backend: str, args) -> dict | None:
    """One table row for ``backend`` on ``case``; None where the backend is skipped (sdpa above its limit)."""
    (budget, heads, head_dim), max_len = case.q.shape, max(case.lens)
    if backend == "sdpa" and budget > args.max_sdpa_tokens:
        return None  # the dense [T, T] mask and scores would not fit
    with torch.no_grad():
        out = varlen_attention(case.q, case.k, case.v, case.cu, max_len, backend=backend)
        diff = (out.float() - case.want).abs().max().item()
    seconds = time_backend(backend, case.q, case.k, case.v, case.cu, max_len, args.warmup, args.iters)
    return {
        "backend": backend, "tokens": budget, "seqs": len(case.lens), "max_len": max_len, "heads": heads,
        "head_dim": head_dim, "dtype": str(case.q.dtype).removeprefix("torch."), "ms_fwd_bwd": seconds * 1e3,
        "tokens_per_s": budget / seconds, "tflops": case.flops / seconds / 1e12, "max_abs_diff": diff,
    }


def run_case(budget: int, heads: int, head_dim: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    case = make_case(budget, heads, head_dim, args, device, dtype)
    rows = (measure_backend(case, backend, args) for backend in args.backends or available_backends(device))
    return [r for r in rows if r is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU CI)")
    ap.add_argument("--backends", nargs="*", help="default: every backend available on the device")
    ap.add_argument("--median", type=int, default=40, help="median behaviours per user")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--max-sdpa-tokens", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        dtype, budgets, shapes = torch.float32, [256], [(2, 16)]
        args.warmup, args.iters, args.max_seq_len, args.median = 1, 3, 64, 8
    else:
        dtype, budgets, shapes = torch.bfloat16, [4096, 16384, 65536], [(16, 64), (16, 128), (32, 128)]
        if device.type != "cuda":
            sys.exit("the full benchmark needs CUDA; use --smoke on the CPU")
    rows = [r for b in budgets for h, d in shapes for r in run_case(b, h, d, args, device, dtype)]
    print_table(rows)
    meta = {"benchmark": "varlen causal attention, forward + backward", "flop_formula": FLOP_FORMULA,
            "budgets": budgets, "heads_head_dim": shapes, "median_behaviours": args.median,
            "max_seq_len": args.max_seq_len, "warmup": args.warmup, "iters": args.iters, "smoke": args.smoke}
    path = write_result("attention-smoke" if args.smoke else "attention", rows, meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
