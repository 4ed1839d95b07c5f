"""Step 3: train the downstream DLRMs with and without the LUM step-2 outputs and print the comparison.

    python launch/downstream.py --config configs/downstream/ml100k.yaml seeds=[0,1,2] ranking.epochs=3

Writes benchmarks/results/downstream/<name>.json and .md (see lum_dist/downstream/run.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/downstream/synthetic.yaml",
                   help="downstream YAML (see configs/downstream/; default: synthetic)")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value or section.key=value")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.config import load_config
    from lum_dist.downstream.config import DownstreamConfig
    from lum_dist.downstream.run import run_downstream

    cfg = load_config(DownstreamConfig, args.config, args.overrides)
    result = run_downstream(cfg)
    if cli.is_rank_zero():
        table = Path(cfg.output_dir) / cfg.name
        print(f"[downstream] tables: {table}.md, {table}.json")
    return result


if __name__ == "__main__":
    cli.run(main)
