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
from lum_dist.config import ExportConfig, add_config_flags, config_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, ExportConfig)
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_flags(ExportConfig, build_parser().parse_args(argv))  # checked before torch is imported
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.checkpoint import load_model, resolve_checkpoint
    from lum_dist.train.export import export_embeddings

    ckpt = resolve_checkpoint(Path(cfg.checkpoint))
    model, run_cfg, meta = load_model(ckpt)
    out = Path(cfg.out)
    counts = export_embeddings(model, run_cfg, meta, cfg.split, out, cfg.max_users)
    if cfg.hf:
        model.save_pretrained(out / "model", safe_serialization=True)
    print(f"exported {counts['users']} users and {counts['items']} items from {ckpt} to {out}")


if __name__ == "__main__":
    cli.run(main)
