"""Where does a model lose between validation and test? The same checkpoint, the same users, three rankings.

Leave-one-out: validation ranks item[-2] after the training history, test ranks item[-1] after the training
history *and* the validation behaviour. The third ranking separates the two differences: test's target after
validation's history (the validation behaviour left out of the history, its item still excluded from the
candidates). So ``valid -> test without it`` is one step further from the training data, and ``test without it
-> test`` is what reading the newest behaviour, one the model never trained on for this user, adds.

    python benchmarks/valid_test_gap.py --checkpoints runs/ablation/beauty-lum runs/ablation/beauty-sasrec \\
        --name quality/valid-test-gap-beauty
    python benchmarks/valid_test_gap.py --smoke     # a 4-step model on a tiny synthetic dataset (CI)

Writes ``benchmarks/results/<name>.{json,md}``: HR@10 / NDCG@10 per checkpoint and ranking. The three rankings
share one scoring path (the generic query, the user's whole history before the target excluded); the first two
equal ``launch/evaluate.py``'s valid and test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402
from context_use import smoke_checkpoint  # noqa: E402

from lum_dist.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lum_dist.config import PretrainConfig  # noqa: E402
from lum_dist.data.packing import best_fit_decreasing, collate  # noqa: E402
from lum_dist.data.prepare import read_users  # noqa: E402
from lum_dist.data.tokenize import TokenSeq, tokenize_eval  # noqa: E402
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets  # noqa: E402
from lum_dist.model import LUMModel, SASRecModel  # noqa: E402
from lum_dist.train.evaluate import as_scored, evaluate_checkpoint, item_scoring_table  # noqa: E402

RANKINGS = ("valid", "test, validation behaviour left out", "test")


def sequences(row: dict, meta, max_seq_len: int, item_attributes: bool) -> dict[str, TokenSeq]:
    """A user's three evaluation sequences (history, then the generic query targeting the held-out item)."""
    te, ve = row["train_end"], row["valid_end"]
    left_out = {k: (v[:te] + v[te + 1:] if isinstance(v, list) else v) for k, v in row.items()}  # every behaviour field
    without = tokenize_eval(left_out, meta, max_seq_len, ve - 1, item_attributes)
    without.seen_items = np.unique(np.asarray(row["item"][:ve], dtype=np.int64))  # the validation item stays out
    return {"valid": tokenize_eval(row, meta, max_seq_len, te, item_attributes),
            "test, validation behaviour left out": without,
            "test": tokenize_eval(row, meta, max_seq_len, ve, item_attributes)}


def run_name(checkpoint: Path) -> str:
    """``RUN`` for ``RUN/checkpoints/step_N`` (step folders of different runs share names), else the folder's name."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name or str(checkpoint)


def users_with_both_splits(data_path: str | Path, max_users: int = 0) -> list[dict]:
    """The users whose validation and test targets both exist (the first ``max_users``; 0: all)."""
    rows = [r for r in read_users(data_path).to_pylist() if r["train_end"] < r["valid_end"] < len(r["item"])]
    return rows[:max_users] if max_users else rows


@torch.no_grad()
def rank_users(model: LUMModel | SASRecModel, cfg: PretrainConfig, seqs: list[TokenSeq],
               bonus: Callable[[np.ndarray], torch.Tensor] | None = None) -> np.ndarray:
    """int64 [len(seqs)]: the 0-based rank of each sequence's target under its generic query, scored as
    ``launch/evaluate.py`` does (its history's items excluded). ``bonus(indices)``, if given, is added to the
    [len(indices), num_items] scores of those sequences."""
    items = item_scoring_table(model, cfg.loss.similarity)
    budget = max(cfg.eval.token_budget, cfg.data.max_seq_len)
    ranks = np.zeros(len(seqs), dtype=np.int64)
    for packed in best_fit_decreasing(np.array([len(s) for s in seqs]), budget):
        batch = collate(seqs, [packed], budget)  # sequences in the order of ``packed``
        query = batch.query_index()
        user = as_scored(model.forward_batch(batch)[query], cfg.loss.similarity)
        scores = user @ items.T
        if bonus is not None:
            scores = scores + bonus(packed)
        ranks[packed] = rank_of_targets(scores, batch.targets[query], batch.seen_items).cpu().numpy()
    return ranks


def probe(checkpoint: Path, max_users: int) -> list[dict]:
    model, cfg, meta = load_model(resolve_checkpoint(checkpoint))
    model.eval()
    seqs = [sequences(r, meta, cfg.data.max_seq_len, cfg.data.item_attributes)
            for r in users_with_both_splits(cfg.data.path, max_users)]
    out = []
    for ranking in RANKINGS:
        ranks = torch.from_numpy(rank_users(model, cfg, [s[ranking] for s in seqs]))
        m = RankingAccumulator([10]).update(ranks).compute()
        out.append({"checkpoint": run_name(checkpoint), "model": cfg.model.preset, "ranking": ranking,
                    "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"], "users": int(m["count"])})
    return out


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    lines = ["| ranking | " + " | ".join(f"{n} HR@10 / NDCG@10" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for ranking in RANKINGS:
        cells = [next(f"{r['hr@10']:.4f} / {r['ndcg@10']:.4f}" for r in rows
                      if r["checkpoint"] == n and r["ranking"] == ranking) for n in names]
        lines.append(f"| {ranking} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=[], help="run dirs or checkpoints")
    ap.add_argument("--max-users", type=int, default=0, help="the first N users with both splits (0: all)")
    ap.add_argument("--name", default="valid_test_gap", help="output: benchmarks/results/<name>.{json,md}")
    ap.add_argument("--smoke", action="store_true", help="a 4-step model on a tiny synthetic dataset (CI)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.checkpoints, args.max_users, args.name = [smoke_checkpoint(Path(tmp))], 20, "valid_test_gap_smoke"
        if not args.checkpoints:
            sys.exit("valid_test_gap.py: name at least one --checkpoints run (or --smoke)")
        rows = [row for ckpt in args.checkpoints for row in probe(ckpt, args.max_users)]
        # The smoke run also scores its checkpoint with launch/evaluate.py's code: the suite checks they agree.
        reference = evaluate_checkpoint(args.checkpoints[0], ["valid", "test"], args.max_users, [10]) if args.smoke else None
    print_table(rows)
    meta = {"max_users": args.max_users, "checkpoints": [str(c) for c in args.checkpoints],
            "protocol": "generic query; valid and test as launch/evaluate.py; test with the validation behaviour "
                        "removed from the history (its item still excluded from the candidates)",
            "evaluate_checkpoint": reference and reference["metrics"]}
    path = write_result(args.name, rows, meta, markdown(rows))
    print(f"wrote {path} (.md)")


if __name__ == "__main__":
    main()
