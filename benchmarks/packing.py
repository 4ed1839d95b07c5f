"""Packing vs padding: row utilisation, loader throughput and the model's effective (real-token) throughput.

For each dataset and token budget B, two policies fill batches of the same tensor size (B tokens):

* ``pack``: best-fit-decreasing packing of many users into one row of B tokens (the trainer's default);
* ``pad``:  the classic padded batch, B / L rows of one user each, padded to the sequence length L
  (``max_seq_len``) with PAD tokens that the model really computes on.

Reported per policy: utilisation (real tokens / batch tokens), sequences per batch, the loader's real
tokens/s (host side), and the effective training throughput: real tokens per second through a
forward + backward pass of the LUM and its InfoNCE loss (``--preset``, one process, this machine's
device). ``speedup`` = pack's effective tokens/s over pad's at the same budget. Datasets: the synthetic
one (long-tailed lengths) and, on a full run, S3-Rec Beauty and MovieLens-100K when their raw files
are present under $LUM_DATA_DIR.

    python benchmarks/packing.py            # full run, writes benchmarks/results/packing.json
    python benchmarks/packing.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.config import DataConfig, LossConfig  # noqa: E402
from lum_dist.data.loader import PackedLoader  # noqa: E402
from lum_dist.data.prepare import load_meta, prepare  # noqa: E402
from lum_dist.data.report import dataset_report, measure_loader  # noqa: E402
from lum_dist.losses import InfoNCE  # noqa: E402
from lum_dist.model import LUMModel, load_preset  # noqa: E402
from lum_dist.train.trainer import PretrainModule  # noqa: E402
from lum_dist.utils import data_dir  # noqa: E402

RAW = {"beauty": ("s3rec", "s3rec-seq/Beauty.txt"), "ml100k": ("movielens-100k", "ml-100k")}


def datasets(root: Path, smoke: bool) -> list[tuple[str, Path]]:
    """The synthetic dataset and, on a full run, the real ones whose raw files are present."""
    users = 500 if smoke else 20_000
    out = [("synthetic", root / f"synthetic-{users}")]
    prepare({"format": "synthetic", "num_users": users}, out[0][1])
    for name, (fmt, rel) in ({} if smoke else RAW).items():
        raw = (data_dir() or Path("/nonexistent")) / rel
        if raw.exists():
            out.append((name, root / name))
            prepare({"format": fmt, "input": str(raw)}, out[-1][1])
    return out


def batch_config(path: Path, policy: str, budget: int, max_seq_len: int) -> DataConfig:
    """Batches of ``budget`` tokens: one packed row, or budget // L padded rows of L tokens."""
    cfg = DataConfig(path=str(path), max_seq_len=max_seq_len, shuffle_buffer=2048, packing=policy)
    if policy == "pack":
        return dataclasses.replace(cfg, token_budget=budget, rows_per_batch=1)
    return dataclasses.replace(cfg, token_budget=max_seq_len, rows_per_batch=max(1, budget // max_seq_len))


def model_throughput(path: Path, cfg: DataConfig, preset: str, steps: int, warmup: int = 2) -> dict[str, float]:
    """Real tokens/s and batch tokens/s of forward + backward (LUM + InfoNCE) over ``steps`` batches."""
    meta = load_meta(path)
    torch.manual_seed(0)
    model = LUMModel(load_preset(preset, meta.num_items, meta.cond_vocab_sizes(), len(meta.numeric_fields)))
    module = PretrainModule(model, InfoNCE(LossConfig(logq_correction=False), meta.num_items)).train()
    loader = PackedLoader(path, cfg)
    batches = [next(loader) for _ in range(warmup + steps)]
    real = computed = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _ = module(batch)
        loss.backward()
        module.zero_grad(set_to_none=True)
        if i >= warmup:
            real, computed = real + batch.num_real_tokens, computed + batch.num_tokens
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {"model_real_tok_s": real / elapsed, "model_batch_tok_s": computed / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU CI)")
    ap.add_argument("--work", default="runs/bench-data", help="where prepared datasets are cached")
    ap.add_argument("--sequences", type=int, default=0, help="sequences per loader measurement (default by mode)")
    ap.add_argument("--preset", default="lum-tiny", help="model of the effective-throughput measurement")
    ap.add_argument("--model-steps", type=int, default=0, help="timed batches per model measurement")
    args = ap.parse_args()
    budgets = [64, 256] if args.smoke else [512, 2048, 8192]
    max_seq_len = 32 if args.smoke else 200
    min_seqs = args.sequences or (500 if args.smoke else 20_000)
    model_steps = args.model_steps or (2 if args.smoke else 6)
    root = Path(args.work)

    rows, reports = [], {}
    for name, path in datasets(root, args.smoke):
        reports[name] = dataset_report(path)
        for budget in budgets:
            pair = {}
            for policy in ("pack", "pad"):
                cfg = batch_config(path, policy, budget, min(max_seq_len, budget))
                m = measure_loader(path, cfg, 1, min_sequences=min_seqs)
                t = model_throughput(path, cfg, args.preset, model_steps)
                pair[policy] = {"dataset": name, "budget": budget, "policy": policy,
                                "rows_x_len": f"{cfg.rows_per_batch}x{cfg.token_budget}",
                                "utilisation": m["utilisation"], "seqs_per_batch": m["sequences"] / m["batches"],
                                "loader_tok_s": m["tokens_per_s"], **t}
            for policy in ("pack", "pad"):
                pair[policy]["speedup"] = pair[policy]["model_real_tok_s"] / pair["pad"]["model_real_tok_s"]
                rows.append(pair[policy])
    print_table(rows)
    out = write_result("packing-smoke" if args.smoke else "packing", rows, {
        "benchmark": "packing", "smoke": args.smoke, "max_seq_len": max_seq_len, "token_budgets": budgets,
        "preset": args.preset, "model_steps": model_steps, "shuffle_buffer": 2048, "min_sequences": min_seqs,
        "datasets": reports, "threads": torch.get_num_threads(),
        "shapes": "pack: 1 row x budget tokens; pad: budget // max_seq_len rows x max_seq_len tokens",
        "flop_formula": "none: throughput is measured in real tokens/s (fwd + bwd of model + InfoNCE, fp32)",
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
