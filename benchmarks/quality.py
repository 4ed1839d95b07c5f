"""The quality table: LUM beside its yardsticks (SASRec with full softmax, popularity) on public data.

Every cell is a real pretraining run of ``launch/pretrain.py`` (the configs in ``configs/pretrain/``), early-stopped
on validation; its best checkpoint is evaluated once on validation and test (full ranking over all items, the
user's whole history excluded). Runs are resumable: a run with a ``result.json`` is not run again, so the script
can be stopped and restarted.

    python benchmarks/quality.py                          # tuning datasets x {lum, sasrec} x seeds 0 1 2
    python benchmarks/quality.py --datasets beauty --seeds 0
    python benchmarks/quality.py --heldout                # Sports, Toys, Yelp, LastFM once (seed 0), same configs
    python benchmarks/quality.py --report-only            # re-collect finished runs
    python benchmarks/quality.py --models lum --reuse benchmarks/results/quality/tuning.json
                                                          # LUM again, SASRec's runs taken from the last table

Writes ``benchmarks/results/quality/<table>.{md,json}`` (``tuning`` or ``heldout``, or ``--table``); the JSON keeps every
run's ``result.json``, which is what ``--reuse`` reads back when only one model's config changed (several tables:
a later one's runs of a dataset replace an earlier one's). The held-out datasets reuse
the Beauty configs with only the data changed: they check that the recipe generalises and are never tuned on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, git_commit  # noqa: E402

from lum_dist.utils import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lum", "sasrec")
# dataset -> (config stem, overrides that point the config at the dataset)
TUNING = {
    "beauty": ("beauty", []),
    "ml100k": ("ml100k", []),
    "ml-latest-small": ("mlsmall", []),
}
HELDOUT = {
    name: ("beauty", [f"data.path=runs/data/{name}",
                      f"data.prepare={{format: s3rec, input: '${{LUM_DATA_DIR}}/s3rec-seq/{file}.txt'}}"])
    for name, file in (("sports", "Sports_and_Outdoors"), ("toys", "Toys_and_Games"), ("yelp", "Yelp"),
                       ("lastfm", "LastFM"))
}
METRICS = ("hr@10", "ndcg@10")


def run_dir(root: Path, dataset: str, model: str, seed: int) -> Path:
    return root / f"{dataset}-{model}-seed{seed}"


def train(root: Path, dataset: str, spec: tuple[str, list[str]], model: str, seed: int, threads: int) -> dict:
    """One pretraining run (skipped when finished); its result.json."""
    out = run_dir(root, dataset, model, seed)
    if not (out / "result.json").is_file():
        stem, overrides = spec
        cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config",
               str(REPO / f"configs/pretrain/{stem}-{model}.yaml"), *overrides, f"train.output_dir={out}",
               f"train.seed={seed}", f"data.seed={seed}", "logging.wandb_mode=disabled"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
        out.mkdir(parents=True, exist_ok=True)
        print(f"[quality] {out.name}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        with open(out / "train.log", "ab") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{out.name} failed (exit {rc}); see {out / 'train.log'}")
        print(f"[quality] {out.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "result.json").read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def reused_runs(paths: list[Path], datasets: list[str], models: list[str]) -> dict[tuple[str, str], list[dict]]:
    """The runs of ``models`` on ``datasets`` from tables' JSON (their ``runs``: ``"dataset/model"`` -> the runs'
    ``result.json``, in seed order); a later table's pair replaces an earlier one's (e.g. a dataset re-run under a
    new evaluation rule). An absent pair is an error, not a silently empty column."""
    runs = {}
    for path in paths:
        runs.update(json.loads(path.read_text())["runs"])
    missing = [f"{d}/{m}" for d in datasets for m in models if f"{d}/{m}" not in runs]
    if missing:
        raise SystemExit(f"{', '.join(map(str, paths))}: no runs for {', '.join(missing)}")
    return {(d, m): runs[f"{d}/{m}"] for d in datasets for m in models}


def table(results: dict[tuple[str, str], list[dict]], datasets: list[str]) -> tuple[str, list[dict]]:
    """Markdown: per dataset and split, LUM / SASRec / popularity HR@10 and NDCG@10 (mean ± std over seeds) and
    LUM's ratio to SASRec."""
    lines = ["| dataset | split | seeds | LUM HR@10 | SASRec HR@10 | pop HR@10 | LUM NDCG@10 | SASRec NDCG@10 | "
             "pop NDCG@10 | LUM / SASRec (HR, NDCG) | epochs LUM / SASRec | minutes LUM / SASRec |",
             "|---" * 12 + "|"]
    rows = []
    for ds in datasets:
        lum, sas = results.get((ds, "lum"), []), results.get((ds, "sasrec"), [])
        if not lum and not sas:
            continue
        for split in ("valid", "test"):
            def vals(runs, key, split=split):
                return [r["eval"][f"{split}/{key}"] for r in runs]

            row = {"dataset": ds, "split": split, "seeds": len(lum)}
            cells = []
            for m in METRICS:
                for name, runs in (("lum", lum), ("sasrec", sas)):
                    row[f"{name}_{m}"] = vals(runs, m)
                    cells.append(mean_std(vals(runs, m)) if runs else "-")
                pop = vals(lum or sas, f"pop_{m}")
                row[f"pop_{m}"] = pop[0]
                cells.append(f"{pop[0]:.4f}")
            ratio = " / ".join(f"{statistics.mean(vals(lum, m)) / statistics.mean(vals(sas, m)):.3f}"
                               for m in METRICS) if lum and sas else "-"
            epochs = " / ".join(f"{statistics.mean(r['epochs'] for r in runs):.0f}" if runs else "-" for runs in (lum, sas))
            minutes = " / ".join(f"{statistics.mean(r['wall_seconds'] for r in runs) / 60:.0f}"
                                 if runs and all("wall_seconds" in r for r in runs) else "-" for runs in (lum, sas))
            lines.append(f"| {ds} | {split} | {len(lum)} / {len(sas)} | {cells[0]} | {cells[1]} | {cells[2]} | "
                         f"{cells[3]} | {cells[4]} | {cells[5]} | {ratio} | {epochs} | {minutes} |")
            rows.append(row)
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=None, help="default: every tuning (or held-out) dataset")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (held-out: 0)")
    p.add_argument("--heldout", action="store_true", help="the held-out datasets, once, with the Beauty configs")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line printed under the table (repeatable), e.g. "
                   "about an interrupted run")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "quality")
    p.add_argument("--reuse", type=Path, nargs="+", default=None, help="previous tables' JSON: the models not in "
                   "--models are taken from their runs instead of trained (their configs must be unchanged); a later "
                   "file's runs of a dataset replace an earlier one's")
    p.add_argument("--table", default=None, help="the table's file name (default: tuning, or heldout)")
    args = p.parse_args(argv)
    specs = HELDOUT if args.heldout else TUNING
    datasets = args.datasets or list(specs)
    seeds = args.seeds or ([0] if args.heldout else [0, 1, 2])
    results = reused_runs(args.reuse, datasets, [m for m in MODELS if m not in args.models]) if args.reuse else {}
    for ds in datasets:
        for model in args.models:
            for seed in seeds:
                out = run_dir(args.runs, ds, model, seed)
                if args.report_only:
                    if (out / "result.json").is_file():
                        results.setdefault((ds, model), []).append(json.loads((out / "result.json").read_text()))
                    continue
                results.setdefault((ds, model), []).append(train(args.runs, ds, specs[ds], model, seed, args.threads))
    name = args.table or ("heldout" if args.heldout else "tuning")
    text, rows = table(results, datasets)
    print(text)
    md_path, json_path = RESULTS / "quality" / f"{name}.md", RESULTS / "quality" / f"{name}.json"
    atomic_write_text(md_path, f"# Quality: {name} datasets\n\nFull ranking over all items, the user's "
                      "whole history excluded (a held-out item the user already had is a miss); best validation "
                      "checkpoint evaluated once on valid and test; mean ± std "
                      f"over seeds. Commit `{git_commit()}`.\n\n{text}\n" + "".join(f"\n- {n}" for n in args.note)
                      + ("\n" if args.note else ""))
    atomic_write_text(json_path, json.dumps({"rows": rows, "notes": args.note, "runs": {
        f"{d}/{m}": r for (d, m), r in results.items()}}, indent=2, default=str) + "\n")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
