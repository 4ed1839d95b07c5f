"""Evaluation by the held-out behaviour's own condition (eval.condition_query): inside the group-query pass, against
a reference that feeds each user's history and that condition token as one plain causal sequence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lum_dist.checkpoint import build_run_model, model_config_for
from lum_dist.config import ConfigError, PretrainConfig
from lum_dist.data.packing import collate
from lum_dist.data.prepare import prepare, read_users
from lum_dist.data.schema import NUM_SPECIAL_IDS, DatasetMeta
from lum_dist.data.tokenize import tokenize_train
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets
from lum_dist.model import LUMModel, SASRecModel
from lum_dist.train.evaluate import evaluate
from lum_dist.train.trainer import pretrain

USERS, MAX_SEQ_LEN = 12, 21  # 10 behaviours of history: long users are cut, as evaluation cuts them


def _reference(model, cfg: PretrainConfig, meta) -> dict[str, float]:
    """Per user: behaviours [lo, train_end] tokenized as training does, the last item token dropped, one causal
    pass; the output at the held-out behaviour's condition token is ranked over all items (but the user's history,
    with ``eval.exclude_history``)."""
    items = torch.nn.functional.normalize(model.item_embeddings(None).float(), dim=-1)
    items[:NUM_SPECIAL_IDS] = 0.0
    acc = RankingAccumulator([10])
    rows = read_users(cfg.data.path).to_pylist()
    rows = [r for r in rows if r["train_end"] < min(len(r["item"]), r["valid_end"])][:USERS]  # eval_target_index
    for row in rows:
        end = row["train_end"]
        lo = max(0, end - (MAX_SEQ_LEN - 1) // 2)
        window = {**row, "train_end": end + 1}  # behaviours [lo, end], time gaps from the whole history
        (seq,) = tokenize_train(window, meta, 2 * (end + 1 - lo), item_attributes=cfg.data.item_attributes)
        seq = replace(seq, **{k: v[:-1] for k, v in vars(seq).items() if isinstance(v, np.ndarray)})
        batch = collate([seq], [[0]], len(seq))
        out = torch.nn.functional.normalize(model.forward_batch(batch)[-1].float(), dim=-1)
        acc.update(rank_of_targets((out @ items.T)[None], torch.tensor([row["item"][end]]),
                                   [torch.from_numpy(np.unique(row["item"][:end] if cfg.eval.exclude_history
                                                               else []).astype(np.int64))]))
    return acc.compute()


def _untrained_lum(tmp_path: Path) -> tuple[DatasetMeta, PretrainConfig, LUMModel]:
    """A 2-block LUM at its initial weights on a small synthetic dataset, evaluated on the first USERS users."""
    meta = prepare({"format": "synthetic", "num_users": 60, "num_items": 80, "num_categories": 5}, tmp_path / "d")
    cfg = PretrainConfig()
    cfg.data.path, cfg.data.max_seq_len, cfg.data.item_attributes = str(tmp_path / "d"), MAX_SEQ_LEN, True
    cfg.eval.max_users, cfg.eval.ks = USERS, [10]
    cfg.model.overrides = {"num_layers": 2}
    torch.manual_seed(0)
    model = build_run_model(model_config_for(cfg, meta), cfg.data.path, meta).eval()
    return meta, cfg, model


@torch.no_grad()
def test_condition_query_matches_a_plain_causal_pass(tmp_path):
    meta, cfg, model = _untrained_lum(tmp_path)
    assert meta.has_timestamps  # the condition token's time gap is part of what the query must carry

    plain = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid")
    both = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", condition_query=True)
    assert "valid/cond_ndcg@10" not in plain and both["valid/cond_count"] == USERS
    for key, value in plain.items():  # the generic query's metrics do not change beside the condition query
        assert both[key] == pytest.approx(value, rel=1e-6), key
    reference = _reference(model, cfg, meta)
    for k in ("hr@10", "ndcg@10", "mrr"):
        assert both[f"valid/cond_{k}"] == pytest.approx(reference[k], rel=1e-5), k
    assert both["valid/cond_mrr"] != both["valid/mrr"]  # the condition changed the ranking


@torch.no_grad()
def test_evaluation_without_history_exclusion_ranks_every_item(tmp_path):
    # Synthetic users repeat items: with the history excluded a repeated held-out item is a miss, without it every
    # item is a candidate and a repeat can be hit.
    meta, cfg, model = _untrained_lum(tmp_path)
    excluded = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", condition_query=True)
    cfg.eval.exclude_history = False
    every = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", condition_query=True)
    reference = _reference(model, cfg, meta)
    for k in ("hr@10", "ndcg@10", "mrr"):
        assert every[f"valid/cond_{k}"] == pytest.approx(reference[k], rel=1e-5), k
    assert every["valid/mrr"] != excluded["valid/mrr"] and every["valid/pop_mrr"] != excluded["valid/pop_mrr"]


def test_condition_query_needs_a_model_that_reads_conditions(tmp_path):
    meta = prepare({"format": "synthetic", "num_users": 20, "num_items": 40}, tmp_path / "d")
    cfg = PretrainConfig()
    cfg.data.path, cfg.data.max_seq_len, cfg.model.preset = str(tmp_path / "d"), 21, "sasrec"
    model = build_run_model(model_config_for(cfg, meta), cfg.data.path, meta)
    assert isinstance(model, SASRecModel)
    with pytest.raises(ValueError, match="only LUM reads conditions"):
        evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", condition_query=True)


@pytest.mark.parametrize(("key", "value"), [("condition_query", True), ("attribute_query_weight", 0.5)])
def test_pretrain_refuses_condition_queries_for_sasrec_before_reading_data(tmp_path, key, value):
    cfg = PretrainConfig()
    cfg.data.path, cfg.model.preset = str(tmp_path / "no-data-here"), "sasrec"
    setattr(cfg.eval, key, value)
    with pytest.raises(ConfigError, match=f"eval.{key}: only LUM reads conditions") as err:
        pretrain(cfg)
    assert err.value.key == f"eval.{key}" and not (tmp_path / "no-data-here").exists()
