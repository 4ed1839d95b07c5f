"""Where does one model win and another lose? The same users, bucketed by what the training data says about them.

Each held-out behaviour (validation: item[-2], test: item[-1]) is scored as ``launch/evaluate.py`` scores it, and
its user falls in two bucketings, both read from the training sequences (every user's behaviours before
``train_end``, the only ones any model trained on):

* **transition**: how often the pair (last history item -> held-out item) follows one another in training. A
  pair seen once or more is an exact item-to-item transition a model can remember; a pair never seen must be
  inferred from what the user and the items have in common with others.
* **target popularity**: how often the held-out item occurs in training.

    python benchmarks/transition_buckets.py --checkpoints runs/sasrec runs/lum --name quality/transition-buckets-beauty
    python benchmarks/transition_buckets.py --checkpoints runs/lum --skip-scales 0 0.5 1 1.5 --name quality/skip-scale
    python benchmarks/transition_buckets.py --checkpoints runs/sasrec runs/lum --prior-weights 0 1 2 --name quality/prior
    python benchmarks/transition_buckets.py --smoke     # a 4-step model on a tiny synthetic dataset (CI)

``--skip-scales`` scores a model with ``model.overrides.previous_item_skip`` once per scale a of its skip's
contribution (``out + a W v``; 1 as trained, 0 without it): how much of each bucket the remembered transition holds.

``--prior-weights`` scores every model once per weight w of a transition prior, item-to-item collaborative
filtering's bigram counts: the logit of item j (similarity / the run's loss temperature) gains
``w * log(1 + count(last history item -> j))``, counted over the training behaviours. It asks whether plain counting
closes a model's gap on remembered transitions, and whether it helps LUM more than SASRec.

The first checkpoint is the yardstick: every other one gets its HR@10 ratio to it per bucket. Writes
``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402
from context_use import smoke_checkpoint  # noqa: E402
from valid_test_gap import rank_users, run_name, users_with_both_splits  # noqa: E402

from lum_dist.checkpoint import load_model, resolve_checkpoint  # noqa: E402
from lum_dist.config import PretrainConfig  # noqa: E402
from lum_dist.data.tokenize import TokenSeq, tokenize_eval  # noqa: E402
from lum_dist.eval.metrics import RankingAccumulator  # noqa: E402
from lum_dist.model import LUMModel, SASRecModel  # noqa: E402

SPLIT_END = {"valid": "train_end", "test": "valid_end"}  # the index of each split's held-out behaviour
TRANSITION_BUCKETS = ((0, 0), (1, 1), (2, 4), (5, None))
POPULARITY_BUCKETS = ((0, 4), (5, 19), (20, 99), (100, None))


def training_counts(users: list[dict]) -> tuple[Counter, Counter]:
    """(pair -> count, item -> count) over every user's training behaviours [0, train_end)."""
    pairs, items = Counter(), Counter()
    for u in users:
        seq = u["item"][: u["train_end"]]
        items.update(seq)
        pairs.update(zip(seq[:-1], seq[1:], strict=True))
    return pairs, items


def bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


def bucket_of(values: np.ndarray, buckets: tuple[tuple[int, int | None], ...]) -> list[np.ndarray]:
    """One bool mask per (lo, hi) bucket, bounds inclusive, hi None = unbounded."""
    return [(values >= lo) & (values <= (np.inf if hi is None else hi)) for lo, hi in buckets]


def user_features(users: list[dict], split: str, pairs: Counter, items: Counter) -> dict[str, np.ndarray]:
    """Per user: how often its (last history item -> held-out item) pair and its held-out item occur in training."""
    end = [u[SPLIT_END[split]] for u in users]
    last = [u["item"][e - 1] if e > 0 else None for u, e in zip(users, end, strict=True)]
    target = [u["item"][e] for u, e in zip(users, end, strict=True)]
    return {"transition": np.array([pairs[(a, b)] if a is not None else 0 for a, b in zip(last, target, strict=True)]),
            "target popularity": np.array([items[t] for t in target])}


