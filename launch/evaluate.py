"""Evaluate a pretrained LUM by full ranking over all items, next to the popularity baseline.

    python launch/evaluate.py --checkpoint runs/pretrain-ml100k-lum --split valid test
    python launch/evaluate.py --checkpoint runs/pretrain-ml100k-lum --out runs/eval-ml100k
    python launch/evaluate.py --checkpoint runs/pretrain-synthetic-scaling --condition-query --max-seq-len 65

One process on the CPU from any (ZeRO-sharded) checkpoint; prints a markdown table and, with ``--out P``,
writes ``P.json`` and ``P.md``. Each user's held-out behaviour of the split is ranked among all items, the
user's history excluded (see :mod:`lum_dist.train.evaluate` for the protocol).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lum_dist import cli
from lum_dist.config import EvaluateConfig, add_config_flags, config_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, EvaluateConfig)
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_flags(EvaluateConfig, build_parser().parse_args(argv))  # checked before torch is imported
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.eval.metrics import format_table
    from lum_dist.train.evaluate import evaluate_checkpoint
    from lum_dist.utils import atomic_write_text

    result = evaluate_checkpoint(Path(cfg.checkpoint), cfg.split, cfg.max_users, cfg.ks, cfg.attribute_query_weight,
                                 cfg.condition_query, cfg.max_seq_len)
    table = format_table(result["metrics"], cfg.split, cfg.ks)
    print(table)
    if cfg.out is not None:
        # <out>.json and <out>.md as --out promises: not with_suffix, which would turn "eval-v1.5" into "eval-v1.json".
        json_path, md_path = Path(f"{cfg.out}.json"), Path(f"{cfg.out}.md")
        atomic_write_text(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
        atomic_write_text(md_path, f"# Full-ranking evaluation: {result['dataset']}\n\n"
                          f"checkpoint `{result['checkpoint']}`, preset `{result['preset']}`, query "
                          f"condition: {result['eval_condition']}\n\n{table}\n")
        print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    cli.run(main)
