"""Step 3 end to end: samples, LUM features, every ranking and retrieval variant x seed, the report.

``run_downstream(cfg)`` returns (and writes atomically to ``<output_dir>/<name>.json`` and ``.md``)::

    {"meta": {config, dataset counts, the LUM model of the features, device, git commit, ...},
     "ranking":   {variant: {"runs": [per-seed metrics], "mean": {...}, "std": {...}, "delta": {...}}},
     "retrieval": {variant: {...same...}}}

``delta`` is the variant's mean minus the base variant's mean. Retrieval also lists ``popularity``, a
reference (training counts, ranked with the same exclusions), not a trained variant. Negatives are drawn
once (``sample_seed``), so every variant and seed is scored on the same samples; ``seeds`` vary model initialisation and shuffling.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from lum_dist.config import to_dict
from lum_dist.downstream import ranking, retrieval
from lum_dist.downstream.config import DownstreamConfig
from lum_dist.downstream.lum_features import conditional_outputs, model_versions, open_query_dir, user_outputs
from lum_dist.downstream.samples import (
    CTRSamples,
    Dataset,
    Requests,
    build_requests,
    ctr_samples,
    load_dataset,
)
from lum_dist.downstream.train import split_holdout
from lum_dist.utils import atomic_write_text, device_name, git_commit


def lum_for_ctr(data: Dataset, req: Requests, s: CTRSamples, query_dir: str, split: str,
                min_lag: int) -> ranking.LumCTR:
    manifest = open_query_dir(query_dir, split, data.meta.name, min_lag)
    outputs = user_outputs(query_dir, manifest, req.user_id, req.position, data.item_raw)
    generic = outputs.generic[s.request]
    conditional, coverage = conditional_outputs(query_dir, manifest, [req.user_id[i] for i in s.request],
                                                req.position[s.request], data.attr_field, data.attr_raw,
                                                data.item_attr[s.cand], generic)
    return ranking.LumCTR(conditional=conditional, generic=generic, cand_item=outputs.item[s.cand], coverage=coverage)


def _logged(what: str, train: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """``train(*args)`` for one (variant, seed), with a printed line: the progress of a long comparison."""
    t0 = time.time()
    result = train(*args)
    if PartialState().is_main_process:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("train_loss", "best_epoch"))
        print(f"[downstream] {what}: {shown}  (best epoch {result['best_epoch']}, {time.time() - t0:.0f} s)",
              flush=True)
    return result


def summarise(runs: list[dict[str, float]], base: dict[str, float] | None) -> dict[str, Any]:
    keys = list(runs[0])
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    std = {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys}
    delta = {k: mean[k] - base[k] for k in keys} if base is not None else {k: 0.0 for k in keys}
    return {"runs": runs, "mean": mean, "std": std, "delta": delta}


def run_ranking(cfg: DownstreamConfig, data: Dataset, train_req: Requests, eval_req: Requests) -> tuple[dict, dict]:
    train_s = ctr_samples(train_req, data.num_items, cfg.neg_ratio, cfg.sample_seed)
    eval_s = ctr_samples(eval_req, data.num_items, cfg.neg_ratio, cfg.sample_seed + 1)
    lum_train = lum_eval = stats = None
    if any(v != "base" for v in cfg.ranking.variants):
        lum_train = lum_for_ctr(data, train_req, train_s, cfg.query_valid, "valid", cfg.train_requests_per_user - 1)
        lum_eval = lum_for_ctr(data, eval_req, eval_s, cfg.query_test, "test", 0)
        m = ranking.match_features(lum_train)
        stats = (m.mean(0), np.maximum(m.std(0), 1e-6))
    eval_users = np.array(eval_req.user_id)[eval_s.request]
    train_users = torch.from_numpy(train_req.user_idx[train_s.request])  # holdout by user: no near-duplicates
    results: dict[str, Any] = {}
    for variant in cfg.ranking.variants:
        train = ranking.ctr_tensors(train_req, train_s, data.item_attr, variant, lum_train, stats)
        train, holdout = split_holdout(train, train_users, cfg.holdout_fraction, cfg.sample_seed)
        evaluation = ranking.ctr_tensors(eval_req, eval_s, data.item_attr, variant, lum_eval, stats)
        runs = [_logged(f"ranking {variant:<10} seed {seed}", ranking.train_and_evaluate, variant, cfg.ranking, seed,
                        data.num_items, data.num_attrs, train, evaluation, eval_users, holdout, cfg.patience)
                for seed in cfg.seeds]
        results[variant] = summarise(runs, results["base"]["mean"] if "base" in results else None)
    counts = {"train_samples": len(train_s.label), "eval_samples": len(eval_s.label)}
    if lum_eval is not None:
        counts["lum_conditional_coverage"] = {"train": lum_train.coverage, "eval": lum_eval.coverage}
    return results, counts


def run_retrieval(cfg: DownstreamConfig, data: Dataset, train_req: Requests, eval_req: Requests) -> dict:
    lum_train = lum_eval = None
    if "lum" in cfg.retrieval.variants:
        lum_train = user_outputs(cfg.query_valid, open_query_dir(cfg.query_valid, "valid", data.meta.name,
                                                                 cfg.train_requests_per_user - 1),
                                 train_req.user_id, train_req.position, data.item_raw)
        lum_eval = user_outputs(cfg.query_test, open_query_dir(cfg.query_test, "test", data.meta.name),
                                eval_req.user_id, eval_req.position, data.item_raw)
    results: dict[str, Any] = {}
    for variant in cfg.retrieval.variants:
        use = variant == "lum"
        train = retrieval.request_tensors(train_req, data.item_attr, lum_train.generic if use else None)
        train, holdout = split_holdout(train, train["user_idx"], cfg.holdout_fraction, cfg.sample_seed)
        evaluation = retrieval.request_tensors(eval_req, data.item_attr, lum_eval.generic if use else None)
        lum_items = lum_train.item if use and cfg.retrieval.lum_item_tower else None
        runs = [_logged(f"retrieval {variant:<10} seed {seed}", retrieval.train_and_evaluate, cfg.retrieval, seed,
                        data.users.num_rows, data.item_attr, data.num_attrs, train, evaluation, eval_req.history,
                        lum_items, holdout, cfg.patience)
                for seed in cfg.seeds]
        results[variant] = summarise(runs, results["base"]["mean"] if "base" in results else None)
    results["popularity"] = summarise([retrieval.popularity_metrics(cfg.retrieval, cfg.data_path, data.num_items,
                                                                    eval_req)], results["base"]["mean"])
    return results


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# Downstream results: {meta['name']}", "",
             f"dataset `{meta['dataset']}`, {meta['counts']['train_requests']} train / "
             f"{meta['counts']['eval_requests']} eval requests, seeds {meta['config']['seeds']}, "
             f"{meta['device']}, commit `{meta['git_commit']}`. Mean ± std over seeds; Δ = mean − base mean.", ""]
    versions = sorted(set(meta.get("lum_model", {}).values()))
    if versions:
        lines[-1:-1] = [f"LUM features from {', '.join(f'`{v}`' for v in versions)} (run / checkpoint / weights "
                        "hash, from the query manifests)."]
    for section in ("ranking", "retrieval"):
        variants = result[section]
        metrics = [k for k in next(iter(variants.values()))["mean"] if k not in ("train_loss", "best_epoch")]
        lines += [f"## {section}", "", "| variant | " + " | ".join(metrics) + " | " + " | ".join(f"Δ {m}" for m in metrics)
                  + " |", "|---" * (1 + 2 * len(metrics)) + "|"]
        for name, v in variants.items():
            cells = [f"{v['mean'][m]:.4f} ± {v['std'][m]:.4f}" for m in metrics]
            cells += [f"{v['delta'][m]:+.4f}" for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_downstream(cfg: DownstreamConfig) -> dict[str, Any]:
    """Train and evaluate every configured variant x seed; write <output_dir>/<name>.{json,md}; return the dict."""
    t0 = time.time()
    data = load_dataset(cfg.data_path, cfg.attr_field, cfg.max_users)
    train_req = build_requests(data, "train", cfg.max_history, cfg.train_requests_per_user)
    eval_req = build_requests(data, "eval", cfg.max_history)
    rank_results, counts = run_ranking(cfg, data, train_req, eval_req)
    retr_results = run_retrieval(cfg, data, train_req, eval_req)
    meta = {"name": cfg.name, "dataset": data.meta.name, "attr_field": data.attr_field, "config": to_dict(cfg),
            "lum_model": model_versions({"valid": cfg.query_valid, "test": cfg.query_test}),
            "counts": {"users": data.users.num_rows, "items": data.num_items, "train_requests": len(train_req.target),
                       "eval_requests": len(eval_req.target), "dropped_unk_targets":
                       train_req.dropped_unk + eval_req.dropped_unk, **counts},
            "device": device_name(), "processes": PartialState().num_processes, "git_commit": git_commit(),
            "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    result = {"meta": meta, "ranking": rank_results, "retrieval": retr_results}
    if PartialState().is_main_process:  # under `accelerate launch` every process holds the same result
        out = Path(cfg.output_dir)
        atomic_write_text(out / f"{cfg.name}.json", json.dumps(result, indent=2) + "\n")
        text = markdown(result)
        atomic_write_text(out / f"{cfg.name}.md", text)
        print(text)
    return result
