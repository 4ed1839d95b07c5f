"""prepare(): ordering, split invariants (no leakage), vocabularies, shards, idempotence, atomicity, CLI,
and smoke runs on the real datasets (counts and time)."""

from __future__ import annotations

import json
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lum_dist.data import prepare as P
from lum_dist.data.schema import ITEM_FIELD, NUM_SPECIAL_IDS, PAD_ID, UNK_ID, user_schema
from lum_dist.utils import data_dir

SYN = {"format": "synthetic", "num_users": 120, "num_items": 80, "num_categories": 6, "seed": 3}


def _decode(root: Path, field: str) -> np.ndarray:
    return np.asarray(P.load_vocab(root, field).column("raw").to_pylist(), dtype=object)


def _raw_behaviours(source: dict) -> dict[str, list[tuple]]:
    """Per user: (ts, input index, item, cond values...) from the adapter, sorted like prepare should."""
    raw = P.get_adapter(source["format"])(P.normalize_source(source))
    out: dict[str, list[tuple]] = {}
    for i, r in enumerate(raw.table.to_pylist()):
        out.setdefault(r["user"], []).append(
            (r["ts"], i, r["item"], *[r["cond_" + f] for f in raw.cond_fields])
        )
    return {u: sorted(v) for u, v in out.items()}


