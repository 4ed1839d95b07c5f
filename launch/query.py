"""Step 2: query a trained LUM with many conditions per user in one pass; write parquet for serving.

    python launch/query.py --checkpoint runs/pretrain --out runs/query-test --conditions '*' 'category=ALL'
    torchrun --nproc_per_node 8 launch/query.py ...      # shards are spread over ranks

Output (in --out): part-*.parquet (user_id, history_len, condition, embedding, model_version), items.parquet
(item_id, embedding) and manifest.json, written last. Re-running the same command after a crash resumes:
finished shards are kept, missing ones computed; a different job pointed at the same folder is refused.
"""

from __future__ import annotations

import argparse

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint dir, or a pretraining run's output dir (its best validation "
                        "checkpoint, else its newest complete one)")
    p.add_argument("--out", required=True, help="output folder (created; re-used to resume the same job)")
    p.add_argument("--conditions", nargs="+", default=["*"],
                   help="one query per spec and user: '*' (generic: every condition field MASK), "
                        "'<field>=<raw value>' (e.g. category=Books), or '<field>=ALL' (every training value "
                        "of the field); default: '*'")
    p.add_argument("--split", default="test", choices=["valid", "test"],
                   help="history up to the test target (valid_end) or the validation target (train_end)")
    p.add_argument("--lag", type=int, default=0,
                   help="end each history this many behaviours before the split's target (outputs that also "
                        "serve the downstream training requests before it); default 0")
    p.add_argument("--token-budget", type=int, default=8192,
                   help="tokens per packed row (histories plus their query tokens, many users per row); "
                        "bounds memory per forward pass (default 8192)")
    p.add_argument("--users-per-shard", type=int, default=4096,
                   help="users per output parquet shard, the unit of work per rank and of resume (default "
                        "4096)")
    p.add_argument("--max-users", type=int, default=0,
                   help="answer only the first N users of the dataset (default 0: all)")
    p.add_argument("--device", default="auto",
                   help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'; bf16 on CUDA")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.query.job import QueryJob, run

    out = run(QueryJob(checkpoint=a.checkpoint, out=a.out, conditions=a.conditions, split=a.split, lag=a.lag,
                       token_budget=a.token_budget, users_per_shard=a.users_per_shard, max_users=a.max_users,
                       device=a.device))
    if cli.is_rank_zero():
        print(f"wrote {out} (manifest.json lists the shards)")


if __name__ == "__main__":
    cli.run(main)
