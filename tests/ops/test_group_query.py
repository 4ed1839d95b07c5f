"""Group-query attention: reference, cascade and the Triton kernel (interpreted on the CPU) equal the definition
(one causal pass per query); reference gradients equal the definition's; the pair count is the mask's size.
Plans: built once per batch, each layer's call over one reads nothing from the device; the LUM forward builds
one plan; the kernel is a torch custom op that passes opcheck and that torch.compile traces around."""

from __future__ import annotations

import ast
import collections
import contextlib
import importlib.util
import inspect
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lum_dist.model import LUMModel, load_preset, modeling
from lum_dist.model.modeling import rotary
from lum_dist.ops import group_query
from lum_dist.ops.group_query import (
    flops,
    group_query_attention,
    group_query_attention_plan,
    group_query_cascade,
    group_query_naive,
    group_query_pairs,
    group_query_reference,
    plan_group_query,
)
from lum_dist.testing.batches import random_packed_batch

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


def interpreter_worker(in_path: str, out_path: str) -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (this file imported by path): every interpreted section,
    each result or its traceback saved to out_path, so that one failing section fails only its own tests."""
    from lum_dist.kernels.group_attention import group_attention_fwd

    def kernel():
        return [group_attention_fwd(c["q"], c["k"], c["v"], c["cu"], c["nq"], c["scale"], c["block"], c["block"],
                                    c["loaded"]) for c in torch.load(in_path)]

    sections = {"kernel": kernel, "plan": _interpreted_plans, "opcheck": _interpreted_opcheck,
                "compile": _interpreted_compile, "model": _interpreted_model}
    results = {}
    for name, fn in sections.items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - reported by the section's tests
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    """section -> results of interpreter_worker (kernel cases, plans, opcheck, compile, model)."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("group_attention")
    torch.save([{"q": q, "k": k, "v": v, "cu": cu.tolist(), "nq": n.tolist(), "scale": s, "block": b, "loaded": lb}
                for q, k, v, cu, n, s, b, lb in kernel_cases().values()], tmp / "in.pt")
    run = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_gq_worker', sys.argv[1]); "
           "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
           "mod.interpreter_worker(sys.argv[2], sys.argv[3])")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", run, __file__, str(tmp / "in.pt"), str(tmp / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


def section(results: dict, name: str):
    got = results[name]
    if isinstance(got, dict) and "error" in got:
        pytest.fail(f"interpreted section {name!r} raised:\n{got['error']}")
    return got


@pytest.fixture(scope="module")
def interpreted(interpreter_results):
    """name -> (inputs, kernel output) for every kernel case, computed by the Triton interpreter."""
    outs = section(interpreter_results, "kernel")
    return {name: (case, out) for (name, case), out in zip(kernel_cases().items(), outs, strict=True)}


@pytest.mark.parametrize("name", list(kernel_cases()))
def test_kernel_equals_reference(interpreted, name):
    (q, k, v, cu, n, scale, _, _), got = interpreted[name]
    max_len = int((cu[1:] - cu[:-1]).max())
    torch.testing.assert_close(got, group_query_reference(q, k, v, cu, n, max_len, scale), **CPU_TOL)
    if name.startswith("case"):
        torch.testing.assert_close(got, group_query_naive(q, k, v, cu, n, max_len, scale), **CPU_TOL)


# --- Plans: the layout is read and the tile tables built once per batch; each layer's call reads nothing ---

WATCHED = ("ops/group_query.py", "kernels/group_attention.py", "model/modeling.py")
DEVICE_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")  # a sync on CUDA
HOST_DATA = ("tensor", "as_tensor", "from_numpy")  # host data into a tensor: a host->device copy on its way
VOCABS = [7, 5]


@contextlib.contextmanager
def patched(owner, name: str, replacement):
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)  # was inherited (a torch.Tensor method from its C base)


@contextlib.contextmanager
def host_traffic() -> Iterator[collections.Counter]:
    """Counts by name the device reads and host-data tensor constructions made directly by the group-query
    code and the model (WATCHED files); torch internals and other modules are not counted."""
    counts: collections.Counter = collections.Counter()

    def counting(fn, name):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(WATCHED):
                counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with contextlib.ExitStack() as stack:
        for owner, names in ((torch.Tensor, DEVICE_READS), (torch, HOST_DATA)):
            for name in names:
                stack.enter_context(patched(owner, name, counting(getattr(owner, name), name)))
        yield counts


