"""Every GPU figure of lum-dist in one command on one lent H100/H200 (issue #14), with a CPU dry run.

    python benchmarks/gpu_check.py             # CUDA: bf16, paper-like shapes, --budget-s 500 by default
    python benchmarks/gpu_check.py --dry-run   # CPU: the same code paths, tiny shapes, 1-2 steps

Sections, in this order (``--sections`` picks and orders them; the dry run collects the GPU tests last,
its collection started first so that it overlaps the rest):

  env          device, driver, memory, peak bf16 FLOP/s (lum_dist.train.monitor), library versions, commit
  pytest       ``pytest -m gpu`` over the test files that carry a GPU mark: pass/fail counts and the failed
               ids (dry run: ``--collect-only``, the count of collected GPU tests)
  attention    packed causal attention, forward + backward, per backend: flash (when installed),
               torch_varlen, flex, sdpa (benchmarks/attention.py)
  group_query  group-query forward per method: triton, flex, cascade, naive, dense-mask sdpa, at histories
               of ~2k tokens and 16..256 queries (benchmarks/group_query.py), checked against the float32
               reference
  train        lum-1b .. lum-19m (largest first), a few ZeRO-3 steps each on one device through the real
               trainer (benchmarks/train_throughput.py): tokens/s, TFLOP/s, MFU and peak memory as the trainer
               reports them, beside the memory model's prediction (lum_dist.scaling.memory)

Each section is recorded even when another fails. attention and group_query run in a child process
each, killed with everything it started at the section's time limit (a CUDA fault or a hung compile
costs that section only); pytest and every training run are processes of their own too. A section
starts only if the time left of ``--budget-s`` allows it, and within a section a case starts only if
it still fits; what does not is listed as skipped, with the reason. Backends a device lacks are listed
as skipped too. The results are rewritten after every section and every training run, so a run
killed from outside leaves what it finished:

    benchmarks/results/gpu/<name>.json   {"meta": {...}, "sections": {name: {status, rows, ...}}}
    benchmarks/results/gpu/<name>.md     the same as markdown tables

with ``$LUM_BENCH_RESULTS`` in place of ``benchmarks/results`` when set, and <name> the device
(e.g. ``nvidia-h200``) or ``dry-run``. The exit status is 1 when a section failed or timed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The benchmark scripts beside this one, and this checkout's lum_dist even where it is not installed (a bare
# GPU machine); the children (pytest, training runs, sections) get the checkout through PYTHONPATH in main().
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import attention as attention_bench  # noqa: E402
import group_query as gq_bench  # noqa: E402
import train_throughput as train_bench  # noqa: E402
from common import RESULTS, print_table, provenance  # noqa: E402

from lum_dist.data.prepare import load_meta, prepare  # noqa: E402
from lum_dist.ops.attention import available_backends  # noqa: E402
from lum_dist.ops.group_query import flops as gq_flops  # noqa: E402
from lum_dist.ops.group_query import group_query_reference  # noqa: E402
from lum_dist.scaling.grid import LauncherConfig  # noqa: E402
from lum_dist.scaling.memory import GiB, TrainSetup, per_gpu_bytes, shape_from_preset  # noqa: E402
from lum_dist.train.monitor import peak_flops, read_metrics  # noqa: E402
from lum_dist.utils import atomic_write_text, format_number  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "pytest", "attention", "group_query", "train")
DRY_ORDER = ("env", "attention", "group_query", "train", "pytest")
CHILD_SECTIONS = ("attention", "group_query")  # run in a child process each
ATTENTION_BACKENDS = ("flash", "torch_varlen", "flex", "sdpa")
GQ_METHODS = ("triton", "flex", "cascade", "naive", "sdpa")
VERSIONED = ("torch", "triton", "deepspeed", "flash-attn", "numpy", "transformers", "pytest")
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b)", re.M)


# ---------------------------------------------------------------------------------------------
# what to run


@dataclass(frozen=True)
class Plan:
    """Shapes and limits of one check: the GPU run or its CPU dry run (same code, other numbers)."""

    dry_run: bool
    dtype: str  # "bfloat16" on CUDA; "float32" on the CPU (some CPU kernels lack bf16)
    warmup: int
    iters: int
    attn_cases: tuple[tuple[int, int, int], ...]  # (packed tokens, heads, head dim)
    attn_median: int  # median behaviours per user (two tokens each)
    attn_max_seq_len: int
    gq_cases: tuple[tuple[int, int, int, int], ...]  # (history tokens L, queries Q, heads, head dim)
    gq_row_tokens: int  # users per case = max(2, this // (L + Q))
    gq_max_sdpa_tokens: int  # the dense [T, T] mask is skipped above this
    presets: tuple[str, ...]
    train_config: str  # base pretraining config
    train_seq_len: int
    train_tokens: int  # tokens per step: one packed row
    train_steps: int  # the trainer skips the first in its tokens/s
    train_data: dict[str, Any]  # the synthetic dataset (lum_dist.data.prepare source)
    caps: dict[str, float]  # section -> most seconds it may take
    min_s: dict[str, float]  # section -> fewest seconds worth starting it with
    train_run_min_s: float  # fewest seconds worth starting one training run with


GPU_PLAN = Plan(
    dry_run=False, dtype="bfloat16", warmup=3, iters=10,
    # head dim 128 (lum-1b) first, 64 (lum-19m) last: each head dim costs a Flex compile, which the budget
    # may cut
    attn_cases=((8192, 16, 128), (32768, 16, 128), (8192, 8, 64)), attn_median=40, attn_max_seq_len=2048,
    gq_cases=tuple((2048, q, h, d) for h, d in ((16, 128), (8, 64)) for q in (16, 64, 256)),
    gq_row_tokens=16384, gq_max_sdpa_tokens=20000,
    # largest first: if the budget runs short, it is the small presets that are skipped
    presets=("lum-1b", "lum-300m", "lum-100m", "lum-19m"), train_config="configs/pretrain/synthetic.yaml",
    train_seq_len=4096, train_tokens=16384, train_steps=8,
    train_data={"format": "synthetic", "num_users": 5000, "num_items": 100000, "num_categories": 200,
                "max_len": 2048, "median_len": 100},
    caps={"env": 60, "pytest": 120, "attention": 100, "group_query": 120, "train": math.inf},
    min_s={"env": 0, "pytest": 30, "attention": 30, "group_query": 30, "train": 60}, train_run_min_s=40,
)

DRY_PLAN = Plan(
    dry_run=True, dtype="float32", warmup=1, iters=2,
    attn_cases=((256, 2, 16),), attn_median=8, attn_max_seq_len=64,
    gq_cases=((16, 4, 2, 16),), gq_row_tokens=64, gq_max_sdpa_tokens=20000,
    presets=("lum-tiny",), train_config="configs/pretrain/debug-cpu.yaml",
    train_seq_len=64, train_tokens=256, train_steps=2,
    train_data={"format": "synthetic", "num_users": 300, "num_items": 200, "num_categories": 8},
    caps={"env": 60, "pytest": 120, "attention": 60, "group_query": 60, "train": 180},
    min_s={"env": 0, "pytest": 1, "attention": 1, "group_query": 1, "train": 1}, train_run_min_s=1,
)


def plan_device(plan: Plan) -> torch.device:
    return torch.device("cpu" if plan.dry_run else "cuda")


# ---------------------------------------------------------------------------------------------
# time and processes


class Clock:
    """Seconds left of a budget (monotonic)."""

    def __init__(self, seconds: float, now: Callable[[], float] = time.monotonic):
        self.now, self.end = now, now() + seconds

    def left(self) -> float:
        return self.end - self.now()


def section_limit(left: float, cap: float, min_s: float) -> float | None:
    """Seconds a section may run: its cap or the time left, whichever is smaller; None if under ``min_s`` are
    left (or none at all). ``min_s`` 0 marks a section that always runs (env: queries, no device work)."""
    if min_s <= 0:
        return min(cap, max(left, 0.0))
    return None if left < min_s or left <= 0 else min(cap, left)


def case_fits(left: float, last_s: float | None, floor_s: float) -> bool:
    """Start a case only if the time left covers the same kind's last duration (or ``floor_s`` before one)."""
    return left >= max(floor_s, last_s or 0.0)


