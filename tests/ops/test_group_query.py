"""Group-query attention: reference, cascade and the Triton kernel (interpreted on the CPU) equal the definition
(one causal pass per query); reference gradients equal the definition's; the pair count is the mask's size."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lum_dist.ops.group_query import (
    flops,
    group_query_attention,
    group_query_cascade,
    group_query_naive,
    group_query_pairs,
    group_query_reference,
)

ROOT = Path(__file__).resolve().parents[2]
KERNEL_PATH = ROOT / "kernels" / "group_attention.py"
BENCH_PATH = ROOT / "benchmarks" / "group_query.py"
CPU_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 everywhere: only the summation order differs
GPU_TOL = {"rtol": 2e-2, "atol": 2e-2}  # fp16/bf16 inputs (p rounded to the input dtype before PV), fp32 reference

# (sequence lengths, queries per sequence): edge cases first.
CASES = [
    ([9], [0]),  # Q = 0: plain causal attention
    ([1], [0]),  # one token
    ([2], [1]),  # L = 1, one query
    ([5], [5]),  # L = 0: each query sees only itself
    ([40], [7]),  # one user, several tiles
    ([37, 1, 5, 20, 3, 16], [2, 1, 0, 17, 3, 0]),  # several users per row, lengths off the block size
]


def packed(lens, nq, heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), heads, dim, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return q, k, v, cu.to(device), torch.tensor(nq, dtype=torch.int32, device=device)


def allowed(lens, nq) -> torch.Tensor:
    """bool [T, T] by the definition, for counting pairs only (tests build it; the op never does)."""
    T = sum(lens)
    mask = torch.zeros(T, T, dtype=torch.bool)
    a = 0
    for n, q in zip(lens, nq, strict=True):
        h = a + n - q
        for i in range(a, a + n):
            mask[i, a:min(i + 1, h)] = True
            mask[i, i] = True
        a += n
    return mask


@pytest.mark.parametrize("lens,nq", CASES)
def test_reference_and_cascade_equal_definition(lens, nq):
    q, k, v, cu, n = packed(lens, nq)
    want = group_query_naive(q, k, v, cu, n, max(lens))
    torch.testing.assert_close(group_query_reference(q, k, v, cu, n, max(lens)), want, **CPU_TOL)
    torch.testing.assert_close(group_query_cascade(q, k, v, cu, n, max(lens)), want, **CPU_TOL)
    # auto on the CPU is the reference; a custom scale reaches every backend.
    torch.testing.assert_close(group_query_attention(q, k, v, cu, n, max(lens), 0.3),
                               group_query_naive(q, k, v, cu, n, max(lens), 0.3), **CPU_TOL)


@settings(max_examples=20, deadline=None)
@given(seqs=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)).filter(lambda t: sum(t) > 0), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_random_packings_equal_definition(seqs, seed):
    lens, nq = [h + q for h, q in seqs], [q for _, q in seqs]
    q, k, v, cu, n = packed(lens, nq, seed=seed)
    want = group_query_naive(q, k, v, cu, n, max(lens))
    torch.testing.assert_close(group_query_reference(q, k, v, cu, n, max(lens)), want, **CPU_TOL)
    torch.testing.assert_close(group_query_cascade(q, k, v, cu, n, max(lens)), want, **CPU_TOL)


def test_query_output_ignores_other_queries():
    """Changing query 0's q/k/v changes nothing else: queries are isolated from each other."""
    lens, nq = [10, 6], [4, 3]
    q, k, v, cu, n = packed(lens, nq)
    before = group_query_reference(q, k, v, cu, n, 10)
    for x in (q, k, v):
        x[6] += 5.0  # query 0 of sequence 0
    after = group_query_reference(q, k, v, cu, n, 10)
    changed = (before - after).abs().amax((1, 2)) > 0
    assert changed.tolist() == [i == 6 for i in range(16)]


