"""Step 2: query a trained LUM with many conditions per user in one pass; write parquet for serving.

    python launch/query.py --checkpoint runs/pretrain --out runs/query-test --conditions '*' 'category=ALL'
    torchrun --nproc_per_node 8 launch/query.py ...      # shards are spread over ranks

Conditions: '*' (generic: every field MASK), '<field>=<raw value>', or '<field>=ALL' (every training value).
Re-running the same command after a crash resumes: finished shards are kept, missing ones computed.
"""

from __future__ import annotations

import argparse

from lum_dist.query.job import QueryJob, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a pretraining run's output dir")
    p.add_argument("--out", required=True)
    p.add_argument("--conditions", nargs="+", default=["*"])
    p.add_argument("--split", default="test", choices=["valid", "test"],
                   help="history up to the test target (valid_end) or the validation target (train_end)")
    p.add_argument("--lag", type=int, default=0,
                   help="end each history this many behaviours before the split's target (outputs that also serve "
                        "the downstream training requests before it)")
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--users-per-shard", type=int, default=4096)
    p.add_argument("--max-users", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    out = run(QueryJob(checkpoint=a.checkpoint, out=a.out, conditions=a.conditions, split=a.split, lag=a.lag,
                       token_budget=a.token_budget, users_per_shard=a.users_per_shard, max_users=a.max_users,
                       device=a.device))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