def start_process(cmd: list[str], stdout: Any = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` from the repository root in a session of its own: it can be killed with all it starts
    (compile workers too)."""
    stderr = subprocess.STDOUT if stdout else None
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """``proc``'s exit status, or None when it was still running after ``timeout`` seconds and was killed."""
    try:
        return proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: the process and everything it started
        except ProcessLookupError:  # it ended in between
            pass
        proc.wait()


def run_process(cmd: list[str], timeout: float, stdout: Any = None,
                env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` (see start_process) for at most ``timeout`` seconds: its exit status, None when killed."""
    return wait_or_kill(start_process(cmd, stdout, env), timeout)


def exit_text(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Record:
    """What one section produced: table rows, skipped cases and errors (each with its reason), notes."""

    status: str = "pending"  # ok | failed | timed out | skipped
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    on_update: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.update()

    def skip(self, why: str) -> None:
        print(f"[gpu_check]   skipped {why}", flush=True)
        self.skipped.append(why)

    def fail(self, why: str) -> None:
        print(f"[gpu_check]   ERROR {why}", flush=True)
        self.errors.append(why)
        self.update()

    def update(self) -> None:
        if self.on_update is not None:
            self.on_update()

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": round(self.seconds, 1), "errors": self.errors,
                "skipped": self.skipped, "meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        keys = ("status", "seconds", "rows", "skipped", "errors", "meta")
        return cls(**{k: data[k] for k in keys if k in data})


def uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same keys, every key in order of first appearance (missing values and None empty)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: "" if r.get(c) is None else r[c] for c in cols} for r in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    rows = uniform(rows)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_number(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


TITLES = {"env": "Environment", "pytest": "pytest -m gpu",
          "attention": "Packed causal attention, forward + backward",
          "group_query": "Group-query attention, forward", "train": "Training throughput, ZeRO-3, one device"}


def to_markdown(meta: dict[str, Any], sections: dict[str, Record]) -> str:
    out = [f"# lum-dist GPU check: {meta['device']}{' (dry run)' if meta['dry_run'] else ''}", ""]
    if meta["dry_run"]:
        out += ["The CPU dry run of `benchmarks/gpu_check.py`: the GPU run's code paths at tiny shapes, "
                "float32, 1-2 steps. Its numbers show that the paths work; they measure nothing.", ""]
    keys = ("git_commit", "runs", "timestamp", "python", "budget_s", "seconds")
    out += [f"- {k}: {meta[k]}" for k in keys if k in meta]
    installed = meta.get("versions", {}).items()
    out += ["- versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in installed)]
    for name, rec in sections.items():
        out += ["", f"## {TITLES.get(name, name)}: {rec.status} ({rec.seconds:.0f} s)", ""]
        out += [f"- {k}: {v}" for k, v in rec.meta.items() if k != "output_tail"]
        out += [f"- skipped: {s}" for s in rec.skipped]
        out += [f"- **error**: {e.splitlines()[0] if e else e}" for e in rec.errors]
        if rec.rows:
            out += ["", markdown_table(rec.rows)]
        for text in [rec.meta.get("output_tail", ""), *(e for e in rec.errors if "\n" in e)]:
            if text:
                out += ["", "```", text, "```"]
    return "\n".join(out) + "\n"


@dataclass
class Report:
    meta: dict[str, Any]
    sections: dict[str, Record]
    json_path: Path
    md_path: Path

    def write(self) -> None:
        """Rewrite both files (atomically: a reader never sees half a file)."""
        data = {"meta": self.meta, "sections": {k: r.to_dict() for k, r in self.sections.items()}}
        atomic_write_text(self.json_path, json.dumps(data, indent=2, default=str) + "\n")
        atomic_write_text(self.md_path, to_markdown(self.meta, self.sections))


# ---------------------------------------------------------------------------------------------
# the sections


def env_section(plan: Plan, rec: Record, limit: float) -> None:
    device = plan_device(plan)
    peak = peak_flops(device)  # the MFU denominator the trainer uses (None on the CPU / unknown GPUs)
    rec.meta.update(device=provenance()["device"], cuda=torch.version.cuda, dry_run=plan.dry_run,
                    peak_bf16_tflops=None if peak is None else peak / 1e12,
                    lum_dist_kernels=_importable("lum_dist.kernels.group_attention"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.meta["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
        rec.meta["multiprocessors"] = props.multi_processor_count
        rec.meta["capability"] = f"{props.major}.{props.minor}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        rec.meta["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


def versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_test_files(tests: Path) -> list[Path]:
    """Test modules with a GPU mark (collecting only these is much faster than collecting the suite)."""
    return sorted(p for p in tests.rglob("test_*.py") if GPU_MARK.search(p.read_text(errors="replace")))


def parse_pytest_output(text: str) -> dict[str, Any]:
    """Counts from pytest's summary line (passed, failed, skipped, errors, deselected, collected) and the
    ids of failed / erroring tests from its short summary (``-rfE``)."""
    counts: dict[str, Any] = {}
    collected = re.findall(r"^(\d+)(?:/\d+)? tests? collected", text, re.M)
    if collected:
        counts["collected"] = int(collected[-1])
    outcome = r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)"
    summary = [ln for ln in text.splitlines() if re.search(outcome, ln) or re.search(r"\bno tests ran\b", ln)]
    if summary:
        for n, what in re.findall(outcome, summary[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    counts["failed_ids"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    return counts


class PytestRun:
    """``pytest -m gpu`` over the GPU-marked test files (dry run: ``--collect-only``), started when made;
    ``finish`` waits for it and records the outcome. The dry run starts it first, so that collection
    (seconds of imports, no device) overlaps the other sections; the GPU run starts it at its turn."""

    def __init__(self, plan: Plan, log_dir: Path | None = None):
        self.files = gpu_test_files(REPO / "tests")
        self.log_dir = log_dir
        self.collect_only = plan.dry_run
        self.cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors", *(["--collect-only"] if self.collect_only else []),
                    *(str(f.relative_to(REPO)) for f in self.files)]
        self.log = tempfile.TemporaryFile("w+")
        self.t0 = time.monotonic()
        self.proc = start_process(self.cmd, self.log, os.environ.copy()) if self.files else None

    def finish(self, rec: Record, limit: float) -> None:
        rec.meta.update(command=" ".join(["python", *self.cmd[1:]]), files=len(self.files),
                        collect_only=self.collect_only)
        if self.proc is None:
            rec.fail("no test file carries a GPU mark")
            return
        rc = wait_or_kill(self.proc, limit)
        rec.meta["process_s"] = round(time.monotonic() - self.t0, 1)  # from its start (the dry run's: early)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        if self.log_dir is not None:
            atomic_write_text(self.log_dir / "pytest.log", text)
        counts = parse_pytest_output(text)
        rec.meta.update({k: v for k, v in counts.items() if k != "failed_ids"})
        rec.rows = [{"test": t, "outcome": "failed"} for t in counts["failed_ids"]]
        print(tail(text, 15), flush=True)
        if rc is None:
            rec.status = "timed out"
            rec.errors.append(f"pytest killed after {limit:.0f} s")
        elif rc != 0:
            rec.fail(f"pytest: {exit_text(rc)}")
        if rc != 0:
            rec.meta["output_tail"] = tail(text, 40)

    def cancel(self) -> None:
        if self.proc is not None:
            kill(self.proc)
        self.log.close()


def backend_skip_reason(backend: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "needs CUDA"
    return "flash-attn is not installed" if backend == "flash" else "not available in this torch"


def attention_section(plan: Plan, rec: Record, clock: Clock) -> None:
    device, dtype = plan_device(plan), getattr(torch, plan.dtype)
    have = available_backends(device)
    run = [b for b in ATTENTION_BACKENDS if b in have]
    for b in ATTENTION_BACKENDS:
        if b not in have:
            rec.skip(f"{b}: {backend_skip_reason(b, device)}")
    args = argparse.Namespace(median=plan.attn_median, max_seq_len=plan.attn_max_seq_len, seed=0,
                              warmup=plan.warmup, iters=plan.iters, max_sdpa_tokens=math.inf)
    rec.meta.update(flop_formula=attention_bench.FLOP_FORMULA, dtype=plan.dtype,
                    cases=f"(tokens, heads, head dim) {list(plan.attn_cases)}",
                    median_behaviours=plan.attn_median, max_seq_len=plan.attn_max_seq_len,
                    max_abs_diff="against the float32 reference backend")
    last: dict[str, float] = {}
    for tokens, heads, dim in plan.attn_cases:
        where = f"T={tokens} H={heads} D={dim}"
        try:
            case = attention_bench.make_case(tokens, heads, dim, args, device, dtype)
        except Exception as e:
            rec.fail(f"{where}: inputs / reference: {type(e).__name__}: {e}")
            continue
        for backend in run:
            if not case_fits(clock.left(), last.get(backend), 1.0):
                rec.skip(f"{backend} {where}: budget ({clock.left():.0f} s left)")
                continue
            t0 = time.monotonic()
            try:
                row = attention_bench.measure_backend(case, backend, args)
            except Exception as e:
                rec.fail(f"{backend} {where}: {type(e).__name__}: {str(e)[:300]}")
                continue
            finally:
                last[backend] = time.monotonic() - t0
            if row is None:
                rec.skip(f"{backend} {where}: over attention.py's sdpa token limit")
                continue
            print(f"[gpu_check]   attention {backend} {where}: {row['tokens_per_s']:,.0f} tok/s", flush=True)
            rec.add(row)
        del case
        _free(device)


def group_query_section(plan: Plan, rec: Record, clock: Clock) -> None:
    device, dtype = plan_device(plan), getattr(torch, plan.dtype)
    methods = [m for m in GQ_METHODS if m != "triton" or device.type == "cuda"]
    if "triton" not in methods:
        rec.skip("triton: needs CUDA (the kernel is tested interpreted on the CPU by tests/ops)")
    args = argparse.Namespace(warmup=plan.warmup, iters=plan.iters)
    peak = gq_bench.matmul_peak_tflops(device)
    rec.meta.update(flop_formula=gq_bench.FLOP_FORMULA, dtype=plan.dtype, matmul_peak_tflops_bf16=peak,
                    cases=f"(L, Q, heads, head dim) {list(plan.gq_cases)}", row_tokens=plan.gq_row_tokens,
                    max_abs_diff=f"against the float32 reference; agrees: within {gq_bench.MAX_DIFF[dtype]}")
    last: dict[str, float] = {}
    for L, Q, heads, dim in plan.gq_cases:
        users = max(2, plan.gq_row_tokens // (L + Q))
        where = f"L={L} Q={Q} H={heads} D={dim}"
        shape = {"L": L, "Q": Q, "users": users, "heads": heads, "head_dim": dim}
        try:
            q, k, v, cu, nq = gq_bench.packed(L, Q, users, heads, dim, device, dtype)
            with torch.no_grad():
                check = group_query_reference(q, k, v, cu, nq, L + Q).float()
        except Exception as e:
            rec.fail(f"{where}: inputs / reference: {type(e).__name__}: {e}")
            continue
        rows = []
        for m in methods:
            if m == "sdpa" and users * (L + Q) > plan.gq_max_sdpa_tokens:
                rec.skip(f"sdpa {where}: dense mask over {users * (L + Q)} tokens")
                continue
            if not case_fits(clock.left(), last.get(m), 1.0):
                rec.skip(f"{m} {where}: budget ({clock.left():.0f} s left)")
                continue
            t0 = time.monotonic()
            try:
                fn = gq_bench.method_fn(m, q, k, v, cu, nq, L + Q)
                work = users * gq_flops(L, Q, heads, dim)
                row = gq_bench.measure_method(m, fn, work, args, device, peak, check)
            except Exception as e:
                rec.fail(f"{m} {where}: {type(e).__name__}: {str(e)[:300]}")
                continue
            finally:
                last[m] = time.monotonic() - t0
            agrees = row["max_abs_diff"] <= gq_bench.MAX_DIFF[dtype]
            rows.append({"method": m, **shape, **row, "agrees": agrees})
            print(f"[gpu_check]   group_query {m} {where}: {row['ms']:.3f} ms", flush=True)
        gq_bench.add_speedup(rows)
        for r in rows:
            rec.add(r)
        bad = gq_bench.disagreeing(rows, dtype)
        if bad:
            rec.fail(f"{where}: {bad} disagree with the float32 reference")
        del q, k, v, check
        _free(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


TRAIN_COLUMNS = ["preset", "status", "dense_params", "seq_len", "tokens_per_step", "tokens_per_s",
                 "tflops_per_device", "model_tflops_per_s", "mfu", "data_wait", "peak_mem_gib",
                 "pred_mem_gib", "mem_ratio", "final_loss", "seconds"]


def predicted_memory_gib(preset: str, data_path: Path, tokens: int, world: int = 1) -> float:
    """The memory model's GPU bytes of ZeRO-3 training without its ``reserved`` allowance (CUDA context,
    fragmentation), i.e. what torch.cuda.max_memory_allocated measures, in GiB."""
    meta = load_meta(data_path)
    shape = shape_from_preset(preset, meta.num_items, meta.cond_vocab_sizes(),
                              num_numeric=len(meta.numeric_fields))
    parts = per_gpu_bytes(shape, TrainSetup(num_gpus=world, zero_stage=3, micro_batch_tokens=tokens,
                                            activation_checkpointing=False))
    return (parts["total"] - parts["reserved"]) / GiB


def timed_runner(seconds: float) -> Callable[[list[str], dict[str, str], Path], int]:
    """A train_throughput runner that kills the run (and what it started) after ``seconds``: exit 124."""

    def runner(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            rc = run_process(cmd, seconds, stdout=log, env=env)
        if rc is None:
            with open(log_path, "a") as log:
                log.write(f"\n[gpu_check] killed: past its time limit of {seconds:.0f} s\n")
            return 124
        return rc

    return runner


def logged_metrics(path: Path) -> dict[str, Any]:
    """The throughput figures a run logged before it failed (a failed final checkpoint or evaluation must
    not lose them): train_throughput.measure's keys, from the last record with tokens/s."""
    records = [r for _, r in sorted(read_metrics(path).items()) if "tokens_per_s" in r]
    if not records:
        return {}
    m = records[-1]
    return {"tokens_per_s": m["tokens_per_s"], "tflops_per_device": m.get("tflops_per_device"),
            "mfu": m.get("mfu"), "data_wait": m.get("data_wait"), "peak_mem_gib": m.get("mem_gib"),
            "final_loss": m.get("loss")}