@pytest.mark.parametrize("split", ["loo", "temporal"])
def test_round_trip_order_and_no_leakage(tmp_path, split):
    source = {**SYN, "split": split, "users_per_shard": 17}
    meta = P.prepare(source, tmp_path / "d")
    root = tmp_path / "d"
    users = P.read_users(root)
    assert users.schema == user_schema(meta.cond_fields)
    assert len(meta.shards) == -(-meta.num_users // 17) and users.num_rows == meta.num_users
    expected = _raw_behaviours(source)
    item_raw = _decode(root, ITEM_FIELD)
    cond_raw = {f: _decode(root, f) for f in meta.cond_fields}
    item_cat: dict[str, str] = {}
    train_counts: dict[str, Counter] = {f: Counter() for f in [ITEM_FIELD, *meta.cond_fields]}
    t1, t2 = meta.split_params.get("temporal_cutoffs", (None, None))
    for row in users.to_pylist():
        exp = expected[row["user_id"]]
        n, te, ve = len(row["item"]), row["train_end"], row["valid_end"]
        assert row["ts"] == [e[0] for e in exp] and n >= 3 and te >= 1
        if split == "loo":
            assert (te, ve) == (n - 2, n - 1)
        else:
            assert te == sum(t < t1 for t in row["ts"]) and ve == sum(t < t2 for t in row["ts"])
        for k in range(te):  # training behaviours round-trip exactly
            assert item_raw[row["item"][k]] == exp[k][2]
        train_counts[ITEM_FIELD].update(e[2] for e in exp[:te])
        item_cat.update((e[2], e[3]) for e in exp[:te])
        for j, f in enumerate(meta.cond_fields):
            assert [cond_raw[f][c] for c in row["cond_" + f][:te]] == [e[3 + j] for e in exp[:te]]
            train_counts[f].update(e[3 + j] for e in exp[:te])
        for k in range(te, n):  # held-out items unseen in training map to UNK
            assert row["item"][k] == UNK_ID or item_raw[row["item"][k]] == exp[k][2]
    # Vocabularies hold training counts only, in descending order (ties: raw ascending).
    for f, counts in train_counts.items():
        vocab = P.load_vocab(root, f).to_pylist()[NUM_SPECIAL_IDS:]
        assert {v["raw"]: v["count"] for v in vocab} == dict(counts)
        assert [(-v["count"], v["raw"]) for v in vocab] == sorted((-v["count"], v["raw"]) for v in vocab)
        assert meta.vocab_sizes[f] == NUM_SPECIAL_IDS + len(counts)
    assert meta.num_train_behaviours == sum(train_counts[ITEM_FIELD].values())
    # items.parquet: each item's category id is the one its training behaviours carry.
    items = P.load_items(root).to_pylist()
    assert [r["id"] for r in items] == list(range(meta.num_items))
    assert {r["raw"]: cond_raw["category"][r["category"]] for r in items[NUM_SPECIAL_IDS:]} == item_cat


def test_temporal_cutoffs_drop_users_without_training(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(
        "1,10,5,pv,100\n1,11,5,pv,200\n1,12,5,pv,300\n2,10,5,pv,250\n2,11,5,pv,260\n2,12,5,pv,270\n"
    )
    meta = P.prepare(
        {"format": "taobao", "input": str(path), "split": "temporal", "temporal_cutoffs": [250, 300]},
        tmp_path / "d",
    )
    rows = P.read_users(tmp_path / "d").to_pylist()
    assert meta.split_params["dropped_users"] == 1 and [r["user_id"] for r in rows] == ["1"]
    assert (rows[0]["train_end"], rows[0]["valid_end"]) == (2, 2)
    with pytest.raises(ValueError, match="needs timestamps"):
        (tmp_path / "s.txt").write_text("1 1 2 3\n")
        (tmp_path / "s_item2attributes.json").write_text('{"1": [1], "2": [1], "3": [2]}')
        P.prepare({"format": "s3rec", "input": str(tmp_path / "s.txt"), "split": "temporal"}, tmp_path / "e")


def test_ties_keep_input_order_and_min_behaviours(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(
        "1,12,5,pv,300\n1,10,5,pv,100\n1,11,5,cart,100\n2,10,5,pv,1\n2,11,5,pv,2\n1,13,5,buy,50\n"
    )
    meta = P.prepare({"format": "taobao", "input": str(path), "min_behaviours": 3}, tmp_path / "d")
    (row,) = P.read_users(tmp_path / "d").to_pylist()
    items = _decode(tmp_path / "d", ITEM_FIELD)
    assert row["ts"] == [50, 100, 100, 300] and [items[i] for i in row["item"][:2]] == ["13", "10"]
    assert meta.split_params["dropped_users"] == 1 and meta.num_behaviours == 4


def test_idempotent_force_and_mismatch(tmp_path):
    out = tmp_path / "d"
    meta = P.prepare(SYN, out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert P.prepare(dict(SYN), out) == meta and (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="prepared from another source.*force=True"):
        P.prepare({**SYN, "seed": 4}, out)
    again = P.prepare({**SYN, "seed": 4}, out, force=True)
    assert again.fingerprint != meta.fingerprint and again.split_params["source"]["seed"] == 4
    assert P.prepare(SYN, tmp_path / "e").fingerprint == meta.fingerprint  # deterministic bytes


def test_failure_mid_prepare_leaves_no_output(tmp_path, monkeypatch):
    calls = []

    class Boom(pq.ParquetWriter):
        def write_table(self, table, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            super().write_table(table, *a, **k)

    monkeypatch.setattr(P.pq, "ParquetWriter", Boom)
    with pytest.raises(OSError, match="disk full"):
        P.prepare({**SYN, "users_per_shard": 50}, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []  # neither `d` nor a temporary sibling


def test_bad_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="split='random'"):
        P.prepare({**SYN, "split": "random"}, tmp_path / "d")
    with pytest.raises(
        ValueError, match=r"synthetic: unknown source key\(s\) \['num_user'\]; valid: .*'num_users'"
    ):
        P.prepare({**SYN, "num_user": 5}, tmp_path / "d")
    with pytest.raises(ValueError, match="unknown source format 'nope'"):
        P.prepare({"format": "nope"}, tmp_path / "d")
    with pytest.raises(ValueError, match="no user has >= 500 behaviours"):
        P.prepare({**SYN, "min_behaviours": 500}, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        P.load_meta(tmp_path)


def test_skip_bad_counts_in_meta(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,10,5,pv,1\n1,11,5,pv,2\n1,x,5,pv,3\n1,12,5,pv,4\n1,13,5,pv,-4\n")
    meta = P.prepare({"format": "taobao", "input": str(path), "skip_bad": True}, tmp_path / "d")
    assert meta.skipped == {"not_an_integer": 1, "out_of_range": 1} and meta.num_behaviours == 3
    assert P.load_meta(tmp_path / "d").skipped == meta.skipped


def test_cli(tmp_path, capsys):
    meta = P.main(
        [
            "--format",
            "synthetic",
            "--out",
            str(tmp_path / "d"),
            "--set",
            "num_users=40",
            "num_items=30",
            "--users-per-shard",
            "25",
        ]
    )
    assert meta.num_users == 40 and len(meta.shards) == 2
    assert "40 users" in capsys.readouterr().out
    assert sum(t.num_rows for t in P.iter_user_shards(tmp_path / "d")) == 40


real = pytest.mark.skipif(data_dir() is None, reason="real datasets not available (set LUM_DATA_DIR)")


@real
def test_real_ml100k_counts(tmp_path):
    meta = P.prepare({"format": "movielens-100k", "input": str(data_dir() / "ml-100k")}, tmp_path / "d")
    assert (meta.num_users, meta.num_behaviours) == (943, 100000)
    assert meta.cond_fields == ["genre", "rating"] and meta.vocab_sizes["rating"] == NUM_SPECIAL_IDS + 5


@real
def test_real_s3rec_beauty_counts_and_time(tmp_path):
    start = time.perf_counter()
    meta = P.prepare(
        {"format": "s3rec", "input": str(data_dir() / "s3rec-seq" / "Beauty.txt")}, tmp_path / "d"
    )
    elapsed = time.perf_counter() - start
    assert (meta.num_users, meta.num_behaviours) == (22363, 198502) and not meta.has_timestamps
    assert meta.num_train_behaviours == 198502 - 2 * 22363
    assert elapsed < 10, f"Beauty took {elapsed:.1f} s"  # ~0.3 s measured on 2 shared cores


@real
def test_real_taobao_and_amazon(tmp_path):
    tb = P.prepare(
        {
            "format": "taobao",
            "input": str(data_dir() / "taobao-userbehavior-head" / "UserBehavior.csv"),
            "split": "temporal",
        },
        tmp_path / "t",
    )
    assert tb.num_behaviours <= 4321 and tb.vocab_sizes["behavior"] == NUM_SPECIAL_IDS + 4
    az = P.prepare(
        {
            "format": "amazon-5core",
            "input": str(data_dir() / "amazon-musical-instruments-5core-2014" / "Musical_Instruments.zip"),
        },
        tmp_path / "a",
    )
    assert (az.num_users, az.num_behaviours) == (1429, 10261)


def test_numeric_fields_and_behaviour_only_conditions(tmp_path, monkeypatch):
    import pyarrow as pa

    from lum_dist.data import ingest

    def fake(source):  # an adapter with a numeric side feature and no item attribute
        table = pa.table(
            {
                "user": ["a", "a", "a", "b"],
                "item": ["x", "y", "x", "y"],
                "ts": pa.array([3, 1, 2, 1], pa.int64()),
                "cond_kind": ["k1", "k2", "k1", "k2"],
                "num_price": pa.array([3.0, 1.0, 2.0, 9.0], pa.float32()),
            }
        )
        return ingest.RawBehaviours(name="fake", table=table, cond_fields=["kind"], numeric_fields=["price"])

    monkeypatch.setitem(ingest.ADAPTERS, "fake", fake)
    meta = P.prepare({"format": "fake"}, tmp_path / "d")
    (row,) = P.read_users(tmp_path / "d").to_pylist()
    assert meta.numeric_fields == ["price"] and meta.item_cond_fields == []
    assert row["num_price"] == [1.0, 2.0, 3.0] and row["ts"] == [1, 2, 3] and row["train_end"] == 1
    assert P.load_items(tmp_path / "d").column_names == ["id", "raw"]


def test_item_neighbours_are_the_most_frequent_co_occurrences_within_the_window_in_training(tmp_path):
    """Against a loop over the users' training behaviours: pairs at most `window` apart, both directions, an item
    never its own neighbour, ties to the smaller id, PAD-padded; validation and test items are never read; with
    distance weighting a pair d apart counts exactly 1/d."""
    rng = np.random.default_rng(0)
    lines = [" ".join([str(u)] + [str(i) for i in rng.integers(1, 12, rng.integers(3, 12))]) for u in range(60)]
    (tmp_path / "Toy.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps({str(i): [i % 3] for i in range(1, 12)}))
    meta = P.prepare({"format": "s3rec", "input": str(tmp_path / "Toy.txt"), "users_per_shard": 16}, tmp_path / "d")
    assert len(meta.shards) == 4  # counts merged across shards
    for k, window, weighted in [(3, 1, False), (5, 2, False), (5, 3, True), (4, 4, True)]:
        got = P.item_neighbour_ids(tmp_path / "d", meta, k, window, distance_weighted=weighted)
        counts = [Counter() for _ in range(meta.num_items)]
        for row in P.read_users(tmp_path / "d").to_pylist():
            seq = row["item"][: row["train_end"]]
            for t in range(len(seq)):
                for d, b in enumerate(seq[t + 1 : t + 1 + window], 1):
                    if b != seq[t]:
                        counts[seq[t]][b] += Fraction(1, d) if weighted else 1
                        counts[b][seq[t]] += Fraction(1, d) if weighted else 1
        want = np.full((meta.num_items, k), PAD_ID)
        for a, c in enumerate(counts):
            top = sorted(c, key=lambda b: (-c[b], b))[:k]
            want[a, : len(top)] = top
        np.testing.assert_array_equal(got, want)
        assert (got[:NUM_SPECIAL_IDS] == PAD_ID).all()
    # The weighting changes who the neighbours are (else the cases above would not tell it from plain counts).
    by_count, by_distance = (P.item_neighbour_ids(tmp_path / "d", meta, 5, 3, distance_weighted=w) for w in (False, True))
    assert (by_count != by_distance).any()
    # Training counts (the neighbour gate's popularity, the logQ correction's): the training prefixes only.
    seen = Counter(i for row in P.read_users(tmp_path / "d").to_pylist() for i in row["item"][: row["train_end"]])
    want = [seen[i] for i in range(meta.num_items)]
    assert P.item_train_counts(tmp_path / "d", meta.num_items).tolist() == want
    assert len(set(want)) >= 3 and want[:NUM_SPECIAL_IDS] == [0] * NUM_SPECIAL_IDS
    mass = np.maximum(want, 1e-3)  # reserved and unseen ids: a tiny mass, not log 0
    np.testing.assert_allclose(P.item_log_prob(tmp_path / "d", meta.num_items), np.log(mass / mass.sum()), rtol=1e-5)


def test_item_tags_round_trip_through_prepare(tmp_path):
    """Each item's tags (all its S3-Rec attributes) come back by dense item id, PAD-padded; a tag vocabulary is
    written beside the others; an item without attributes has no tags."""
    attrs = {"1": [11, 12], "2": [12], "3": [13, 11, 14], "4": [], "5": [15]}
    (tmp_path / "Toy.txt").write_text("1 1 2 3 4\n2 2 3 1 3\n3 4 1 2 2\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps(attrs))
    meta = P.prepare({"format": "s3rec", "input": str(tmp_path / "Toy.txt")}, tmp_path / "d")
    assert meta.max_item_tags == 3 and meta.vocab_sizes["tags"] == NUM_SPECIAL_IDS + 4  # 11..14; 5 never seen
    tags = P.item_tag_ids(tmp_path / "d", meta)
    assert tags.shape == (meta.num_items, 3) and (tags[:NUM_SPECIAL_IDS] == PAD_ID).all()
    tag_raw = pq.read_table(tmp_path / "d" / "vocab" / "tags.parquet").column("raw").to_pylist()
    item_raw = P.load_items(tmp_path / "d").sort_by("id").column("raw").to_pylist()
    for i in range(NUM_SPECIAL_IDS, meta.num_items):
        got = [tag_raw[t] for t in tags[i] if t != PAD_ID]
        assert got == [str(a) for a in attrs[item_raw[i]]], item_raw[i]
    assert P.load_meta(tmp_path / "d").max_item_tags == 3  # saved in meta.json
