"""Dataset and packing reports: what the data looks like and how well the loader fills its rows.

``dataset_report`` reads only the item-list offsets and split boundaries of each shard.
``packing_report`` runs the training loader for a few batches under both policies ("pack": best-fit
bin packing, "pad": one sequence per row, padded) and reports utilisation (real tokens / rows * budget),
sequences per row and the loader's real-token throughput.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from lum_dist.config import DataConfig
from lum_dist.data.loader import PackedLoader
from lum_dist.data.prepare import iter_user_shards, load_meta
from lum_dist.data.schema import ITEM_FIELD, NUM_SPECIAL_IDS
from lum_dist.utils import format_number

PERCENTILES = (50, 90, 99)


def dataset_report(path: str | Path) -> dict[str, Any]:
    """Users, behaviours, items, vocabulary sizes and behaviours-per-user percentiles."""
    path = Path(path)
    meta = load_meta(path)
    lens, train = [], []
    for table in iter_user_shards(path, columns=[ITEM_FIELD, "train_end"]):
        lens.append(table.column(ITEM_FIELD).combine_chunks().value_lengths().to_numpy())
        train.append(table.column("train_end").to_numpy())
    n, t = np.concatenate(lens), np.concatenate(train)
    report: dict[str, Any] = {
        "name": meta.name, "split": meta.split, "users": int(len(n)), "behaviours": int(n.sum()),
        "train_behaviours": int(t.sum()), "items": meta.num_items - NUM_SPECIAL_IDS,
        "vocab_sizes": dict(meta.vocab_sizes), "numeric_fields": list(meta.numeric_fields),
        "seq_len_mean": float(n.mean()) if len(n) else 0.0, "seq_len_max": int(n.max()) if len(n) else 0,
    }
    for p in PERCENTILES:
        report[f"seq_len_p{p}"] = float(np.percentile(n, p)) if len(n) else 0.0
    return report


def measure_loader(path: str | Path, data_cfg: DataConfig, num_batches: int,
                   min_sequences: int = 0) -> dict[str, float]:
    """Utilisation, sequences per row and throughput of at least ``num_batches`` batches and
    ``min_sequences`` sequences (set-up timed apart)."""
    t0 = time.perf_counter()
    loader = PackedLoader(path, data_cfg)
    setup = time.perf_counter() - t0
    tokens = seqs = rows = 0
    t0 = time.perf_counter()
    batches = 0
    while batches < num_batches or seqs < min_sequences:
        b = next(loader)
        batches += 1
        tokens, seqs, rows = tokens + b.num_real_tokens, seqs + b.num_sequences, rows + b.num_rows
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {
        "utilisation": tokens / (rows * data_cfg.token_budget), "seqs_per_row": seqs / rows,
        "tokens_per_s": tokens / elapsed, "seqs_per_s": seqs / elapsed, "tokens": tokens, "rows": rows,
        "sequences": seqs, "batches": batches,
        "setup_s": setup,
    }


def packing_report(path: str | Path, data_cfg: DataConfig, num_batches: int = 50) -> dict[str, Any]:
    """``measure_loader`` for "pack" and "pad" at ``data_cfg``'s budget, and the utilisation gain."""
    out: dict[str, Any] = {"token_budget": data_cfg.token_budget, "max_seq_len": data_cfg.max_seq_len,
                           "rows_per_batch": data_cfg.rows_per_batch, "num_batches": num_batches}
    for policy in ("pack", "pad"):
        # at least one whole shuffle buffer: a buffer's tokenization is paid by its first batch
        out[policy] = measure_loader(path, dataclasses.replace(data_cfg, packing=policy), num_batches,
                                     min_sequences=data_cfg.shuffle_buffer)
    out["utilisation_gain"] = out["pack"]["utilisation"] / out["pad"]["utilisation"]
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return format_number(v)


def format_report(d: dict[str, Any]) -> str:
    """Plain-text tables: a key/value table per section; packing policies side by side."""
    lines: list[str] = []
    for section, body in d.items():
        lines.append(f"== {section}")
        policies = [k for k in ("pack", "pad") if isinstance(body.get(k), dict)]
        scalars = {k: v for k, v in body.items() if k not in policies}
        width = max((len(k) for k in scalars), default=0)
        lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in scalars.items()]
        if policies:
            cols = list(body[policies[0]])
            lines.append("  " + f"{'policy':<8}" + "".join(f"{c:>14}" for c in cols))
            lines += ["  " + f"{p:<8}" + "".join(f"{_fmt(body[p][c]):>14}" for c in cols) for p in policies]
    return "\n".join(lines)