def train_overrides(plan: Plan, preset: str, data: Path, out: Path) -> list[str]:
    """One packed row of ``plan.train_tokens`` per step under ZeRO-3 (as train_throughput.py), on the plan's
    synthetic dataset at ``data`` (prepared once for every preset)."""
    run = train_bench.overrides_for(preset, plan.train_seq_len, "pack", 3, plan.train_steps,
                                    plan.train_tokens, out)
    return [*run, f"data.path={data}", f"data.prepare={json.dumps(plan.train_data)}"]


def train_section(plan: Plan, rec: Record, limit: float, work: Path, log_dir: Path | None = None) -> None:
    if not _importable("deepspeed"):  # a bare GPU machine: every run would fail the same way, slowly
        rec.fail("deepspeed is not installed: carry its wheel (pure Python + JIT ops; pip install --no-deps)")
        return
    clock = Clock(limit)
    data = work / "data"
    t0 = time.monotonic()
    prepare(plan.train_data, data)
    launcher = LauncherConfig(kind="python", env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
                              if plan.dry_run else {})
    rec.meta.update(
        flop_formula=train_bench.FLOP_FORMULA, base_config=plan.train_config, data=plan.train_data,
        data_prepare_s=round(time.monotonic() - t0, 1), steps=plan.train_steps, packing="pack", zero_stage=3,
        world_size=launcher.world_size,
        measured="tokens/s, TFLOP/s, MFU and mem_gib from the trainer's last log line (first step excluded); "
                 "mem_gib is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on the CPU (so "
                 "mem_ratio means nothing there)",
        pred_mem_gib="lum_dist.scaling.memory.per_gpu_bytes (ZeRO-3, no activation checkpointing) minus its "
                     "reserved allowance; mem_ratio = peak_mem_gib / pred_mem_gib")
    for preset in plan.presets:
        if clock.left() < plan.train_run_min_s:
            rec.skip(f"{preset}: budget ({clock.left():.0f} s left, a run needs >= "
                     f"{plan.train_run_min_s:.0f} s)")
            continue
        out = work / preset
        overrides = train_overrides(plan, preset, data, out)
        row: dict[str, Any] = {"preset": preset, "seq_len": plan.train_seq_len,
                               "tokens_per_step": plan.train_tokens}
        try:
            row["pred_mem_gib"] = predicted_memory_gib(preset, data, plan.train_tokens,
                                                       launcher.world_size)
        except Exception as e:
            rec.fail(f"{preset}: memory model: {type(e).__name__}: {e}")
        print(f"[gpu_check]   train {preset}: {plan.train_steps} steps ...", flush=True)
        t0 = time.monotonic()
        runner = timed_runner(clock.left())
        row.update(train_bench.measure(launcher, plan.train_config, overrides, out, runner=runner))
        row["seconds"] = time.monotonic() - t0
        if row["status"] != "ok":
            row.update(logged_metrics(out / "metrics.jsonl"))
            log = out / "train.log"
            log_tail = tail(log.read_text(errors="replace"), 25) if log.is_file() else "(no log)"
            rec.fail(f"{preset}: {row['status']}\n{log_tail}")
        if log_dir is not None and (out / "train.log").is_file():  # every run's log, one file
            with open(log_dir / "train.log", "a") as f:
                f.write(f"\n===== {preset}: {row['status']}\n{(out / 'train.log').read_text(errors='replace')}")
        if row.get("peak_mem_gib") and row.get("pred_mem_gib"):
            row["mem_ratio"] = row["peak_mem_gib"] / row["pred_mem_gib"]
        shutil.rmtree(out, ignore_errors=True)  # a 1B ZeRO-3 checkpoint is ~17 GB
        rec.add({c: row.get(c) for c in TRAIN_COLUMNS})


