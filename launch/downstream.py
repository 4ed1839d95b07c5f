"""Step 3: train the downstream DLRMs with and without the LUM step-2 outputs and print the comparison.

    python launch/downstream.py --config configs/downstream/ml100k.yaml seeds=[0,1,2] ranking.epochs=3

Writes benchmarks/results/downstream/<name>.json and .md (see lum_dist/downstream/run.py).
"""

from __future__ import annotations

import argparse

from lum_dist.config import load_config
from lum_dist.downstream.config import DownstreamConfig
from lum_dist.downstream.run import run_downstream


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/downstream/synthetic.yaml")
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value")
    args = p.parse_args(argv)
    return run_downstream(load_config(DownstreamConfig, args.config, args.overrides))


if __name__ == "__main__":
    main()
