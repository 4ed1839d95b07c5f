"""Synthetic generator: deterministic from the seed, fast, with the planted structure it promises."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lum_dist.data.ingest import get_adapter
from lum_dist.data.synthetic import (
    NEVER,
    chain_distances,
    generic_oracle,
    longrange_arrays,
    successor_oracle,
    synthetic_arrays,
)


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


# ---------------------------------------------------------------------------------------------
# kind: longrange


def _lr(num_users: int = 300, seed: int = 0, **kw) -> dict[str, np.ndarray]:
    return longrange_arrays(num_users=num_users, seed=seed, **kw)


def test_longrange_deterministic_shaped_and_fast():
    a, b, c = _lr(seed=1), _lr(seed=1), _lr(seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["item"][:500], c["item"][:500])
    lens = np.bincount(a["user"])
    assert len(lens) == 300 and lens.min() >= 128 and lens.max() <= 2048 and 600 < np.median(lens) < 1000
    assert len(a["item_category"]) == 131072 and a["item"].min() >= 0 and a["item"].max() < 131072
    assert len(np.unique(a["item_category"])) == 128
    assert np.array_equal(a["category"], a["item_category"][a["item"]])  # an item attribute
    same = a["user"][1:] == a["user"][:-1]
    assert (np.diff(a["ts"])[same] > 0).all()
    assert set(np.unique(a["behavior"])) == {0, 1, 2} and 0.75 < np.mean(a["behavior"] == 0) < 0.85
    # Session starts are visible in the time gaps: hours between sessions, minutes inside.
    gaps = np.diff(a["ts"])[same]
    assert gaps[a["session_start"][1:][same]].min() >= 600 > np.median(gaps[~a["session_start"][1:][same]])
    start = time.perf_counter()
    big = longrange_arrays(num_users=2000)
    assert time.perf_counter() - start < 15  # ~2 s on a loaded 2-core machine
    assert len(np.unique(big["item"])) > 100_000  # the 131k-item catalogue is really used


def test_longrange_resumes_interests_from_far_back():
    """The planted long-range dependency: the next item continues the current interest from its last visit,
    often hundreds of behaviours back. Knowing that visit predicts the item far better than the last 32."""
    a = _lr(num_users=500)
    acc = successor_oracle(a, [32, 64, 128, 256, 512, 10**9])
    assert (np.diff([acc[w] for w in sorted(acc)]) > 0).all()  # every doubling helps
    assert acc[10**9] > 0.65 and acc[10**9] - acc[32] > 0.12 and acc[512] - acc[256] > 0.01
    d = chain_distances(a)
    far = d["step"] & (d["gap"] > 32) & (d["gap"] < NEVER)
    assert 0.1 < far.mean() < 0.5  # a large share of behaviours continues from > 32 behaviours back
    # ... which holds in the observable data too: the item is a cycle successor of the item of the last
    # behaviour in the same category, when that one is more than 32 behaviours back.
    prev, dist = _last_same_category(a)
    far_cat = np.flatnonzero((dist > 32) & (prev >= 0))
    assert len(far_cat) > 0.1 * len(prev)
    assert _is_successor(a, a["item"][prev[far_cat]], a["item"][far_cat]).mean() > 0.4
    # Chance: the far items of other behaviours (shuffled) are rarely the predecessor.
    shuffled = np.random.default_rng(0).permutation(prev[far_cat])
    assert _is_successor(a, a["item"][shuffled], a["item"][far_cat]).mean() < 0.02


def _is_successor(a: dict[str, np.ndarray], prev_items: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Whether each item follows its previous item on some cycle variant of the previous item's cluster."""
    cl = a["item_cluster"][prev_items]
    st, sz = a["cluster_starts"][cl], a["cluster_sizes"][cl]
    cycle, pos = a["cycle"], a["cycle_pos"]
    return np.any([cycle[v, st + (pos[v, prev_items] + 1) % sz] == items for v in range(len(cycle))], axis=0)


