"""Should the training loader read the prepared parquet through Hugging Face ``datasets``?

Side by side, on the same prepared dataset, tokenizer and packer, the real tokens/s of:

* ``lum-dist``: today's :class:`lum_dist.data.loader.PackedLoader` (the rank's users as numpy columns, rows
  tokenized from offsets, exact resume from a few integers and the queued rows' keys);
* ``hf-streaming``: ``datasets.load_dataset("parquet", streaming=True)`` over the same shards,
  ``split_dataset_by_node`` for the rank, ``.shuffle(buffer_size)``, rows as numpy, then the same
  ``tokenize_train`` + condition dropout + best-fit packing + ``collate`` (its ``state_dict()`` gives the resume);
* ``hf-streaming-batched``: the same, reading rows 1,024 at a time (``.iter(batch_size)``), the fast way to read.

The loader must keep up with the trainer: ``datasets`` would replace it only at >= 90 % of its throughput. Measured
(benchmarks/results/hf_datasets.json): 60-63 % on the synthetic data and 1-9 % on Beauty, whose short users make
per-row work dominate; the project's loader tokenizes whole shuffle buffers with array operations, which a
row-streaming pipeline cannot feed. So ``datasets`` is not a dependency (it stays in the ``dev`` extra for this
script).

    python benchmarks/hf_datasets.py            # synthetic + Beauty (when $LUM_DATA_DIR has it)
    python benchmarks/hf_datasets.py --smoke    # tiny synthetic data, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.config import DataConfig  # noqa: E402
from lum_dist.data.batch import PackedBatch  # noqa: E402
from lum_dist.data.loader import PackedLoader  # noqa: E402
from lum_dist.data.packing import best_fit_decreasing, collate  # noqa: E402
from lum_dist.data.prepare import load_meta, prepare  # noqa: E402
from lum_dist.data.tokenize import apply_cond_dropout, tokenize_train  # noqa: E402
from lum_dist.utils import data_dir  # noqa: E402


def hf_batches(path: Path, cfg: DataConfig, batched: bool, rank: int = 0, world: int = 1) -> Iterator[PackedBatch]:
    """Packed batches from a ``datasets`` streaming pipeline over the prepared shards."""
    meta = load_meta(path)
    files = [str(path / rel) for rel in meta.shards]
    ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world).shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    rng = np.random.default_rng(cfg.seed)

    def rows() -> Iterator[dict]:
        if batched:
            for chunk in ds.with_format("numpy").iter(batch_size=1024):
                n = len(chunk["user_id"])
                yield from ({k: v[i] for k, v in chunk.items()} for i in range(n))
        else:
            yield from ds.with_format("numpy")

    pool, queue = [], []
    for row in rows():
        pool += [apply_cond_dropout(s, cfg.cond_dropout, rng)
                 for s in tokenize_train(row, meta, cfg.max_seq_len, cfg.long_sequences, cfg.item_attributes)]
        if len(pool) >= cfg.shuffle_buffer:
            queue += [[pool[i] for i in r] for r in best_fit_decreasing(np.array([len(s) for s in pool]),
                                                                         cfg.token_budget)]
            pool = []
            while len(queue) >= cfg.rows_per_batch:
                rows_, queue = queue[:cfg.rows_per_batch], queue[cfg.rows_per_batch:]
                seqs = [s for r in rows_ for s in r]
                index, start = [], 0
                for r in rows_:
                    index.append(list(range(start, start + len(r))))
                    start += len(r)
                yield collate(seqs, index, cfg.token_budget)


def tokens_per_s(batches: Iterator[PackedBatch], num_batches: int) -> float:
    next(batches)  # opening files, first buffer
    t0, tokens = time.perf_counter(), 0
    for _ in range(num_batches):
        tokens += next(batches).num_real_tokens
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("runs/bench-hf-datasets"))
    args = p.parse_args(argv)
    sets = [("synthetic", {"format": "synthetic", "num_users": 300 if args.smoke else 20_000})]
    beauty = (data_dir() or Path("/nonexistent")) / "s3rec-seq" / "Beauty.txt"
    if not args.smoke and beauty.is_file():
        sets.append(("beauty", {"format": "s3rec", "input": str(beauty)}))
    num_batches, repeats = (3, 1) if args.smoke else (60, args.repeats)
    rows = []
    for name, source in sets:
        path = args.work / f"{name}-{source.get('num_users', 'all')}"
        prepare(source, path)
        cfg = DataConfig(path=str(path), max_seq_len=100 if name == "beauty" else 200, token_budget=4096,
                         shuffle_buffer=256 if args.smoke else 4096, long_sequences="window")
        variants = {
            "lum-dist": lambda cfg=cfg, path=path: iter(PackedLoader(path, cfg)),
            "hf-streaming": lambda cfg=cfg, path=path: hf_batches(path, cfg, batched=False),
            "hf-streaming-batched": lambda cfg=cfg, path=path: hf_batches(path, cfg, batched=True),
        }
        speed = {v: [] for v in variants}
        for _ in range(repeats):  # interleaved, so a busy machine slows every variant alike
            for v, make in variants.items():
                speed[v].append(tokens_per_s(make(), num_batches))
        base = statistics.median(speed["lum-dist"])
        for v, s in speed.items():
            rows.append({"dataset": name, "loader": v, "real_tokens_per_s": statistics.median(s),
                         "vs_lum_dist": statistics.median(s) / base})
    print_table(rows)
    path = write_result("hf_datasets" + ("-smoke" if args.smoke else ""), rows, {
        "what": "real tokens/s of the training loader (tokenize + pack + collate), median of repeats",
        "batches": num_batches, "repeats": repeats, "token_budget": 4096, "decision_threshold": 0.9})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
