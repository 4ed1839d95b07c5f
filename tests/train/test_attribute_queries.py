"""Evaluation by attribute queries (eval.attribute_query_weight): the group-query pass and the scores against
a reference that queries one attribute value per pass and scores with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lum_dist.checkpoint import build_run_model, model_config_for
from lum_dist.config import ConfigError, PretrainConfig
from lum_dist.data.loader import eval_batches
from lum_dist.data.prepare import item_attribute_ids, prepare
from lum_dist.data.schema import MASK_ID, NUM_SPECIAL_IDS
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets
from lum_dist.train.evaluate import attribute_queries, evaluate

USERS, WEIGHT = 12, 0.7


def _reference_metrics(model, cfg: PretrainConfig, meta, queries: np.ndarray) -> dict[str, float]:
    """One pass per attribute value (the generic query and that value's), then the score of each item from its
    value's query, normalised with explicit per-value loops."""
    path, tau = cfg.data.path, cfg.loss.temperature
    items = torch.nn.functional.normalize(model.item_embeddings(None).float(), dim=-1)
    attr = torch.from_numpy(item_attribute_ids(path, meta)[:, 0])

    def outputs(extra):  # [users, 1 + len(extra), E]: the generic query and the extra ones, per user
        rows = []
        for batch in eval_batches(path, meta, "valid", cfg.data.max_seq_len, 4096, max_users=USERS,
                                  item_attributes=cfg.data.item_attributes, extra_queries=extra):
            out = model.forward_batch(batch)[batch.query_index()]
            rows.append((out.view(batch.num_sequences, -1, out.shape[-1]), batch))
        return rows

    generic_rows = outputs(None)
    per_value = [outputs(queries[v : v + 1]) for v in range(len(queries))]
    acc = RankingAccumulator([10])
    for r, (gen, batch) in enumerate(generic_rows):
        targets = batch.targets[batch.query_index()]
        for u in range(batch.num_sequences):
            g = torch.nn.functional.normalize(gen[u, 0], dim=-1) @ items.T / tau
            g[:NUM_SPECIAL_IDS] = -math.inf
            log_p = g.log_softmax(0)
            score = log_p.clone()  # items without a value's query keep the generic score
            for v in range(len(queries)):
                members = (attr == v + NUM_SPECIAL_IDS) & torch.isfinite(g)
                if not members.any():
                    continue
                own = torch.nn.functional.normalize(per_value[v][r][0][u, 1], dim=-1) @ items[members].T / tau
                log_p_v = torch.logsumexp(log_p[members], 0)
                score[members] = (log_p_v + WEIGHT * own.log_softmax(0)
                                  + (1 - WEIGHT) * (log_p[members] - log_p_v))
            acc.update(rank_of_targets(score[None], targets[u : u + 1], [batch.seen_items[u]]))
    return acc.compute()


@torch.no_grad()
def test_attribute_queries_match_one_value_per_pass(tmp_path):
    meta = prepare({"format": "synthetic", "num_users": 60, "num_items": 80, "num_categories": 5}, tmp_path / "d")
    cfg = PretrainConfig()
    cfg.data.path, cfg.data.max_seq_len, cfg.data.item_attributes = str(tmp_path / "d"), 32, True
    cfg.eval.max_users, cfg.eval.ks = USERS, [10]
    cfg.model.overrides = {"num_layers": 2, "attribute_targets": True}
    torch.manual_seed(0)
    model = build_run_model(model_config_for(cfg, meta), cfg.data.path, meta).eval()

    queries, query_of_item = attribute_queries(meta, tmp_path / "d")
    field = meta.cond_fields.index(meta.item_cond_fields[0])
    assert len(queries) == meta.vocab_sizes[meta.item_cond_fields[0]] - NUM_SPECIAL_IDS
    assert (queries[:, field] == np.arange(NUM_SPECIAL_IDS, NUM_SPECIAL_IDS + len(queries))).all()
    assert (np.delete(queries, field, axis=1) == MASK_ID).all()
    assert (query_of_item[:NUM_SPECIAL_IDS] == -1).all()

    plain = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid")
    both = evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", WEIGHT)
    assert "valid/attrq_ndcg@10" not in plain and both["valid/attrq_count"] == USERS
    for key, value in plain.items():  # the generic query's metrics do not change beside the attribute queries
        assert both[key] == pytest.approx(value, rel=1e-6), key
    # MRR as well as NDCG@10: an untrained model on 12 users may place no target in any top 10.
    reference = _reference_metrics(model, cfg, meta, queries)
    for key in ("ndcg@10", "mrr"):
        assert both[f"valid/attrq_{key}"] == pytest.approx(reference[key], rel=1e-5), key
    assert both["valid/attrq_mrr"] != both["valid/mrr"]  # the value queries changed the ranking
    cfg.loss.learnable_temperature = True  # e.g. a checkpoint's run: evaluate refuses rather than mis-score
    with pytest.raises(ValueError, match="learned its temperature"):
        evaluate(model, tmp_path / "d", meta, cfg, torch.device("cpu"), "valid", WEIGHT)


def test_attribute_queries_need_a_fixed_temperature_and_a_weight_in_range():
    with pytest.raises(ConfigError, match="learnable_temperature"):
        cfg = PretrainConfig()
        cfg.loss.learnable_temperature = True
        cfg.eval.attribute_query_weight = 0.5
        cfg.__post_init__()
    with pytest.raises(ConfigError, match="attribute_query_weight"):
        PretrainConfig().eval.__class__(attribute_query_weight=1.5)
