"""How much of its context does a trained model use? Each checkpoint, the same users, the history cut to each length.

A sweep over context lengths trains one model per length, which mixes two effects: what more history gives, and
how longer rows (fewer users per step) change training. This probe removes the second: every checkpoint is
evaluated on the same validation users with its history cut to each number of behaviours (``launch/evaluate.py
--max-seq-len``), by the generic query (what the quality tables report) and by the query told the held-out
behaviour's own condition (``--condition-query``: next-condition-item, the task LUM trains on; a session start
on the long-range synthetic data is answered by finding where that category's chain stopped, possibly hundreds of
behaviours back).

    python benchmarks/context_use.py --checkpoints runs/sweeps/synthetic-context-attr/h64-L2_L{64,1024}_seed0 \\
        --behaviours 32 64 128 256 512 --max-users 1000 --name scaling/synthetic-context-attr/context-use
    python benchmarks/context_use.py --smoke     # a 4-step model on a tiny synthetic dataset (CI)

Writes ``benchmarks/results/<name>.{json,md,png}``: HR@10 / NDCG@10 per checkpoint and history length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_result  # noqa: E402

from lum_dist.config import PretrainConfig, load_config  # noqa: E402
from lum_dist.train.evaluate import evaluate_checkpoint_at  # noqa: E402
from lum_dist.train.trainer import pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = ("hr@1", "hr@10", "ndcg@10", "mrr")  # hr@1: top-1, as the generator's successor oracle


def probe(checkpoint: Path, behaviours: list[int], max_users: int) -> list[dict]:
    """One row per history length: the generic query's and the told condition's metrics on validation."""
    lengths = [2 * n + 1 for n in behaviours]  # n behaviours of 2 tokens, then the queries
    results = evaluate_checkpoint_at(checkpoint, lengths, ["valid"], max_users, [1, 10], condition_query=True)
    rows = []
    for n, result in zip(behaviours, results, strict=True):
        m = result["metrics"]
        rows.append({"checkpoint": checkpoint.name or str(checkpoint), "step": result["step"], "behaviours": n,
                     **{k: m[f"valid/{k}"] for k in METRICS}, **{f"cond_{k}": m[f"valid/cond_{k}"] for k in METRICS},
                     "users": int(m["valid/count"])})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| checkpoint | behaviours of history | generic query: HR@1 / HR@10 / NDCG@10 | told the held-out "
             "condition: HR@1 / HR@10 / NDCG@10 | users |", "|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['behaviours']} | {r['hr@1']:.4f} / {r['hr@10']:.4f} / {r['ndcg@10']:.4f} | "
              f"{r['cond_hr@1']:.4f} / {r['cond_hr@10']:.4f} / {r['cond_ndcg@10']:.4f} | {r['users']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(dict.fromkeys(r["checkpoint"] for r in rows)):
        mine = [r for r in rows if r["checkpoint"] == name]
        x = [r["behaviours"] for r in mine]
        ax.plot(x, [r["cond_ndcg@10"] for r in mine], "o-", color=f"C{i}", label=f"{name}, told the condition")
        ax.plot(x, [r["ndcg@10"] for r in mine], "s--", color=f"C{i}", alpha=0.6, label=f"{name}, generic")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("behaviours of history read at evaluation")
    ax.set_ylabel("valid NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the lines cross
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smoke_checkpoint(work: Path, overrides: list[str] | None = None) -> Path:
    """A LUM trained for 4 steps on a tiny synthetic dataset (item tokens carry their category); ``overrides``
    (``key=value``) change its config."""
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/debug-cpu.yaml", [
        f"data.path={work / 'data'}", f"train.output_dir={work / 'run'}", "train.max_steps=4", "train.zero_stage=0",
        "train.save_every=0", "data.item_attributes=true", "eval.final_splits=[valid]", "eval.max_users=20",
        *(overrides or [])])
    pretrain(cfg)
    return work / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", type=Path, default=[], help="run dirs or checkpoints (LUM)")
    ap.add_argument("--behaviours", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    ap.add_argument("--max-users", type=int, default=1000, help="the first N validation users (0: all)")
    ap.add_argument("--name", default="context_use", help="output: benchmarks/results/<name>.{json,md,png}")
    ap.add_argument("--smoke", action="store_true", help="a 4-step model on a tiny synthetic dataset (CI)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.checkpoints, args.behaviours, args.max_users = [smoke_checkpoint(Path(tmp))], [2, 8], 20
            args.name = "context_use_smoke"
        if not args.checkpoints:
            sys.exit("context_use.py: name at least one --checkpoints run (or --smoke)")
        rows = [row for ckpt in args.checkpoints for row in probe(ckpt, args.behaviours, args.max_users)]
    print_table(rows)
    meta = {"split": "valid", "max_users": args.max_users, "behaviours": args.behaviours,
            "checkpoints": [str(c) for c in args.checkpoints],
            "protocol": "each checkpoint evaluated with its history cut to 2 x behaviours + 1 tokens (launch/"
                        "evaluate.py --max-seq-len), generic query and the query told the held-out condition"}
    path = write_result(args.name, rows, meta, markdown(rows))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} (.md, .png)")


if __name__ == "__main__":
    main()
