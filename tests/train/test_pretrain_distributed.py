"""The DeepSpeed trainer with 2 real CPU processes (gloo, ZeRO-3): smoke, SIGKILL + resume, kill during save,
then one-process evaluation and export of the sharded checkpoint.

A reference run of 8 steps is compared with runs that are killed and resumed: the per-step losses and
the final weights must be the same (to float tolerance), whatever moment the kill hit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lum_dist.checkpoint import DS_TAG, averaged_weights, find_resume_checkpoint
from lum_dist.data.prepare import load_vocab, read_users
from lum_dist.eval.metrics import RankingAccumulator, rank_of_targets
from lum_dist.model import LUMModel
from lum_dist.parallel import fp32_state_dict
from lum_dist.train.monitor import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, out: str, extra_env: dict | None = None, *overrides: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
        str(REPO / "launch/pretrain.py"), "--config", str(REPO / "configs/pretrain/debug-cpu.yaml"),
        f"data.path={tmp / 'data'}", f"train.output_dir={tmp / out}", f"train.max_steps={STEPS}",
        "train.save_every=2", "train.log_every=1", "train.keep_last=3", "eval.max_users=40", *overrides,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           **(extra_env or {})}
    log = open(tmp / f"{out}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, tmp: Path, out: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run {out} timed out:\n{(tmp / f'{out}.log').read_text()[-3000:]}") from None


def _run(tmp: Path, out: str, extra_env: dict | None = None) -> int:
    return _wait(_launch(tmp, out, extra_env), tmp, out)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = find_resume_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{STEPS:08d}"
    return fp32_state_dict(ckpt / DS_TAG, zero_stage=3)


def _assert_same_run(tmp: Path, ref: str, other: str) -> None:
    a, b = read_metrics(tmp / ref / "metrics.jsonl"), read_metrics(tmp / other / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), f"step {step}"
    wa, wb = _final_weights(tmp / ref), _final_weights(tmp / other)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    rc = _run(tmp, "ref")
    assert rc == 0, (tmp / "ref.log").read_text()[-4000:]
    return tmp


def test_two_rank_zero3_smoke(reference: Path):
    metrics = read_metrics(reference / "ref" / "metrics.jsonl")
    losses = [metrics[s]["loss"] for s in range(1, STEPS + 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "valid/hr@10" in metrics[STEPS] and "valid/pop_hr@10" in metrics[STEPS]
    assert (reference / "ref" / "result.json").is_file()
    kept = sorted(p.name for p in (reference / "ref" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{s:08d}" for s in (4, 6, 8)]  # keep_last=3
    assert (reference / "ref" / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_sigkill_mid_training_resumes_exactly(reference: Path):
    proc = _launch(reference, "killed")
    metrics_file = reference / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if 5 in read_metrics(metrics_file):  # the step-4 checkpoint exists; step 5 is done, step 6 running
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _run(reference, "killed") == 0, (reference / "killed.log").read_text()[-4000:]
    _assert_same_run(reference, "ref", "killed")


def test_kill_during_save_resumes_from_last_complete_checkpoint(reference: Path):
    rc = _run(reference, "killsave", {"LUM_FAULT_KILL_DURING_SAVE_AT_STEP": "6"})
    assert rc != 0
    ckpts = reference / "killsave" / "checkpoints"
    assert (ckpts / ".tmp_step_00000006").is_dir()  # the half-written checkpoint is there ...
    assert (ckpts / "latest").read_text() == "step_00000004"  # ... but not visible
    assert _run(reference, "killsave") == 0, (reference / "killsave.log").read_text()[-4000:]
    assert not (ckpts / ".tmp_step_00000006").exists()
    _assert_same_run(reference, "ref", "killsave")


def _launch_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_one_process_evaluation_of_the_checkpoint_equals_the_two_rank_evaluation(reference: Path):
    """launch/evaluate.py consolidates the ZeRO-3 shards and evaluates in one process: the trainer's
    final 2-rank evaluation (each rank half of the users) is reproduced."""
    out = reference / "eval-one-process"
    _launch_script("evaluate.py", "--checkpoint", str(reference / "ref"), "--split", "valid", "--max-users", "40",
                   "--out", str(out))
    one = json.loads(out.with_suffix(".json").read_text())["metrics"]
    two = read_metrics(reference / "ref" / "metrics.jsonl")[STEPS]
    assert one["valid/count"] == two["valid/count"] == 40
    for key in ("valid/hr@10", "valid/ndcg@10", "valid/mrr", "valid/pop_hr@10", "valid/pop_ndcg@20"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), key
    assert "| valid | LUM |" in out.with_suffix(".md").read_text()


def test_export_ranks_like_the_evaluation_and_writes_a_consolidated_hf_model(reference: Path):
    """users.parquet . items.parquet (dot product) ranks each user's held-out item exactly as the evaluation
    does; ``--hf`` writes a safetensors model whose weights are the consolidated ZeRO-3 shards."""
    import numpy as np
    import pyarrow.parquet as pq


    out = reference / "export"
    _launch_script("export.py", "--checkpoint", str(reference / "ref"), "--split", "valid", "--max-users", "40",
                   "--out", str(out), "--hf")
    users, items = pq.read_table(out / "users.parquet"), pq.read_table(out / "items.parquet")
    assert users.num_rows == 40 and (out / "model" / "model.safetensors").is_file()

    # Rank with the exported embeddings only, in raw ids, history excluded as in the evaluation.
    data = reference / "data"
    raw_of = dict(zip(*(load_vocab(data, "item").column(c).to_pylist() for c in ("id", "raw")), strict=True))
    rows = {r["user_id"]: r for r in read_users(data).to_pylist()}
    item_raw = items.column("item_id").to_pylist()
    col = {raw: j for j, raw in enumerate(item_raw)}
    scores = torch.tensor(np.stack(users.column("embedding").to_pylist())) @ torch.tensor(
        np.stack(items.column("embedding").to_pylist())).T
    targets, exclude = [], []
    for uid in users.column("user_id").to_pylist():
        row = rows[uid]
        targets.append(col[raw_of[row["item"][row["train_end"]]]])
        exclude.append(torch.tensor([col[raw_of[i]] for i in set(row["item"][: row["train_end"]]) if raw_of[i] in col],
                                    dtype=torch.long))
    # rank_of_targets skips the first NUM_SPECIAL_IDS columns: shift the item columns past them
    pad = torch.full((len(targets), 3), -float("inf"))
    ranks = rank_of_targets(torch.cat([pad, scores], 1), torch.tensor(targets) + 3, [e + 3 for e in exclude])
    exported = RankingAccumulator([10]).update(ranks).compute()
    evaluated = read_metrics(reference / "ref" / "metrics.jsonl")[STEPS]  # the trainer's final evaluation
    assert exported["hr@10"] == pytest.approx(evaluated["valid/hr@10"], abs=1e-9)
    assert exported["ndcg@10"] == pytest.approx(evaluated["valid/ndcg@10"], rel=1e-5)

    hf = LUMModel.from_pretrained(out / "model")
    zero = {k.removeprefix("model."): v for k, v in _final_weights(reference / "ref").items() if k.startswith("model.")}
    state = hf.state_dict()
    assert set(zero) <= set(state)
    for k, v in zero.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_a_weight_average_under_zero3_evaluates_as_its_consolidated_copy_in_one_process(reference: Path):
    """optim.ema_decay on 2 ranks under ZeRO-3: each rank averages its own shards (small parameters stay gathered
    between steps and must be refreshed when the average is swapped in). The trainer's final 2-rank evaluation,
    of the average, equals one process's evaluation of the average rebuilt from both ranks' files."""
    rc = _wait(_launch(reference, "ema", None, "optim.ema_decay=0.8"), reference, "ema")
    assert rc == 0, (reference / "ema.log").read_text()[-4000:]
    ckpt = reference / "ema" / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "ema_rank0.pt").is_file() and (ckpt / "ema_rank1.pt").is_file()
    trained = _final_weights(reference / "ema")
    averaged = averaged_weights(ckpt, {k: v.shape for k, v in trained.items()})
    assert averaged.keys() == trained.keys()  # every trained parameter has its average
    assert any(not torch.allclose(averaged[k], trained[k]) for k in averaged)  # the average is not the weights
    out = reference / "eval-ema"
    _launch_script("evaluate.py", "--checkpoint", str(reference / "ema"), "--split", "valid", "--max-users", "40",
                   "--out", str(out))
    one = json.loads(out.with_suffix(".json").read_text())["metrics"]
    two = read_metrics(reference / "ema" / "metrics.jsonl")[STEPS]
    for key in ("valid/hr@10", "valid/ndcg@10", "valid/mrr"):
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), key