def bucket_rows(name: str, split: str, ranks: np.ndarray, features: dict[str, np.ndarray]) -> list[dict]:
    """HR@10 / NDCG@10 of ``ranks`` over all users and within every bucket of both bucketings."""
    groups = [("all", "all", np.ones(len(ranks), dtype=bool))]
    for key, buckets in (("transition", TRANSITION_BUCKETS), ("target popularity", POPULARITY_BUCKETS)):
        groups += [(key, bucket_label(*b), m) for b, m in zip(buckets, bucket_of(features[key], buckets), strict=True)]
    rows = []
    for key, label, mask in groups:
        m = RankingAccumulator([10]).update(torch.from_numpy(ranks[mask])).compute() if mask.any() else {}
        rows.append({"checkpoint": name, "split": split, "bucketing": key, "bucket": label, "users": int(mask.sum()),
                     "hr@10": m.get("hr@10", float("nan")), "ndcg@10": m.get("ndcg@10", float("nan"))})
    return rows


def transition_prior(pairs: Counter, num_items: int) -> torch.Tensor:
    """Sparse COO [num_items, num_items] float32: log(1 + how often item j follows item i in training), from
    ``training_counts``' pairs."""
    index = torch.tensor(list(pairs), dtype=torch.int64).reshape(-1, 2).T
    counts = torch.tensor(list(pairs.values()), dtype=torch.float32)
    return torch.sparse_coo_tensor(index, counts.log1p(), (num_items, num_items), check_invariants=True).coalesce()


def ranks_per_prior_weight(model: LUMModel | SASRecModel, cfg: PretrainConfig, seqs: list[TokenSeq],
                           last_items: np.ndarray, prior: torch.Tensor,
                           weights: list[float]) -> dict[float, np.ndarray]:
    """``rank_users`` once per weight w: the logit of item j (score / temperature) plus w * prior[last item, j]."""
    if cfg.loss.learnable_temperature:
        raise ValueError("--prior-weights: the run learned its temperature; the logit scale is not in its config")
    scale = cfg.loss.temperature  # score = logit * temperature: the bonus in the loss's logit units
    last = torch.from_numpy(last_items)

    def bonus_for(weight: float):
        return lambda packed: weight * scale * prior.index_select(0, last[packed]).to_dense()

    return {w: rank_users(model, cfg, seqs, bonus_for(w) if w else None) for w in weights}


def ranks_per_skip_scale(model: LUMModel, cfg: PretrainConfig, seqs: list[TokenSeq],
                         scales: list[float]) -> dict[float, np.ndarray]:
    """``rank_users`` once per scale a of the previous-item skip's contribution (``out + a W v``; the skip is
    linear in W, so W is scaled); W is restored afterwards."""
    skip = model.previous_item_skip
    trained = skip.weight.detach().clone()
    ranks = {}
    try:
        for scale in scales:
            skip.weight.data = scale * trained
            ranks[scale] = rank_users(model, cfg, seqs)
    finally:
        skip.weight.data = trained
    return ranks


