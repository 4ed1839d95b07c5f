"""Evaluate a pretrained LUM by full ranking over all items, next to the popularity baseline.

    python launch/evaluate.py --checkpoint runs/pretrain-ml100k-lum --split valid test
    python launch/evaluate.py --checkpoint runs/pretrain-ml100k-lum --out runs/eval-ml100k

One process on the CPU from any (ZeRO-sharded) checkpoint; prints a markdown table and, with ``--out P``,
writes ``P.json`` and ``P.md``. Each user's held-out behaviour of the split is ranked among all items, the
user's history excluded (see :mod:`lum_dist.train.evaluate` for the protocol).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint dir (checkpoints/step_N), a checkpoints/ folder or a run's output "
                        "dir; a folder resolves to its best validation checkpoint, else its newest complete "
                        "one")
    p.add_argument("--split", nargs="+", default=["valid", "test"], choices=["valid", "test"],
                   help="held-out behaviours to rank: 'valid' (second last, history before it) and/or 'test' "
                        "(last); default: both")
    p.add_argument("--max-users", type=int, default=0,
                   help="evaluate only the first N users with a held-out behaviour, in dataset order "
                        "(default 0: every such user)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20],
                   help="cut-offs K of HR@K and NDCG@K (default: 10 20); MRR is always reported")
    p.add_argument("--out", type=Path, default=None,
                   help="also write <out>.json (every metric, checkpoint, step, dataset) and <out>.md (the "
                        "table)")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.eval.metrics import format_table
    from lum_dist.train.evaluate import evaluate_checkpoint
    from lum_dist.utils import atomic_write_text

    result = evaluate_checkpoint(args.checkpoint, args.split, args.max_users, args.ks)
    table = format_table(result["metrics"], args.split, args.ks)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2, sort_keys=True) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), f"# Full-ranking evaluation: {result['dataset']}\n\n"
                          f"checkpoint `{result['checkpoint']}`, preset `{result['preset']}`, query "
                          f"condition: {result['eval_condition']}\n\n{table}\n")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    cli.run(main)