@contextlib.contextmanager
def counting_calls(module, name: str) -> Iterator[list]:
    """Records one entry per call of module.name (a module global, looked up at call time)."""
    calls: list = []
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    with patched(module, name, wrapper):
        yield calls


def plan_layouts() -> dict[str, tuple[list[int], list[int], int, int]]:
    """name -> (sequence lengths, queries per sequence, heads, head dim): histories of 0..200 tokens with
    1..40 queries each, edge cases first, then random packings (seeded: the interpreter worker draws the same)."""
    cases = {"history200-q1": ([201], [1], 2, 64), "no-history": ([40, 3], [40, 3], 1, 32),
             "history200-q40": ([240, 19], [40, 2], 2, 32)}
    g = torch.Generator().manual_seed(2025)
    for i in range(5):
        seqs = int(torch.randint(1, 5, (1,), generator=g))
        hist, nq = torch.randint(0, 201, (seqs,), generator=g), torch.randint(1, 41, (seqs,), generator=g)
        heads = (1, 2, 4)[int(torch.randint(0, 3, (1,), generator=g))]
        cases[f"random{i}"] = ((hist + nq).tolist(), nq.tolist(), heads, (32, 64)[i % 2])
    return cases


def plan_inputs(name: str, layer: int) -> tuple[torch.Tensor, ...]:
    """q, k, v, cu_seqlens, num_queries of one layer of a plan case: fresh q/k/v per layer, one layout."""
    lens, nq, heads, dim = plan_layouts()[name]
    return packed(lens, nq, heads=heads, dim=dim, seed=1000 * layer + list(plan_layouts()).index(name))


def max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max())


@pytest.mark.parametrize("name", list(plan_layouts()))
def test_plan_backends_equal_definition_and_layers_read_nothing(name):
    """One plan per backend serves two layers (fresh q, k, v each); a call over the plan reads nothing from
    the device and copies no host data (in group_query.py: the cascade's varlen history pass is outside)."""
    *_, cu, n = plan_inputs(name, 0)
    plans = {b: plan_group_query(cu, n, max_len(cu), backend=b) for b in ("reference", "cascade", "naive")}
    for layer in (0, 1):
        q, k, v, _, _ = plan_inputs(name, layer)
        want = group_query_naive(q, k, v, cu, n, max_len(cu))
        for backend, plan in plans.items():
            with host_traffic() as traffic:
                got = group_query_attention_plan(q, k, v, plan)
            torch.testing.assert_close(got, want, **CPU_TOL, msg=lambda m, b=backend: f"{b}: {m}")
            assert not traffic, f"{backend}: {dict(traffic)}"


def test_plan_refuses_what_it_does_not_cover():
    q, k, v, cu, n = packed([9, 4], [3, 2])
    plan = plan_group_query(cu, n, 9, backend="reference")
    with pytest.raises(ValueError, match="the plan covers 13 tokens, q has 12"):
        group_query_attention_plan(q[:12], k[:12], v[:12], plan)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        plan_group_query(cu, n, 9, backend="nope")
    with pytest.raises(ValueError, match="sequence 0 has 9 tokens and num_queries=10"):
        plan_group_query(cu, torch.tensor([10, 2]), 9)


@pytest.mark.parametrize("nq,plans", [([3, 1, 5], 1), ([1, 0, 1], 0), ([0, 0, 0], 0)])
def test_model_reads_the_layout_once_per_forward(nq, plans):
    """A 3-layer LUM forward with group queries reads the layout once (one .tolist()) and builds one plan; one
    query per sequence (evaluation) or none (pretraining) is plain causal attention, known on the host from
    ``batch.max_queries``: no device read at all, no plan, the same output."""
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=3)).eval()
    batch = random_packed_batch([12, 6, 9], 60, VOCABS, num_queries=nq, seed=2)
    with (torch.no_grad(), counting_calls(modeling, "read_group_layout") as layouts,
          counting_calls(modeling, "build_group_query_plan") as built, host_traffic() as traffic):
        out = model.forward_batch(batch)
    want = (1, 1, {"tolist": 1}) if plans else (0, 0, {})
    assert (len(layouts), len(built), dict(traffic)) == want
    if not plans:
        with torch.no_grad():
            causal = model(batch.item_ids, batch.cond_ids, batch.token_type, batch.positions, batch.time_gaps,
                           batch.cu_seqlens, batch.max_seqlen, None, batch.numeric)
        torch.testing.assert_close(out, causal, rtol=0, atol=0)


