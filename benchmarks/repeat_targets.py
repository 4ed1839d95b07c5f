"""How much of a model's score comes from held-out items the user already had? One checkpoint, two rules.

With the user's history excluded from the candidates, a held-out item the user already had is either a miss (the
rule since stop 44, S3-Rec's and RecBole's) or, as the evaluation did before, the one history item left as a
candidate: then any model that scores the user's own items on top hits it for free. This probe ranks each user's
target once and reports HR@10 / NDCG@10 under both rules, and separately over the users whose target repeats an
item of their history and those whose target is new.

    python benchmarks/repeat_targets.py --checkpoints runs/quality-r26/yelp-lum-seed0 \\
        runs/quality-r26/yelp-sasrec-seed0 --name quality/repeat-targets-yelp
    python benchmarks/repeat_targets.py --smoke     # a 4-step model on a tiny synthetic dataset (CI)

Writes ``benchmarks/results/<name>.{json,md}``. The current rule's numbers equal ``launch/evaluate.py``'s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402
from context_use import smoke_checkpoint  # noqa: E402
from valid_test_gap import run_name  # noqa: E402

from lum_dist.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lum_dist.data.loader import eval_batches  # noqa: E402
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets  # noqa: E402
from lum_dist.train.evaluate import as_scored, evaluate_checkpoint, item_scoring_table  # noqa: E402

# (row name, which users, the rule): the rule decides whether a repeated target is a miss or a candidate.
ROWS = (("current rule (a repeated target is a miss)", "all", "current"),
        ("earlier rule (a repeated target stays a candidate)", "all", "earlier"),
        ("users whose target repeats, earlier rule", "repeat", "earlier"),
        ("users whose target is new", "new", "current"))


@torch.no_grad()
def probe(checkpoint: Path, split: str, max_users: int) -> list[dict]:
    model, cfg, meta = load_model(resolve_checkpoint(checkpoint))
    model.eval()
    items = item_scoring_table(model, cfg.loss.similarity)
    ranks: dict[str, list[torch.Tensor]] = {"current": [], "earlier": []}
    repeats = []
    for batch in eval_batches(cfg.data.path, meta, split, cfg.data.max_seq_len, cfg.eval.token_budget,
                              max_users=max_users, item_attributes=cfg.data.item_attributes):
        query = batch.query_index()
        targets = batch.targets[query]
        scores = as_scored(model.forward_batch(batch)[query], cfg.loss.similarity) @ items.T
        pairs = list(zip(batch.seen_items, targets.tolist(), strict=True))
        ranks["current"].append(rank_of_targets(scores, targets, batch.seen_items))
        ranks["earlier"].append(rank_of_targets(scores, targets, [seen[seen != t] for seen, t in pairs]))
        repeats.append(torch.tensor([bool((seen == t).any()) for seen, t in pairs]))
    repeat = torch.cat(repeats)
    users = {"all": torch.ones_like(repeat), "repeat": repeat, "new": ~repeat}
    out = []
    for name, who, rule in ROWS:
        m = RankingAccumulator([10]).update(torch.cat(ranks[rule])[users[who]]).compute()
        out.append({"checkpoint": run_name(checkpoint), "model": cfg.model.preset, "split": split, "ranking": name,
                    "users": int(users[who].sum()), "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"], "mrr": m["mrr"]})
    return out


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    lines = ["| ranking | users | " + " | ".join(f"{n} HR@10 / NDCG@10" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for name, _, _ in ROWS:
        these = [next(r for r in rows if r["checkpoint"] == n and r["ranking"] == name) for n in names]
        cells = [f"{r['hr@10']:.4f} / {r['ndcg@10']:.4f}" for r in these]
        lines.append(f"| {name} | {these[0]['users']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=[], help="run dirs or checkpoints, same data")
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--max-users", type=int, default=0, help="the first N users (0: all)")
    ap.add_argument("--name", default="repeat_targets", help="output: benchmarks/results/<name>.{json,md}")
    ap.add_argument("--smoke", action="store_true", help="a 4-step model on a tiny synthetic dataset (CI)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # synthetic users repeat items: both rules and both user groups are exercised
            args.checkpoints, args.max_users, args.name = [smoke_checkpoint(Path(tmp))], 20, "repeat_targets_smoke"
            args.split = "valid"
        if not args.checkpoints:
            sys.exit("repeat_targets.py: name at least one --checkpoints run (or --smoke)")
        rows = [row for ckpt in args.checkpoints for row in probe(ckpt, args.split, args.max_users)]
        # The smoke run also scores its checkpoint with launch/evaluate.py's code: the suite checks they agree.
        reference = (evaluate_checkpoint(args.checkpoints[0], [args.split], args.max_users, [10])
                     if args.smoke else None)
    print_table(rows)
    meta = {"split": args.split, "max_users": args.max_users, "checkpoints": [str(c) for c in args.checkpoints],
            "protocol": "generic query, full ranking, the user's history excluded; the earlier rule keeps a "
                        "repeated target as a candidate",
            "evaluate_checkpoint": reference and reference["metrics"]}
    path = write_result(args.name, rows, meta, markdown(rows))
    print(f"wrote {path} (.md)")


if __name__ == "__main__":
    main()
