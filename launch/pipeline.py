"""The whole LUM paradigm end to end, in one process: the README's main command.

    python launch/pipeline.py                     # embedded synthetic data: ~8 min on 2 busy CPU cores
    python launch/pipeline.py --config configs/pretrain/ml100k-lum.yaml \
        --downstream configs/downstream/ml100k.yaml

1. prepare the dataset (ingest + split + vocabularies) and print the dataset and packing report;
2. pretrain (step 1, knowledge construction) and evaluate by full ranking against the popularity baseline;
3. group-query the model (step 2) for the validation and test histories: the generic condition "*" plus every
   value of each item-attribute condition field (e.g. every category);
4. train the downstream DLRMs with and without those outputs (step 3) and print the comparison table;
5. print where every result went: everything lives in the run folder (train.output_dir).

Each stage is also its own command (launch/{prepare,pretrain,query,downstream}.py); this script only chains
them.

Measured once (synthetic defaults, 2 CPU cores shared with two training jobs, load ~6): 8 min 18 s wall;
data + pretraining (300 steps) + group query 1.4 min, the downstream DLRMs (4 ranking variants and 2 retrieval
variants x 3 seeds) 6.5 min, start-up 0.4 min. Idle cores take less.

Re-running it resumes: the dataset, the finished pretraining run and finished query shards are reused. The run
folder is locked while the pipeline runs: a second pipeline on the same folder refuses to start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/pretrain/synthetic.yaml",
                   help="pretraining config (step 1); its train.output_dir is the run folder")
    p.add_argument("--downstream", default="configs/downstream/synthetic.yaml",
                   help="downstream config (step 3)")
    p.add_argument("--skip-downstream", action="store_true", help="stop after the group query (step 2)")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    p.add_argument("overrides", nargs="*", help="pretraining overrides, section.key=value")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.config import GENERIC_CONDITION, PretrainConfig, QueryConfig, load_config
    from lum_dist.data.prepare import prepare
    from lum_dist.data.report import dataset_report, format_report, packing_report
    from lum_dist.downstream.config import DownstreamConfig
    from lum_dist.downstream.run import run_downstream
    from lum_dist.query.job import run as run_query
    from lum_dist.train.trainer import pretrain
    from lum_dist.utils import expand_source, folder_lock

    start = time.perf_counter()
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    run_dir = Path(cfg.train.output_dir)
    query_dirs = {split: run_dir / f"query-{split}" for split in ("valid", "test")}
    dcfg = load_config(DownstreamConfig, args.downstream, [
        f"data_path={cfg.data.path}", f"query_valid={query_dirs['valid']}",
        f"query_test={query_dirs['test']}", f"output_dir={run_dir / 'downstream'}",
    ])

    with folder_lock(run_dir):
        print("== 1. data: ingest, split, vocabularies, tokenize, pack")
        meta = prepare(expand_source(cfg.data.prepare), cfg.data.path)
        print(format_report({"dataset": dataset_report(cfg.data.path),
                             "packing": packing_report(cfg.data.path, cfg.data)}))

        print("== 2. step 1, knowledge construction: pretrain + full-ranking evaluation")
        metrics = pretrain(cfg)

        print("== 3. step 2, knowledge querying: one pass per user answers every condition")
        conditions = [GENERIC_CONDITION] + [f"{f}=ALL" for f in meta.item_cond_fields]
        # The validation-time outputs serve the downstream training requests: they must predate the first one.
        lags = {"valid": dcfg.train_requests_per_user - 1, "test": 0}
        for split, out in query_dirs.items():
            run_query(QueryConfig(checkpoint=str(run_dir), out=str(out), conditions=conditions, split=split,
                                  lag=lags[split]))
            print(f"   {split}: {out} ({len(conditions)} condition specs, lag {lags[split]})")

        result = {"pretrain": metrics, "query": {k: str(v) for k, v in query_dirs.items()}}
        if not args.skip_downstream:
            print("== 4. step 3, knowledge utilisation: DLRMs with and without LUM outputs")
            result["downstream"] = run_downstream(dcfg)

    tables = None if args.skip_downstream else Path(dcfg.output_dir) / dcfg.name
    print(format_outputs(cfg.data.path, run_dir, query_dirs, tables, time.perf_counter() - start))
    return result


def format_outputs(data_path: str, run_dir: Path, query_dirs: dict[str, Path], tables: Path | None,
                   seconds: float) -> str:
    """The closing block: where each stage's results are."""
    rows = [("dataset", f"{data_path} (meta.json, users/, vocab/)"), ("run folder", str(run_dir)),
            ("pretraining", f"{run_dir / 'result.json'} (final evaluation), {run_dir / 'metrics.jsonl'}, "
                            f"{run_dir / 'checkpoints'} (best, latest)"),
            *[(f"query ({split})", f"{out} (manifest.json, part-*.parquet, items.parquet)")
              for split, out in query_dirs.items()]]
    if tables is not None:
        rows.append(("downstream tables", f"{tables}.md, {tables}.json"))
    return "\n".join([f"== results (pipeline took {seconds / 60:.1f} min)",
                      *[f"   {label + ':':<20}{where}" for label, where in rows]])


if __name__ == "__main__":
    cli.run(main)