def _interpreted_plans() -> dict:
    """Per plan case and loop-bound variant: the layers' outputs over one Triton plan, what the calls read or
    copied, and how many tile tables they built (none: the plan holds them). Plus an "auto" plan that picked
    Triton, called with gradients (falls back to the reference)."""
    from lum_dist.kernels import group_attention as plan_kernels

    results = {}
    for name in plan_layouts():
        *_, cu, n = plan_inputs(name, 0)
        for loaded in (True, False):
            plan = plan_group_query(cu, n, max_len(cu), backend="triton", loaded_bounds=loaded)
            # Two layers over one plan; one for the second loop-bound variant (the interpreter is slow).
            layers = [plan_inputs(name, layer)[:3] for layer in ((0, 1) if loaded else (0,))]
            with host_traffic() as traffic, counting_calls(plan_kernels, "tile_table") as tables:
                outs = [group_query_attention_plan(q, k, v, plan) for q, k, v in layers]
            results[f"{name}-{loaded}"] = {"outs": outs, "traffic": dict(traffic), "tables": len(tables),
                                           "backend": plan.backend, "loaded": plan.kernel.loaded_bounds}
    q, k, v, cu, n = packed([11, 3, 7], [4, 2, 1], seed=3, grad=True)
    with patched(group_query, "_auto_backend", lambda device, needs_grad: "triton"):
        plan = plan_group_query(cu, n, 11)
    out = group_query_attention_plan(q, k, v, plan)
    out.sum().backward()
    results["auto-grad"] = {"backend": plan.backend, "out": out.detach(), "grads": [x.grad for x in (q, k, v)]}
    return results


@pytest.mark.parametrize("loaded", [True, False], ids=["loadedbounds", "argbounds"])
@pytest.mark.parametrize("name", list(plan_layouts()))
def test_triton_plan_equals_reference_and_layers_read_nothing(interpreter_results, name, loaded):
    res = section(interpreter_results, "plan")[f"{name}-{loaded}"]
    assert (res["backend"], res["loaded"]) == ("triton", loaded)
    assert len(res["outs"]) == (2 if loaded else 1)
    for layer, got in enumerate(res["outs"]):
        q, k, v, cu, n = plan_inputs(name, layer)
        torch.testing.assert_close(got, group_query_reference(q, k, v, cu, n, max_len(cu)), **CPU_TOL)
    assert res["traffic"] == {} and res["tables"] == 0


def test_auto_triton_plan_falls_back_to_the_reference_for_gradients(interpreter_results):
    res = section(interpreter_results, "plan")["auto-grad"]
    q, k, v, cu, n = packed([11, 3, 7], [4, 2, 1], seed=3, grad=True)
    want = group_query_reference(q, k, v, cu, n, 11)
    want.sum().backward()
    assert res["backend"] == "triton"  # chosen for inference; the call needed gradients
    torch.testing.assert_close(res["out"], want.detach(), **CPU_TOL)
    for name, got, x in zip("qkv", res["grads"], (q, k, v), strict=True):
        torch.testing.assert_close(got, x.grad, **CPU_TOL, msg=lambda m, name=name: f"d{name}: {m}")


# --- The kernel as the torch custom op lum_dist::group_attention_fwd ---

