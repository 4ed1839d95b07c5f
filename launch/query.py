"""Step 2: query a trained LUM with many conditions per user in one pass; write parquet for serving.

    python launch/query.py --checkpoint runs/pretrain --out runs/query-test --conditions '*' 'category=ALL'
    torchrun --nproc_per_node 8 launch/query.py ...      # shards are spread over ranks
    python launch/query.py --config query.yaml --max-users 100   # the same keys in YAML; flags win

Every option is a field of ``lum_dist.config.QueryConfig``, checked before anything is read.

Output (in --out): part-*.parquet (user_id, history_len, condition, embedding, model_version), items.parquet
(item_id, embedding) and manifest.json, written last. Re-running the same command after a crash resumes:
finished shards are kept, missing ones computed; a different job pointed at the same folder is refused.
"""

from __future__ import annotations

import argparse

from lum_dist import cli
from lum_dist.config import QueryConfig, add_config_flags, config_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, QueryConfig)
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_flags(QueryConfig, build_parser().parse_args(argv))  # checked before torch is imported
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.query.job import run

    out = run(cfg)
    if cli.is_rank_zero():
        print(f"wrote {out} (manifest.json lists the shards)")


if __name__ == "__main__":
    cli.run(main)
