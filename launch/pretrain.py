"""Pretrain a Large User Model (LUM step 1).

    deepspeed launch/pretrain.py --config configs/pretrain/1gpu-1b.yaml            # CUDA cluster
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launch/pretrain.py --config configs/pretrain/debug-cpu.yaml
    python launch/pretrain.py --config configs/pretrain/synthetic.yaml train.max_steps=50   # one process

Any config field can be overridden as ``section.key=value`` (values parsed as YAML). The run writes
<train.output_dir>/result.json, metrics.jsonl and checkpoints/ (best, latest); a second run on a folder in
use refuses to start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (see configs/pretrain/)")
    p.add_argument("--resume", default=None,
                   help="'auto' (the default: the newest intact checkpoint of train.output_dir, if any), "
                        "'never' (start over) or a checkpoint dir; same as train.resume=...")
    # set by the deepspeed launcher
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    p.add_argument("overrides", nargs="*",
                   help="config overrides, section.key=value (e.g. train.max_steps=50)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.config import PretrainConfig, load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(PretrainConfig, args.config, overrides)  # before torch: a typo is reported at once
    from lum_dist.train.trainer import pretrain

    result = pretrain(cfg)
    if cli.is_rank_zero():
        out = Path(cfg.train.output_dir)
        print(f"[lum-dist] results: {out / 'result.json'}, metrics: {out / 'metrics.jsonl'}, "
              f"checkpoints: {out / 'checkpoints'}")
    return result


if __name__ == "__main__":
    cli.run(main)
