"""Evaluate a pretrained LUM by full ranking over all items, next to the popularity baseline.

    python launch/evaluate.py --checkpoint runs/pretrain-ml100k --split valid test
    python launch/evaluate.py --checkpoint runs/pretrain-ml100k --out benchmarks/results/pretrain/ml100k

One process on the CPU from any (ZeRO-sharded) checkpoint; prints a markdown table and, with ``--out P``,
writes ``P.json`` and ``P.md``. See :mod:`lum_dist.eval.ranking` for the protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lum_dist.eval.ranking import evaluate_checkpoint, format_table
from lum_dist.utils import atomic_write_text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir, or a run's output dir")
    p.add_argument("--split", nargs="+", default=["valid", "test"], choices=["valid", "test"])
    p.add_argument("--max-users", type=int, default=0, help="0: every user with a held-out behaviour")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    result = evaluate_checkpoint(args.checkpoint, args.split, args.max_users, args.ks)
    table = format_table(result["metrics"], args.split, args.ks)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2, sort_keys=True) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), f"# Full-ranking evaluation: {result['dataset']}\n\n"
                          f"checkpoint `{result['checkpoint']}`, preset `{result['preset']}`, query condition: "
                          f"{result['eval_condition']}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