def _interpreted_opcheck() -> dict:
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch with dynamic shapes)
    on the op, interpreted, float32: per case "ok" or the failure."""
    from lum_dist.kernels.group_attention import launch_config, tile_tables

    cases = {  # name: (lengths, queries, block, loaded bounds, q/k/v as strided views of one qkv)
        "strided-argbounds": ([20, 7], [6, 2], 16, False, True),
        "loadedbounds": ([33, 9], [5, 9], 16, True, False),
        "queries-only": ([5], [5], 16, True, False),  # no history tile at all
        "history-only": ([9, 4], [0, 0], 32, False, False),  # no query tile at all
    }
    results = {}
    for i, (name, (lens, nq, block, loaded, strided)) in enumerate(cases.items()):
        q, k, v, cu, n = packed(lens, nq, dim=32, seed=i)
        if strided:
            q, k, v = torch.randn(sum(lens), 3, 2, 32, generator=torch.Generator().manual_seed(i)).unbind(1)
        tables = tile_tables(cu.tolist(), n.tolist(), "cpu", block, loaded)
        cfg = launch_config(q.dtype, 32)
        block_n = min(block, cfg.block_n)
        args = (q, k, v, tables.hist, tables.query, 0.25, -(-tables.max_history // block_n), tables.block_m,
                tables.block_q, block_n, tables.loaded_bounds, cfg.num_warps, cfg.num_stages)
        try:
            checks = torch.library.opcheck(torch.ops.lum_dist.group_attention_fwd.default, args)
            results[name] = "ok" if set(checks.values()) == {"SUCCESS"} else str(checks)
        except Exception:  # noqa: BLE001 - the report is the failure
            results[name] = traceback.format_exc()
    return results


def test_custom_op_passes_opcheck(interpreter_results):
    results = section(interpreter_results, "opcheck")
    assert len(results) == 4
    for name, result in results.items():
        assert result == "ok", f"{name}: {result}"


def test_fake_op_gives_the_output_metadata_without_running():
    """register_fake: under FakeTensorMode the op returns a contiguous [T, H, D] of q's dtype (no kernel)."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lum_dist.kernels import group_attention  # noqa: F401 - registers lum_dist::group_attention_fwd

    with FakeTensorMode():
        q, k, v = torch.empty(40, 3, 4, 32).unbind(1)  # strided views, as the model's fused qkv gives
        tiles = torch.empty(3, 4, dtype=torch.int32)
        out = torch.ops.lum_dist.group_attention_fwd(q, k, v, tiles, tiles[:1], 0.2, 2, 16, 16, 16, False, 4, 2)
        assert out.shape == (40, 4, 32) and out.dtype == torch.float32 and out.is_contiguous()
        with pytest.raises(ValueError, match="power of two"):
            torch.ops.lum_dist.group_attention_fwd(q[..., :24], k[..., :24], v[..., :24], tiles, tiles, 0.2, 2, 16,
                                                    16, 16, False, 4, 2)


