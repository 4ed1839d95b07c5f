"""Ingest a raw public dataset into the UBS format (same as the ``lum-prepare`` console script).

    python launch/prepare.py --format movielens-100k --input $LUM_DATA_DIR/ml-100k --out runs/data/ml100k
    python launch/prepare.py --format synthetic --out runs/data/synthetic
"""

from lum_dist import cli
from lum_dist.data.prepare import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    cli.run(main)
