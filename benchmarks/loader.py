"""Training-loader throughput (real tokens/s of the loader alone) for 0, 1, 2 worker processes, next to
each preset's token demand at 40 % MFU on one H100.

For each dataset and number of workers W (``data.num_workers``), a fresh ``train_loader`` is built,
warmed up (workers started, first buffers made), then drained for ``--seconds`` with nothing else to
do; tokens are real tokens (no padding). Each measurement is repeated ``--repeats`` times and the
median reported, with the spread, the CPU seconds per second of the main process (what the loader
costs the trainer's process: all of it for W = 0, receiving batches for W > 0) and of the workers
(from /proc), and real tokens per CPU second of all of them (the rate a loader process reaches on a
core of its own). The machine's load average is recorded: on a shared machine the processes compete
for cores, so the tokens/s are a lower bound.

Datasets and loader settings: the synthetic data (20,000 users) with the data section of
``configs/pretrain/1gpu-1b.yaml`` (rows of 4,096 tokens, the GPU configuration), and S3-Rec Beauty
(``$LUM_DATA_DIR/s3rec-seq/Beauty.txt``, users of ~9 behaviours, the hard case for a loader: many
short sequences per token) with the data section of ``configs/pretrain/beauty-lum.yaml``.

Token demand: ``0.4 * 989e12 / flops_per_token(preset, seq_len)`` (H100 SXM dense bf16 peak,
``lum_dist.model.flops_per_token``), presets lum-19m .. lum-7b at seq_len 4,096 (``max_seq_len`` of the
GPU configs, 1gpu-1b and 8gpu-7b, which the scaling ladder starts from) and 512 (the ladder's shortest,
the highest demand). ``workers_needed`` = demand / the measured one-worker tokens/s.

    python benchmarks/loader.py            # full run: writes benchmarks/results/loader.json
    python benchmarks/loader.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.config import DataConfig, PretrainConfig, load_config  # noqa: E402
from lum_dist.data.prepare import load_meta, prepare  # noqa: E402
from lum_dist.data.workers import WorkerLoader, train_loader  # noqa: E402
from lum_dist.model import flops_per_token, load_preset  # noqa: E402
from lum_dist.utils import data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H100_BF16_PEAK = 989e12
MFU = 0.4
PRESETS = ["lum-19m", "lum-100m", "lum-300m", "lum-1b", "lum-3b", "lum-7b"]
DEMAND_SEQ_LENS = [4096, 512]


def datasets(root: Path, smoke: bool) -> list[tuple[str, Path, DataConfig]]:
    """(name, prepared path, loader settings) of the synthetic data and, on a full run, Beauty."""
    synthetic = root / ("synthetic-300" if smoke else "synthetic-20000")
    prepare({"format": "synthetic", "num_users": 300 if smoke else 20_000}, synthetic)
    if smoke:
        return [("synthetic", synthetic, DataConfig(path=str(synthetic), max_seq_len=64, token_budget=256,
                                                    rows_per_batch=2, shuffle_buffer=128))]
    gpu = load_config(PretrainConfig, REPO / "configs/pretrain/1gpu-1b.yaml").data
    out = [("synthetic", synthetic, dataclasses.replace(gpu, path=str(synthetic)))]
    raw = (data_dir() or Path("/nonexistent")) / "s3rec-seq" / "Beauty.txt"
    if raw.is_file():
        beauty = root / "beauty"
        prepare({"format": "s3rec", "input": str(raw)}, beauty)
        cpu = load_config(PretrainConfig, REPO / "configs/pretrain/beauty-lum.yaml").data
        out.append(("beauty", beauty, dataclasses.replace(cpu, path=str(beauty))))
    return out


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live children (the loader's workers),
    from /proc; 0 where there is none."""
    me, tick, total = str(os.getpid()), os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def measure(path: Path, cfg: DataConfig, seconds: float, warmup: int) -> dict[str, float]:
    """Real tokens/s of one fresh loader drained for ``seconds`` after ``warmup`` batches, and the CPU
    seconds the main process and the workers spent per second."""
    t0 = time.perf_counter()
    loader = train_loader(path, cfg)
    for _ in range(warmup):
        next(loader)
    setup = time.perf_counter() - t0
    tokens = batches = 0
    t0, c0, w0 = time.perf_counter(), time.process_time(), children_cpu_s()
    while (elapsed := time.perf_counter() - t0) < seconds:
        batch = next(loader)
        tokens, batches = tokens + batch.num_real_tokens, batches + 1
    main, workers = time.process_time() - c0, children_cpu_s() - w0
    if isinstance(loader, WorkerLoader):
        loader.close()
    return {"tokens_per_s": tokens / elapsed, "batches_per_s": batches / elapsed, "main_cpu_share": main / elapsed,
            "workers_cpu_share": workers / elapsed, "tokens_per_cpu_s": tokens / max(main + workers, 1e-9),
            "setup_s": setup}