def _interpreted_compile() -> dict:
    """torch.compile(aot_eager) of a LUM block whose attention is the Triton plan, against the eager block
    over a reference plan; which ops the captured graphs hold and how many frames were compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=1)).eval()
    batch = random_packed_batch([30, 12, 9], 60, VOCABS, num_queries=[6, 12, 2], seed=11)
    x = torch.randn(batch.num_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary(batch.positions, model.config.head_dim, model.config.rope_theta)
    plans = {b: plan_group_query(batch.cu_seqlens, batch.num_queries, batch.max_seqlen, backend=b)
             for b in ("triton", "reference")}
    counter = CompileCounterWithBackend("aot_eager")
    block = model.blocks[0]
    compiled = torch.compile(block, backend=counter, fullgraph=False)
    with torch.no_grad():
        got = compiled(x, cos, sin, batch.cu_seqlens, batch.max_seqlen, plans["triton"])
        want = block(x, cos, sin, batch.cu_seqlens, batch.max_seqlen, plans["reference"])
    ops = sorted({str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"})
    return {"got": got, "want": want, "frames": counter.frame_count, "ops": ops}


def test_torch_compile_traces_a_block_around_the_op(interpreter_results):
    res = section(interpreter_results, "compile")
    torch.testing.assert_close(res["got"], res["want"], **CPU_TOL)
    assert "lum_dist.group_attention_fwd.default" in res["ops"], res["ops"]
    assert res["frames"] == 1, f"graph breaks: {res['frames']} frames"


def _interpreted_model() -> dict:
    """A 3-layer LUM forward with group queries whose auto backend is Triton (as on CUDA), against the same
    forward on the reference; layouts read, plans and tile tables built, reads and copies in our code."""
    from lum_dist.kernels import group_attention as plan_kernels

    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=3)).eval()
    batch = random_packed_batch([40, 9, 25], 60, VOCABS, num_queries=[12, 3, 1], seed=4)
    with torch.no_grad():
        want = model.forward_batch(batch)  # auto on the CPU: the reference
        with (patched(group_query, "_auto_backend", lambda device, needs_grad: "triton"),
              counting_calls(modeling, "build_group_query_plan") as plans,
              counting_calls(plan_kernels, "tile_table") as tables, host_traffic() as traffic):
            got = model.forward_batch(batch)
    return {"got": got, "want": want, "plans": len(plans), "tables": len(tables), "traffic": dict(traffic)}


def test_model_with_the_triton_plan_builds_it_once(interpreter_results):
    res = section(interpreter_results, "model")
    torch.testing.assert_close(res["got"], res["want"], **CPU_TOL)
    # One layout read, one tile-table build and one host->device copy of it, for all three layers.
    assert (res["plans"], res["tables"], res["traffic"]) == (1, 1, {"tolist": 1, "from_numpy": 1})


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
    """The interpreter of Triton 3.6 and older breaks loops bounded by scalars loaded from memory (compiled
    code does not: checked on an H200 with Triton 3.6): such loops may only sit under ``if LOADED_BOUNDS:``,
    which the host turns off there; every other loop is bounded by literals or kernel arguments."""
    pytest.importorskip("triton")
    from lum_dist.kernels.group_attention import loaded_bounds_ok

    assert not loaded_bounds_ok("3.6.0", interpreting=True) and not loaded_bounds_ok("2.3.1", interpreting=True)
    assert loaded_bounds_ok("3.7.0", interpreting=True) and loaded_bounds_ok("3.9.0+git1234", interpreting=True)
    assert loaded_bounds_ok("3.6.0", interpreting=False) and loaded_bounds_ok("4.0", interpreting=False)
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
COMPILE_CASES = [  # (arch, dtype, head dim, query tile, loaded bounds), each at its launch_config
    (90, "bf16", 128, False, True), (90, "bf16", 128, True, False), (90, "fp16", 64, False, False),
    (90, "fp16", 32, True, True), (90, "fp32", 128, False, True), (90, "fp32", 64, True, False),
    (90, "bf16", 256, False, True), (80, "bf16", 64, False, True), (80, "fp16", 128, True, False),
]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("arch,dtype,dim,is_query,loaded", COMPILE_CASES)
def test_kernel_compiles_for_gpus(arch, dtype, dim, is_query, loaded):
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from lum_dist.kernels.group_attention import _group_attention_fwd_kernel, launch_config

    names = list(inspect.signature(_group_attention_fwd_kernel.fn).parameters)
    cfg = launch_config({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype], dim)
    consts = {"HEAD_DIM": dim, "BLOCK_M": 16 if is_query else cfg.block_m, "BLOCK_N": cfg.block_n,
              "IS_QUERY": is_query, "LOADED_BOUNDS": loaded, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = {n: "constexpr" if n in consts else "i32" for n in names}
    sig |= {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}", "Tiles": "*i32", "qk_scale": "fp32"}
    aligned = [n for n in names if n.startswith("stride") or n in ("Q", "K", "V", "Out", "Tiles")]
    src = ASTSource(fn=_group_attention_fwd_kernel, signature=sig,
                    constexprs={(names.index(c),): v for c, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    assert kernel.metadata.shared <= {80: 163, 90: 227}[arch] * 1024  # the architecture's shared memory per block
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layers_over_the_plan_never_sync():
    """Once the plan is built, the rest of a 3-layer LUM forward with group queries runs under CUDA's sync
    debug mode "error": no device read and no synchronising copy in any layer."""
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=3)).eval().to("cuda", torch.bfloat16)
    batch = random_packed_batch([300, 40, 129], 60, VOCABS, num_queries=[64, 3, 100], seed=1).to("cuda")
    build, plans = modeling.build_group_query_plan, []

    def plan_then_forbid_syncs(*args, **kwargs):
        plans.append(build(*args, **kwargs))
        torch.cuda.set_sync_debug_mode("error")
        return plans[-1]

    with torch.no_grad():
        want = model.forward_batch(batch)  # compiles the kernel first
        try:
            with patched(modeling, "build_group_query_plan", plan_then_forbid_syncs):
                got = model.forward_batch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [p.backend for p in plans] == ["triton"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inductor_compiles_a_block_around_the_op():
    torch.manual_seed(0)
    model = LUMModel(load_preset("lum-tiny", 60, VOCABS, num_layers=1)).eval().to("cuda", torch.bfloat16)
    batch = random_packed_batch([300, 40, 129], 60, VOCABS, num_queries=[64, 3, 100], seed=1).to("cuda")
    x = torch.randn(batch.num_tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    cos, sin = rotary(batch.positions, model.config.head_dim, model.config.rope_theta)
    plan = plan_group_query(batch.cu_seqlens, batch.num_queries, batch.max_seqlen)
    assert plan.backend == "triton"
    block = model.blocks[0]
    with torch.no_grad():
        got = torch.compile(block, fullgraph=True)(x, cos, sin, batch.cu_seqlens, batch.max_seqlen, plan)
        want = block(x, cos, sin, batch.cu_seqlens, batch.max_seqlen, plan)
    torch.testing.assert_close(got.float(), want.float(), **GPU_TOL)
