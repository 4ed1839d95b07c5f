"""Synthetic generator: deterministic from the seed, fast, with the planted structure it promises."""

from __future__ import annotations

import time

import numpy as np

from lum_dist.data.ingest import get_adapter
from lum_dist.data.synthetic import synthetic_arrays


def test_deterministic_from_seed():
    a, b, c = (
        synthetic_arrays(num_users=200, seed=1),
        synthetic_arrays(num_users=200, seed=1),
        synthetic_arrays(num_users=200, seed=2),
    )
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["item"][:500], c["item"][:500])
    ta = get_adapter("synthetic")({"num_users": 50, "seed": 1}).table
    assert ta.equals(get_adapter("synthetic")({"num_users": 50, "seed": 1}).table)


def test_defaults_fast_and_shaped():
    start = time.perf_counter()
    a = synthetic_arrays()
    assert time.perf_counter() - start < 5
    lens = np.bincount(a["user"])
    assert len(lens) == 3000 and lens.min() >= 5 and lens.max() <= 200
    assert np.mean(lens) > 1.3 * np.median(lens)  # long-tailed
    assert set(np.unique(a["item"])) <= set(range(1000)) and len(np.unique(a["category"])) == 20
    same = a["user"][1:] == a["user"][:-1]
    assert (np.diff(a["ts"])[same] > 0).all()  # strictly increasing within a user
    assert 0.75 < np.mean(a["behavior"] == 0) < 0.85  # mostly clicks


def test_planted_structure():
    a = synthetic_arrays(num_users=1000, seed=0)
    in_interest = (a["category"][:, None] == a["interest"][a["user"]]).any(1).mean()
    # Chance level: the same interest sets handed to other users.
    shuffled = np.random.default_rng(0).permutation(a["interest"])
    chance = (a["category"][:, None] == shuffled[a["user"]]).any(1).mean()
    assert in_interest > 0.85 and in_interest > 2.5 * chance
    # Sequential pattern: the next item is often the successor of the previous one in its category.
    same = a["user"][1:] == a["user"][:-1]
    prev, nxt = a["item"][:-1][same], a["item"][1:][same]
    succ = ((nxt == prev + 1) & (a["category"][1:][same] == a["category"][:-1][same])).mean()
    assert succ > 0.4
    # ... which popularity alone would rarely produce.
    assert np.mean(np.random.default_rng(0).permutation(nxt) == prev + 1) < 0.05


def test_sequence_model_beats_popularity_on_prepared_split(tmp_path):
    """Through prepare(): a first-order Markov predictor from training transitions beats popularity
    on the validation targets by a wide margin (what a sequence model should learn)."""
    from lum_dist.data.prepare import prepare, read_users

    meta = prepare({"format": "synthetic", "num_users": 1000}, tmp_path / "d")
    rows = read_users(tmp_path / "d").to_pylist()
    pop, trans = np.zeros(meta.num_items), np.zeros((meta.num_items, meta.num_items))
    for r in rows:
        items = np.asarray(r["item"][: r["train_end"]])
        np.add.at(pop, items, 1)
        np.add.at(trans, (items[:-1], items[1:]), 1)
    top = set(np.argsort(-pop)[:10])
    prev = np.array([r["item"][r["train_end"] - 1] for r in rows])
    target = np.array([r["item"][r["train_end"]] for r in rows])
    markov = np.argsort(-(trans[prev] + 1e-3 * pop), axis=1)[:, :10]
    hr_pop = np.mean([t in top for t in target])
    hr_markov = np.mean((markov == target[:, None]).any(1))
    assert hr_markov > 0.4 and hr_markov > 3 * hr_pop, (hr_markov, hr_pop)