def _last_same_category(a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per behaviour, the index of the user's previous behaviour in the same category (-1: none) and the
    distance to it (a huge number when none)."""
    n = len(a["user"])
    key = a["user"].astype(np.int64) * (a["category"].max() + 1) + a["category"]
    o = np.argsort(key, kind="stable")
    same = key[o][1:] == key[o][:-1]
    prev = np.full(n, -1)
    prev[o[1:][same]] = o[:-1][same]
    return prev, np.where(prev >= 0, np.arange(n) - prev, NEVER)


def test_longrange_generic_oracle_gains_with_context():
    """Without any condition (the evaluation query), the process's own predictor improves with every
    doubling of its window: cross-entropy falls and HR@10 rises from 32 to 512 behaviours."""
    r = generic_oracle(_lr(num_users=120), [0, 32, 128, 512], max_users=120)
    bits = [r[w]["bits"] for w in (0, 32, 128, 512)]
    assert bits[0] > 12 and (np.diff(bits) < -0.2).all(), bits
    assert r[0]["hr@10"] == 0 and r[512]["hr@10"] - r[32]["hr@10"] > 0.04, r


def test_longrange_many_transitions_with_a_long_tail():
    """Capacity keeps paying: ~2 x 131k cycle transitions, used with a long-tailed frequency, so that
    memorising 4x more of them covers a lot more behaviours at every scale."""
    a = _lr(num_users=1000)
    d = chain_distances(a)
    step = np.flatnonzero(d["step"])
    pairs = a["item"][step - d["gap"][step]].astype(np.int64) * 131072 + a["item"][step]
    counts = np.sort(np.unique(pairs, return_counts=True)[1])[::-1]
    cover = np.cumsum(counts) / counts.sum()
    assert len(counts) > 100_000
    shares = [cover[m - 1] for m in (1000, 4000, 16000, 64000)]
    assert ((np.diff(shares) > 0.08) & (np.diff(shares) < 0.5)).all(), shares


def test_longrange_through_ingest_and_prepare(tmp_path):
    from lum_dist.data.prepare import load_items, prepare, read_users

    small = {"num_users": 60, "num_items": 4096, "num_clusters": 64, "num_categories": 16, "interests": 16}
    small.update(persona_clusters=32, seed=3)
    source = {"format": "synthetic", "kind": "longrange", **small}
    meta = prepare(source, tmp_path / "d")
    a = longrange_arrays(**small)
    assert (
        meta.name == "synthetic-longrange" and meta.num_users == 60 and meta.num_behaviours == len(a["user"])
    )
    assert meta.cond_fields == ["category", "behavior"] and meta.item_cond_fields == ["category"]
    rows = read_users(tmp_path / "d").to_pylist()
    assert sorted(len(r["item"]) for r in rows) == sorted(np.bincount(a["user"]).tolist())
    assert all((np.diff(r["ts"]) > 0).all() for r in rows)
    assert load_items(tmp_path / "d").num_rows == meta.num_items
    assert prepare(source, tmp_path / "d").fingerprint == meta.fingerprint  # same spec: a no-op
    adapter = get_adapter("synthetic")
    assert adapter(source).table.equals(adapter(source).table)
    # Without a kind (or kind: planted), the original generator, unchanged.
    assert adapter({"num_users": 50, "seed": 1}).table.equals(
        adapter({"kind": "planted", "num_users": 50, "seed": 1}).table
    )
    with pytest.raises(ValueError, match=r"kind='nope': expected one of \['longrange', 'planted'\]"):
        adapter({"kind": "nope"})
    with pytest.raises(ValueError, match=r"\['p_next'\] do not apply to kind='longrange'"):
        adapter({"kind": "longrange", "p_next": 0.5})
    with pytest.raises(ValueError, match=r"\['routine_max'\] do not apply to kind='planted'"):
        adapter({"routine_max": 8})
    with pytest.raises(ValueError, match=r"unknown source key\(s\) \['num_interests'\]"):
        prepare({**source, "num_interests": 3}, tmp_path / "e")
