"""Step 2: group query equals Q separate passes, and a killed query job resumes without duplicates or gaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lum_dist.data.packing import collate
from lum_dist.data.prepare import load_meta, read_users
from lum_dist.data.schema import MASK_ID
from lum_dist.data.tokenize import tokenize_group_query
from lum_dist.model import LUMModel, load_preset
from lum_dist.query.job import answer_users, history_ends, parse_conditions
from lum_dist.testing.fixtures import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("q") / "data"
    write_tiny_dataset(path, num_users=12, num_items=30, cond_fields=("category",), seed=3)
    return path


def _model(meta) -> LUMModel:
    torch.manual_seed(0)
    cfg = load_preset("lum-tiny", num_items=meta.num_items, cond_vocab_sizes=meta.cond_vocab_sizes())
    return LUMModel(cfg).eval()


def test_group_query_equals_separate_passes(tiny: Path):
    meta = load_meta(tiny)
    model = _model(meta)
    users = read_users(tiny).to_pylist()[:5]
    rng = np.random.default_rng(0)
    queries = np.full((7, len(meta.cond_fields)), MASK_ID, np.int64)
    queries[1:, 0] = rng.integers(3, meta.cond_vocab_sizes()[0], size=6)
    seqs = [tokenize_group_query({k: np.asarray(v) if isinstance(v, list) else v for k, v in u.items()},
                                 meta, 64, int(u["valid_end"]), queries) for u in users]
    with torch.no_grad():
        grouped = model.forward_batch(collate(seqs, [list(range(len(seqs)))], 10_000))
        ends = np.cumsum([len(s.item) for s in seqs])
        for s, u in enumerate(users):
            row = {k: np.asarray(v) if isinstance(v, list) else v for k, v in u.items()}
            for j in range(len(queries)):  # the definition: one pass per query
                one = tokenize_group_query(row, meta, 64, int(u["valid_end"]), queries[j:j + 1])
                alone = model.forward_batch(collate([one], [[0]], 10_000))[-1]
                got = grouped[ends[s] - len(queries) + j]
                torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def test_answer_users_packs_many_users_per_row_exactly(tiny: Path):
    meta = load_meta(tiny)
    model = _model(meta)
    names, queries = parse_conditions(["*", "category=ALL"], meta, tiny)
    users = read_users(tiny)
    ends = history_ends(users, "test")
    small = answer_users(model, users, meta, queries, ends, 64, 128, torch.device("cpu"))
    big = answer_users(model, users, meta, queries, ends, 64, 100_000, torch.device("cpu"))
    assert small.shape == (users.num_rows, len(names), model.config.item_emb_dim)
    np.testing.assert_allclose(small, big, rtol=1e-4, atol=1e-5)


def test_parse_conditions_errors(tiny: Path):
    meta = load_meta(tiny)
    with pytest.raises(ValueError, match="unknown field"):
        parse_conditions(["colour=red"], meta, tiny)
    with pytest.raises(ValueError, match="not in the training vocabulary"):
        parse_conditions(["category=__nope__"], meta, tiny)


# --- the job, killed and resumed ---------------------------------------------------------------


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pre")
    proc = _run(["launch/pretrain.py", "--config", "configs/pretrain/debug-cpu.yaml", f"data.path={tmp / 'data'}",
                 f"train.output_dir={tmp / 'run'}", "train.max_steps=2", "train.zero_stage=3", "eval.max_users=20"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return tmp / "run"


def _query(run: Path, out: Path) -> subprocess.Popen:
    return _run(["launch/query.py", "--checkpoint", str(run), "--out", str(out), "--conditions", "*", "category=ALL",
                 "--users-per-shard", "8", "--token-budget", "512"])


def _rows(out: Path) -> list[tuple]:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    table = pq.read_table([out / s for s in manifest["shards"]])
    assert table.num_rows == manifest["num_rows"]
    return list(zip(table.column("user_id").to_pylist(), table.column("condition").to_pylist(),
                    [tuple(np.round(e, 5)) for e in table.column("embedding").to_pylist()], strict=True))


@pytest.mark.slow
def test_killed_query_job_resumes_without_duplicates_or_gaps(trained: Path, tmp_path: Path):
    ref = _query(trained, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-3000:]
    expected = _rows(tmp_path / "ref")
    assert len({(u, c) for u, c, _ in expected}) == len(expected)  # one row per (user, condition)

    job = _query(trained, tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "killed").glob("part-*.parquet")):
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists() or not json.loads(
        (tmp_path / "killed" / "manifest.json").read_text())["complete"]
    again = _query(trained, tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stdout.read()[-3000:]
    assert _rows(tmp_path / "killed") == expected