def test_reference_gradients_equal_definition():
    lens, nq = [11, 3, 7], [4, 2, 0]
    grads = []
    for fn in (group_query_reference, group_query_naive):
        q, k, v, cu, n = packed(lens, nq, seed=3, grad=True)
        out = fn(q, k, v, cu, n, 11)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * w).sum().backward()
        grads.append([x.grad for x in (q, k, v)])
    for name, a, b in zip("qkv", *grads, strict=True):
        torch.testing.assert_close(a, b, **CPU_TOL, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("lens,nq", CASES)
def test_pairs_is_the_mask_size(lens, nq):
    want = int(allowed(lens, nq).sum())
    assert sum(group_query_pairs(n - q, q) for n, q in zip(lens, nq, strict=True)) == want
    assert sum(flops(n - q, q, 3, 8) for n, q in zip(lens, nq, strict=True)) == 4 * want * 3 * 8


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: unfused, fine here
def test_benchmark_baselines_equal_reference():
    """The benchmark's dense-mask SDPA and FlexAttention block mask express the same mask as the op."""
    spec = importlib.util.spec_from_file_location("_group_query_bench", BENCH_PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lens, nq = [9, 2, 6], [3, 1, 0]
    q, k, v, cu, n = packed(lens, nq)
    assert torch.equal(bench.dense_mask(cu, n), allowed(lens, nq))
    want = group_query_reference(q, k, v, cu, n, 9)
    for name, fn in bench.methods(q, k, v, cu, n, 9, ["sdpa", "flex", "cascade"]).items():
        torch.testing.assert_close(fn(), want, **CPU_TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_inputs_raise_clear_errors():
    q, k, v, cu, n = packed([5, 4], [1, 1])
    with pytest.raises(ValueError, match="sequence 1 has 4 tokens and num_queries=5"):
        group_query_attention(q, k, v, cu, torch.tensor([1, 5]), 5)
    with pytest.raises(ValueError, match="num_queries has 1 entries for 2 sequences"):
        group_query_attention(q, k, v, cu, torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        group_query_attention(q, k, v, cu, n, 5, backend="nope")
    with pytest.raises(ValueError, match="from 0 to T=9"):
        group_query_attention(q, k, v, torch.tensor([0, 5, 8], dtype=torch.int32), n, 5)
    q.requires_grad_()
    with pytest.raises(ValueError, match="forward-only"):
        group_query_attention(q, k, v, cu, n, 5, backend="triton")


# --- Triton kernel, interpreted on the CPU (float32: the interpreter computes bf16 dots wrongly) ---
# TRITON_INTERPRET must be set before triton itself is imported (its own @jit helpers are decorated then),
# and this pytest process may have imported it already: every kernel case runs in ONE subprocess.

_WORKER = """
import sys, torch
from lum_dist.kernels.group_attention import group_attention_fwd
cases = torch.load(sys.argv[1])
torch.save([group_attention_fwd(c["q"], c["k"], c["v"], c["cu"], c["nq"], c["scale"], c["block"], c["block"], c["loaded"])
            for c in cases], sys.argv[2])
"""


def kernel_cases() -> dict[str, tuple]:
    """name -> (q, k, v, cu, num_queries, scale, block, loaded_bounds): edge cases, head dims, block sizes,
    random packings, each loop-bound variant (None: the one this Triton picks)."""
    cases = {name: (*case, None) for name, case in _kernel_inputs().items()}
    cases |= {f"{name}-argbounds": (*case, False) for name, case in _kernel_inputs().items()
              if name.startswith(("case", "random", "fewq"))}
    return cases


def _kernel_inputs() -> dict[str, tuple]:
    cases = {}
    for i, (lens, nq) in enumerate(CASES):
        cases[f"case{i}"] = (*packed(lens, nq, dim=32, seed=i), 0.25, 16)
    for dim in (32, 64, 128):
        for block in (16, 32):
            cases[f"dim{dim}-block{block}"] = (*packed([23, 9, 18], [5, 0, 17], dim=dim, seed=dim), dim ** -0.5, block)
    # few queries: query tiles of 16 rows beside 32-row history tiles
    cases["fewq-block32"] = (*packed([40, 30, 9], [1, 3, 2], dim=32, seed=7), 0.25, 32)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        hist = torch.randint(0, 40, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        nq = torch.randint(0, 20, hist.shape, generator=g)
        nq[hist + nq == 0] = 1
        cases[f"random{seed}"] = (*packed((hist + nq).tolist(), nq.tolist(), seed=seed), 0.25, 16)
    # q, k, v as views of one fused qkv projection (the model's layout): strided, not contiguous.
    q, k, v = torch.randn(27, 3, 2, 32, generator=torch.Generator().manual_seed(9)).unbind(1)
    cases["strided"] = (q, k, v, *packed([20, 7], [6, 2])[3:], 0.2, 16)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """name -> (inputs, kernel output) for every kernel case, computed by the Triton interpreter."""
    pytest.importorskip("triton")
    cases = kernel_cases()
    tmp = tmp_path_factory.mktemp("group_attention")
    torch.save([{"q": q, "k": k, "v": v, "cu": cu.tolist(), "nq": n.tolist(), "scale": s, "block": b, "loaded": lb}
                for q, k, v, cu, n, s, b, lb in cases.values()], tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp / "in.pt"), str(tmp / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = torch.load(tmp / "out.pt")
    return {name: (case, out) for (name, case), out in zip(cases.items(), outs, strict=True)}


@pytest.mark.parametrize("name", list(kernel_cases()))
def test_kernel_equals_reference(interpreted, name):
    (q, k, v, cu, n, scale, _, _), got = interpreted[name]
    max_len = int((cu[1:] - cu[:-1]).max())
    torch.testing.assert_close(got, group_query_reference(q, k, v, cu, n, max_len, scale), **CPU_TOL)
    if name.startswith("case"):
        torch.testing.assert_close(got, group_query_naive(q, k, v, cu, n, max_len, scale), **CPU_TOL)


def test_tile_table_covers_rows_once_and_stays_below_the_diagonal():
    pytest.importorskip("triton")
    from lum_dist.kernels.group_attention import tile_table

    cu, nq = [0, 37, 38, 43, 63], [2, 1, 0, 17]
    hist, qry = tile_table(cu, nq, 16, 8)
    assert max(t[2] - t[1] for t in hist) == 16 and max(t[2] - t[1] for t in qry) == 8
    rows = sorted(r for t in (*hist, *qry) for r in range(t[1], t[2]))
    assert rows == list(range(cu[-1]))
    for start, r0, r1, h in hist:
        assert start <= r0 < r1 <= h  # a history tile's keys end at its last row: the diagonal
    for start, r0, r1, h in qry:
        assert h <= r0 < r1 <= start + (cu[cu.index(start) + 1] - start)  # query tiles hold queries only


def test_loaded_loop_bounds_only_where_triton_handles_them():
    """Triton 3.6 (the GPU machine) breaks loops bounded by scalars loaded from memory: such loops may only
    sit under ``if LOADED_BOUNDS:``, which the host enables from Triton 3.7 on; every other loop is
    bounded by literals or kernel arguments."""
    pytest.importorskip("triton")
    from lum_dist.kernels.group_attention import loaded_bounds_ok

    assert not loaded_bounds_ok("3.6.0") and not loaded_bounds_ok("2.3.1")
    assert loaded_bounds_ok("3.7.0") and loaded_bounds_ok("3.9.0+git1234") and loaded_bounds_ok("4.0")
    tree = ast.parse(KERNEL_PATH.read_text())
    kernel = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_group_attention_fwd_kernel")
    params = {a.arg for a in kernel.args.args}
    gated = {id(n) for g in ast.walk(kernel) if isinstance(g, ast.If) and ast.unparse(g.test) == "LOADED_BOUNDS"
             for stmt in g.body for n in ast.walk(stmt)}
    loops = [n for n in ast.walk(kernel) if isinstance(n, ast.For)]
    assert 0 < sum(id(n) in gated for n in loops) < len(loops)
    for loop in loops:
        if id(loop) in gated:
            continue
        for arg in loop.iter.args:
            names = {n.id for n in ast.walk(arg) if isinstance(n, ast.Name)}
            assert names <= params, f"loop bound {ast.unparse(arg)} uses non-arguments {names - params}"


# Compile (no GPU needed: Triton ships ptxas) for sm_90 / sm_80 with the pointer/stride alignment a real
# launch specialises on; the loaded-bound variant must software-pipeline its K/V loads (cp.async).
COMPILE_CASES = [  # (arch, dtype, head dim, query tile, loaded bounds)
    (90, "bf16", 128, False, True), (90, "bf16", 128, True, False), (90, "fp16", 64, False, False),
    (90, "fp16", 32, True, True), (90, "fp32", 128, False, True), (90, "fp32", 64, True, False),
    (80, "bf16", 64, False, True), (80, "fp16", 128, True, False),
]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("arch,dtype,dim,is_query,loaded", COMPILE_CASES)
def test_kernel_compiles_for_gpus(arch, dtype, dim, is_query, loaded):
    pytest.importorskip("triton")
    from lum_dist.kernels.group_attention import BLOCK_M, BLOCK_N, _group_attention_fwd_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = list(inspect.signature(_group_attention_fwd_kernel.fn).parameters)
    consts = {"HEAD_DIM": dim, "BLOCK_M": 16 if is_query else BLOCK_M, "BLOCK_N": 32 if dtype == "fp32" else BLOCK_N,
              "IS_QUERY": is_query, "LOADED_BOUNDS": loaded, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = {n: "constexpr" if n in consts else "i32" for n in names}
    sig |= {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}", "Tiles": "*i32", "qk_scale": "fp32"}
    aligned = [n for n in names if n.startswith("stride") or n in ("Q", "K", "V", "Out", "Tiles")]
    src = ASTSource(fn=_group_attention_fwd_kernel, signature=sig,
                    constexprs={(names.index(c),): v for c, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    kernel = compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8 if dim > 64 else 4, "num_stages": 2})
    assert kernel.metadata.shared <= 160 * 1024
    if loaded:
        assert "async_copy_global_to_local" in kernel.asm["ttgir"]


# --- GPU (compiled kernel, half precision) ---

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("backend", ["triton", "cascade"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_equal_reference(backend, dtype, dim):
    lens, nq = [300, 65, 1, 130, 700], [64, 1, 0, 129, 3]
    q, k, v, cu, n = packed(lens, nq, heads=4, dim=dim, dtype=dtype, device="cuda", seed=dim)
    got = group_query_attention(q, k, v, cu, n, max(lens), backend=backend)
    want = group_query_reference(q, k, v, cu, n, max(lens))
    tol = CPU_TOL if dtype == torch.float32 and backend == "triton" else GPU_TOL
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_is_triton_without_grad_and_reference_with_grad():
    q, k, v, cu, n = packed([50, 20], [10, 5], dtype=torch.bfloat16, device="cuda", grad=True)
    with torch.no_grad():
        torch.testing.assert_close(group_query_attention(q, k, v, cu, n, 50),
                                   group_query_attention(q, k, v, cu, n, 50, backend="triton"), rtol=0, atol=0)
    out = group_query_attention(q, k, v, cu, n, 50)
    out.float().sum().backward()
    torch.testing.assert_close(out, group_query_reference(q, k, v, cu, n, 50), rtol=0, atol=0)