def run_in_child(section: str, plan: Plan, rec: Record, limit: float, work: Path) -> None:
    """Run ``section`` in a child process (this script with --child); read back what it recorded, also
    when it crashed or was killed at ``limit``."""
    out = work / f"{section}.child.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--child-out", str(out),
           "--child-seconds", str(max(limit - 5, 1)), *(["--dry-run"] if plan.dry_run else [])]
    rc = run_process(cmd, limit, env=os.environ.copy())
    if out.is_file():
        got = Record.from_dict(json.loads(out.read_text()))
        rec.rows, rec.skipped, rec.errors, rec.meta = got.rows, got.skipped, got.errors, got.meta
    if rc is None:
        rec.status = "timed out"
        rec.errors.append(f"killed after {limit:.0f} s (its time limit); rows are those finished before")
    elif rc != 0 and not rec.errors:
        rec.errors.append(f"child process: {exit_text(rc)} (see the log above)")


CHILD_FUNCS: dict[str, Callable[[Plan, Record, Clock], None]] = {
    "attention": attention_section, "group_query": group_query_section}


def child_main(section: str, plan: Plan, out: Path, seconds: float) -> int:
    """In the child: run one section, saving its record after every row and at the end."""
    rec = Record(status="running")
    rec.on_update = lambda: atomic_write_text(out, json.dumps(rec.to_dict(), default=str))
    try:
        CHILD_FUNCS[section](plan, rec, Clock(seconds))
    except Exception:
        rec.errors.append(tail(traceback.format_exc(), 20))
    rec.status = "failed" if rec.errors else "ok"
    rec.update()
    return 1 if rec.errors else 0