def demand_rows(meta_path: Path, one_worker: dict[str, float]) -> list[dict[str, Any]]:
    meta = load_meta(meta_path)
    rows = []
    for preset in PRESETS:
        model = load_preset(preset, meta.num_items, meta.cond_vocab_sizes(), len(meta.numeric_fields))
        row: dict[str, Any] = {"preset": preset}
        for seq_len in DEMAND_SEQ_LENS:
            demand = MFU * H100_BF16_PEAK / flops_per_token(model, seq_len)
            row[f"demand_tok_s@{seq_len}"] = demand
            for name, rate in one_worker.items():
                row[f"workers_needed@{seq_len}_{name}"] = math.ceil(demand / rate)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU CI)")
    ap.add_argument("--work", default="runs/bench-data", help="where prepared datasets are cached")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=0.0, help="timed seconds per measurement (default by mode)")
    ap.add_argument("--repeats", type=int, default=0, help="measurements per configuration (default by mode)")
    args = ap.parse_args()
    seconds = args.seconds or (0.5 if args.smoke else 8.0)
    repeats = args.repeats or (1 if args.smoke else 5)
    warmup = 2 if args.smoke else 20

    rows, loads, sets = [], [], datasets(Path(args.work), args.smoke)
    for name, path, base in sets:
        for workers in args.workers:
            cfg = dataclasses.replace(base, num_workers=workers)
            runs = []
            for _ in range(repeats):
                loads.append(os.getloadavg()[0])
                runs.append(measure(path, cfg, seconds, warmup))
            rates = [r["tokens_per_s"] for r in runs]
            rows.append({"dataset": name, "workers": workers, "tokens_per_s": statistics.median(rates),
                         "min_tok_s": min(rates), "max_tok_s": max(rates),
                         "batches_per_s": statistics.median(r["batches_per_s"] for r in runs),
                         "main_cpu_share": statistics.median(r["main_cpu_share"] for r in runs),
                         "workers_cpu_share": statistics.median(r["workers_cpu_share"] for r in runs),
                         "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in runs),
                         "setup_s": statistics.median(r["setup_s"] for r in runs),
                         "batch": f"{cfg.rows_per_batch}x{cfg.token_budget}", "max_seq_len": cfg.max_seq_len,
                         "shuffle_buffer": cfg.shuffle_buffer})
    print_table(rows)
    one = {r["dataset"]: r["tokens_per_s"] for r in rows if r["workers"] == 1}
    demand = demand_rows(sets[0][1], one) if one else []
    if demand:
        print()
        print_table(demand)
    out = write_result("loader-smoke" if args.smoke else "loader", rows, {
        "benchmark": "loader", "smoke": args.smoke, "seconds": seconds, "repeats": repeats, "warmup_batches": warmup,
        "statistic": "median over repeats (min/max alongside)", "cpu_count": os.cpu_count(),
        "load_avg_1min_at_each_measurement": loads,
        "shapes": {name: dataclasses.asdict(cfg) for name, _, cfg in sets},
        "datasets": {name: {"users": load_meta(path).num_users, "behaviours": load_meta(path).num_behaviours}
                     for name, path, _ in sets},
        "demand": demand,
        "flop_formula": f"demand = {MFU} * {H100_BF16_PEAK:.3g} FLOP/s (H100 SXM bf16 dense peak) / "
                        "lum_dist.model.flops_per_token(preset, seq_len) = 6 * matmul params + 6 * layers * "
                        "hidden * seq_len (fwd + bwd)",
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
