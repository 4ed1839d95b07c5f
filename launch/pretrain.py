"""Pretrain a Large User Model (LUM step 1).

    deepspeed launch/pretrain.py --config configs/pretrain/1gpu-1b.yaml            # CUDA cluster
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 launch/pretrain.py --config configs/pretrain/debug-cpu.yaml
    python launch/pretrain.py --config configs/pretrain/synthetic.yaml train.max_steps=50   # one process

Any config field can be overridden as ``section.key=value`` (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json

from lum_dist.config import PretrainConfig, load_config
from lum_dist.train.trainer import pretrain


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file (see configs/pretrain/)")
    p.add_argument("--resume", default=None, help="'auto' (default in configs), 'never' or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    result = pretrain(cfg)
    return result


if __name__ == "__main__":
    result = main()
    if result:
        print(json.dumps(result, indent=2, sort_keys=True))
