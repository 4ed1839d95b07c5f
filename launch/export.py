"""Export a pretrained LUM for use outside lum-dist.

    python launch/export.py --checkpoint runs/pretrain --split test --out runs/export

writes ``users.parquet`` (user_id, embedding), ``items.parquet`` (item_id, embedding) and, with ``--hf``,
a consolidated ``save_pretrained`` model (safetensors) built from the ZeRO shards. The score of a (user, item)
pair is the dot product of their embeddings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint dir, a checkpoints/ folder or a run's output dir (its best validation "
                        "checkpoint, else its newest complete one)")
    p.add_argument("--split", default="test", choices=["valid", "test"],
                   help="user embeddings from the history before this split's held-out behaviour (default: "
                        "test)")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    p.add_argument("--max-users", type=int, default=0,
                   help="export only the first N users with a held-out behaviour (default 0: all)")
    p.add_argument("--hf", action="store_true", help="also write <out>/model (save_pretrained, safetensors)")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.checkpoint import load_model, resolve_checkpoint
    from lum_dist.train.export import export_embeddings

    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg, meta = load_model(ckpt)
    counts = export_embeddings(model, cfg, meta, args.split, args.out, args.max_users)
    if args.hf:
        model.save_pretrained(args.out / "model", safe_serialization=True)
    print(f"exported {counts['users']} users and {counts['items']} items from {ckpt} to {args.out}")


if __name__ == "__main__":
    cli.run(main)
