"""Ingest benchmark: wall time of ``prepare()`` (adapter + split + vocab + shards) per real dataset.

    python benchmarks/prepare.py            # every dataset found under $LUM_DATA_DIR + synthetic
    python benchmarks/prepare.py --smoke    # synthetic default + ml-100k + Beauty only

Writes benchmarks/results/prepare[-smoke].json. Throughput = behaviours / second (no FLOPs: I/O bound).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from lum_dist.data.prepare import prepare  # noqa: E402
from lum_dist.utils import data_dir  # noqa: E402

SOURCES = {
    "synthetic": {"format": "synthetic"},
    "ml-100k": {"format": "movielens-100k", "input": "ml-100k"},
    "ml-latest-small": {"format": "movielens-csv", "input": "ml-latest-small"},
    "amazon-instruments": {
        "format": "amazon-5core",
        "input": "amazon-musical-instruments-5core-2014/Musical_Instruments.zip",
    },
    "taobao-head": {
        "format": "taobao",
        "input": "taobao-userbehavior-head/UserBehavior.csv",
        "split": "temporal",
    },
    **{
        name: {"format": "s3rec", "input": f"s3rec-seq/{name}.txt"}
        for name in ["Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp", "LastFM"]
    },
}
SMOKE = ["synthetic", "ml-100k", "Beauty"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root, rows = data_dir(), []
    for name in SMOKE if args.smoke else SOURCES:
        spec = dict(SOURCES[name])
        if "input" in spec:
            if root is None or not (root / spec["input"]).exists():
                continue
            spec["input"] = str(root / spec["input"])
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                start = time.perf_counter()
                meta = prepare(spec, Path(tmp) / f"d{r}")
                times.append(time.perf_counter() - start)
        best = min(times)
        rows.append(
            {
                "dataset": name,
                "format": spec["format"],
                "users": meta.num_users,
                "behaviours": meta.num_behaviours,
                "items": meta.num_items,
                "best_s": best,
                "behaviours_per_s": meta.num_behaviours / best,
            }
        )
    print_table(rows)
    path = write_result(
        "prepare-smoke" if args.smoke else "prepare",
        rows,
        {
            "benchmark": "prepare",
            "repeats": args.repeats,
            "timing": "best of repeats, wall clock",
            "flops": "n/a (I/O-bound ingest)",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