def probe(checkpoint: Path, splits: list[str], max_users: int, skip_scales: list[float] | None = None,
          prior_weights: list[float] | None = None) -> list[dict]:
    """Bucket rows of one checkpoint: as trained, or once per scale of its previous-item skip (``skip_scales``; a
    model without the skip is scored as trained), or once per weight of the transition prior (``prior_weights``)."""
    model, cfg, meta = load_model(resolve_checkpoint(checkpoint))
    model.eval()
    if getattr(model, "previous_item_skip", None) is None:
        skip_scales = None  # e.g. the SASRec yardstick: scored as trained
    users = users_with_both_splits(cfg.data.path)
    pairs, items = training_counts(users)  # from every user, whatever max_users scores
    prior = transition_prior(pairs, meta.num_items) if prior_weights else None
    users = users[:max_users] if max_users else users
    name = run_name(checkpoint)
    out = []
    for split in splits:
        end = [u[SPLIT_END[split]] for u in users]
        seqs = [tokenize_eval(u, meta, cfg.data.max_seq_len, e, cfg.data.item_attributes)
                for u, e in zip(users, end, strict=True)]
        features = user_features(users, split, pairs, items)
        if prior is not None:
            last = np.array([u["item"][e - 1] if e > 0 else 0 for u, e in zip(users, end, strict=True)])
            variants = {f"{name} (prior x{w:g})": r
                        for w, r in ranks_per_prior_weight(model, cfg, seqs, last, prior, prior_weights).items()}
        elif skip_scales:
            variants = {f"{name} (skip x{a:g})": r for a, r in ranks_per_skip_scale(model, cfg, seqs, skip_scales).items()}
        else:
            variants = {name: rank_users(model, cfg, seqs)}
        for label, ranks in variants.items():
            out += bucket_rows(label, split, ranks, features)
    return out


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row plus ``hr_ratio`` / ``ndcg_ratio`` to the first checkpoint's row of the same split and bucket."""
    base = rows[0]["checkpoint"]
    ref = {(r["split"], r["bucketing"], r["bucket"]): r for r in rows if r["checkpoint"] == base}
    out = []
    for r in rows:
        b = ref[(r["split"], r["bucketing"], r["bucket"])]
        ratio = {k.split("@")[0] + "_ratio": (r[k] / b[k] if b[k] else float("nan")) for k in ("hr@10", "ndcg@10")}
        out.append({**r, **ratio})
    return out


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    head = "| split | bucketing | bucket | users | " + " | ".join(f"{n} HR@10 / NDCG@10" for n in names)
    head += "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |"
    lines = ["# Per-user ranks bucketed by the training data (`benchmarks/transition_buckets.py`)", "",
             "HR@10 / NDCG@10 of each checkpoint's generic query (the history's items excluded, as `launch/evaluate.py`);",
             "users bucketed by how often their (last history item -> held-out item) pair follows one another in",
             f"training, and by how often the held-out item occurs there. Ratios are to `{names[0]}`.", "",
             head, "|---" * (4 + 2 * len(names) - 1) + "|"]
    keys = list(dict.fromkeys((r["split"], r["bucketing"], r["bucket"]) for r in rows))
    for key in keys:
        these = [next(r for r in rows if r["checkpoint"] == n and (r["split"], r["bucketing"], r["bucket"]) == key)
                 for n in names]
        cells = [f"{r['hr@10']:.4f} / {r['ndcg@10']:.4f}" for r in these]
        cells += [f"{r['hr_ratio']:.2f} / {r['ndcg_ratio']:.2f}" for r in these[1:]]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {these[0]['users']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=[],
                    help="run dirs or checkpoints of one dataset; the first is the yardstick")
    ap.add_argument("--splits", nargs="+", default=["valid", "test"], choices=list(SPLIT_END))
    ap.add_argument("--max-users", type=int, default=0, help="the first N users with both splits (0: all)")
    ap.add_argument("--name", default="transition_buckets", help="output: benchmarks/results/<name>.{json,md}")
    variants = ap.add_mutually_exclusive_group()
    variants.add_argument("--skip-scales", nargs="+", type=float, default=None,
                          help="score each checkpoint with a previous-item skip once per scale of it (1: as trained)")
    variants.add_argument("--prior-weights", nargs="+", type=float, default=None,
                          help="score each checkpoint once per weight of the transition prior (0: as trained)")
    ap.add_argument("--smoke", action="store_true", help="a 4-step model on a tiny synthetic dataset (CI)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.checkpoints, args.max_users = [smoke_checkpoint(Path(tmp))], 20
            args.name = "transition_buckets_smoke"
        if not args.checkpoints:
            sys.exit("transition_buckets.py: name at least one --checkpoints run (or --smoke)")
        rows = with_ratios([row for ckpt in args.checkpoints for row in probe(ckpt, args.splits, args.max_users,
                                                                                 args.skip_scales, args.prior_weights)])
    print_table(rows)
    meta = {"max_users": args.max_users, "checkpoints": [str(c) for c in args.checkpoints], "yardstick": 0,
            "skip_scales": args.skip_scales, "prior_weights": args.prior_weights,
            "protocol": "generic query, the history's items excluded (as launch/evaluate.py); buckets counted over "
                        "every user's training behaviours [0, train_end)"}
    path = write_result(args.name, rows, meta, markdown(rows))
    print(f"wrote {path} (.md)")


if __name__ == "__main__":
    main()
