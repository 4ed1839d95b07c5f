"""Loader throughput and row utilisation, best-fit packing vs one-sequence-per-row padding.

For each dataset and token budget, runs the training PackedLoader under both policies until it has
produced at least --sequences sequences and reports sequences/s, real tokens/s, utilisation (real
tokens / rows * budget) and sequences per row. Datasets: the synthetic one (lum_dist.data.prepare
when available, else the test fixture at a larger size) and S3-Rec Beauty when its raw file is
present. No FLOPs: this measures data loading on the host.

    python benchmarks/packing.py            # full run, writes benchmarks/results/packing.json
    python benchmarks/packing.py --smoke    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.config import DataConfig  # noqa: E402
from lum_dist.data.prepare import prepare  # noqa: E402
from lum_dist.data.report import dataset_report, measure_loader  # noqa: E402
from lum_dist.utils import data_dir  # noqa: E402


def datasets(root: Path, smoke: bool) -> list[tuple[str, Path]]:
    """The synthetic dataset (long-tailed lengths) and, on a full run, S3-Rec Beauty if present."""
    users = 500 if smoke else 20_000
    out = [("synthetic", root / f"synthetic-{users}")]
    prepare({"format": "synthetic", "num_users": users}, out[0][1])
    raw = (data_dir() or Path("/nonexistent")) / "s3rec-seq" / "Beauty.txt"
    if not smoke and raw.is_file():
        out.append(("beauty", root / "beauty"))
        prepare({"format": "s3rec", "input": str(raw)}, out[1][1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU CI)")
    ap.add_argument("--work", default="runs/bench-data", help="where prepared datasets are cached")
    ap.add_argument("--sequences", type=int, default=0, help="sequences per measurement (default by mode)")
    args = ap.parse_args()
    budgets = [64, 256] if args.smoke else [512, 2048, 8192]
    max_seq_len = 50 if args.smoke else 200
    min_seqs = args.sequences or (500 if args.smoke else 20_000)
    root = Path(args.work)

    rows, reports = [], {}
    for name, path in datasets(root, args.smoke):
        reports[name] = dataset_report(path)
        for budget in budgets:
            cfg = DataConfig(path=str(path), max_seq_len=min(max_seq_len, budget), token_budget=budget,
                             rows_per_batch=1, shuffle_buffer=2048)
            for policy in ("pack", "pad"):
                m = measure_loader(path, dataclasses.replace(cfg, packing=policy), 1, min_sequences=min_seqs)
                rows.append({"dataset": name, "budget": budget, "policy": policy,
                             "utilisation": m["utilisation"], "seqs_per_row": m["seqs_per_row"],
                             "seqs_per_s": m["seqs_per_s"], "tokens_per_s": m["tokens_per_s"],
                             "sequences": m["sequences"], "setup_s": m["setup_s"]})
    print_table(rows)
    out = write_result("packing-smoke" if args.smoke else "packing", rows, {
        "benchmark": "packing", "smoke": args.smoke, "max_seq_len": max_seq_len, "token_budgets": budgets,
        "rows_per_batch": 1, "shuffle_buffer": 2048, "min_sequences": min_seqs, "datasets": reports,
        "flop_formula": "none (host-side data loading)",
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