# ---------------------------------------------------------------------------------------------
# the driver


def run_sections(names: list[str], runners: dict[str, Callable[[Record, float], None]], clock: Clock,
                 plan: Plan, on_update: Callable[[dict[str, Record]], None]) -> dict[str, Record]:
    """Run each section within the budget; one that fails or is skipped does not stop the next."""
    records: dict[str, Record] = {}
    for name in names:
        rec = records[name] = Record(on_update=lambda: on_update(records))
        left = clock.left()
        limit = section_limit(left, plan.caps[name], plan.min_s[name])
        if limit is None:
            rec.status = "skipped"
            rec.skipped.append(f"budget: {max(left, 0):.0f} s left, the section needs >= "
                               f"{plan.min_s[name]:.0f} s")
            print(f"[gpu_check] {name}: skipped ({rec.skipped[-1]})", flush=True)
            on_update(records)
            continue
        print(f"[gpu_check] {name} (up to {limit:.0f} s) ...", flush=True)
        t0 = time.monotonic()
        rec.status = "running"
        try:
            runners[name](rec, limit)
        except Exception:
            rec.errors.append(tail(traceback.format_exc(), 20))
        rec.seconds = time.monotonic() - t0
        if rec.status == "running":
            rec.status = "failed" if rec.errors else "ok"
        print(f"[gpu_check] {name}: {rec.status} in {rec.seconds:.0f} s", flush=True)
        on_update(records)
    return records


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU with tiny shapes (no CUDA needed)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total seconds (default: 500 on CUDA, 300 in the dry run)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS,
                    help=f"default: {' '.join(SECTIONS)} (dry run: pytest last, its collection overlapping "
                         "the rest)")
    ap.add_argument("--name", default=None, help="results file name (default: the device, or dry-run)")
    ap.add_argument("--work-dir", default=None,
                    help="scratch for the dataset and checkpoints (default: $TMPDIR)")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="the model presets of the train section, in this order (default: the plan's)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="keep the whole pytest output (pytest.log) and every training run's log (train.log) here")
    ap.add_argument("--child", choices=CHILD_SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.presets:
        plan = dataclasses.replace(plan, presets=tuple(args.presets))
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (300.0 if plan.dry_run else 500.0)
    clock, t_start = Clock(budget), time.monotonic()  # the budget counts from here
    sections = args.sections or list(DRY_ORDER if plan.dry_run else SECTIONS)
    if args.child:
        return child_main(args.child, plan, args.child_out, args.child_seconds)
    if not plan.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --dry-run for the CPU dry run")
    # Children (training runs, pytest, sections) import this checkout's lum_dist, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("WANDB_MODE", "disabled")

    name = args.name or ("dry-run" if plan.dry_run else device_slug(torch.cuda.get_device_name()))
    meta = {**provenance(), "dry_run": plan.dry_run, "python": platform.python_version(),
            "versions": versions(), "budget_s": budget, "sections": sections, "host_cpus": os.cpu_count()}
    report = Report(meta, {}, RESULTS / "gpu" / f"{name}.json", RESULTS / "gpu" / f"{name}.md")

    def on_update(records: dict[str, Record]) -> None:
        report.sections = records
        report.meta["seconds"] = round(time.monotonic() - t_start, 1)
        report.write()

    work = Path(tempfile.mkdtemp(prefix="lum-gpu-check-", dir=args.work_dir))
    early = PytestRun(plan, args.log_dir) if plan.dry_run and "pytest" in sections else None  # collection only: no device
    runners: dict[str, Callable[[Record, float], None]] = {
        "env": lambda rec, limit: env_section(plan, rec, limit),
        "pytest": lambda rec, limit: (early or PytestRun(plan, args.log_dir)).finish(rec, limit),
        "attention": lambda rec, limit: run_in_child("attention", plan, rec, limit, work),
        "group_query": lambda rec, limit: run_in_child("group_query", plan, rec, limit, work),
        "train": lambda rec, limit: train_section(plan, rec, limit, work, args.log_dir),
    }
    try:
        records = run_sections(sections, runners, clock, plan, on_update)
    finally:
        if early is not None:
            early.cancel()  # still running only if its section was skipped or broke
        shutil.rmtree(work, ignore_errors=True)
    for sec, rec in records.items():
        if rec.rows:
            print(f"\n== {sec}: {rec.status}")
            print_table(uniform(rec.rows))
    print(f"\nwrote {report.json_path}\nwrote {report.md_path}")
    bad = [s for s, r in records.items() if r.status in ("failed", "timed out")]
    if bad:
        print(f"[gpu_check] not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
