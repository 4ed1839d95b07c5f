"""Every benchmark's --smoke mode runs on the CPU and writes its JSON (to a temporary results folder)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lum_dist.checkpoint import load_model, resolve_checkpoint
from lum_dist.config import PretrainConfig, load_config
from lum_dist.data.tokenize import tokenize_eval

REPO = Path(__file__).resolve().parents[2]


def _run_python(*args: str, **env: str) -> None:
    """``python *args`` in a child process from the repository root, on the CPU without wandb; it must succeed."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", **env}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _smoke(tmp: Path, script: str, *args: str) -> dict:
    _run_python(str(REPO / "benchmarks" / script), "--smoke", *args, LUM_BENCH_RESULTS=str(tmp / "results"))
    (result,) = (tmp / "results").glob("*.json")
    data = json.loads(result.read_text())
    assert {"device", "git_commit", "torch", "timestamp"} <= set(data["meta"]) and data["rows"]
    return data


def test_packing_smoke(tmp_path):
    data = _smoke(tmp_path, "packing.py", "--work", str(tmp_path / "data"))
    for pack, pad in zip(data["rows"][::2], data["rows"][1::2], strict=True):
        assert (pack["policy"], pad["policy"], pad["speedup"]) == ("pack", "pad", 1.0)
        assert pack["utilisation"] > pad["utilisation"]
        # padding is computed on: the padded batch carries more tokens than its real ones
        assert pad["model_batch_tok_s"] > pad["model_real_tok_s"] > 0
        assert pack["model_batch_tok_s"] == pytest.approx(pack["model_real_tok_s"])


def test_loader_smoke(tmp_path):
    data = _smoke(tmp_path, "loader.py", "--work", str(tmp_path / "data"))
    assert [(r["dataset"], r["workers"]) for r in data["rows"]] == [("synthetic", w) for w in (0, 1, 2)]
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert [d["preset"] for d in data["meta"]["demand"]][::5] == ["lum-19m", "lum-7b"]


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    data = _smoke(tmp_path, "train_throughput.py", "--zero", "3")
    assert [(r["packing"], r["status"]) for r in data["rows"]] == [("pack", "ok"), ("pad", "ok")]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in data["rows"])


@pytest.mark.parametrize("script", ["attention.py", "group_query.py", "prepare.py"])
def test_other_smokes(tmp_path, script):
    _smoke(tmp_path, script)


def test_group_query_kernel_smoke(tmp_path):
    """Every launch variant runs in the Triton interpreter and matches the float32 reference."""
    pytest.importorskip("triton")
    data = _smoke(tmp_path, "group_query_kernel.py")
    assert {r["bound"] for r in data["rows"]} == {"arg", "loaded"}
    assert all(r["status"] == "ok" and r["max_abs_diff"] <= 1e-4 for r in data["rows"])


# --- benchmarks/gpu_check.py: its CPU dry run, its budget, and the pieces it is built from ---

def _load_benchmark(script: str):
    spec = importlib.util.spec_from_file_location(f"_{script}", REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_benchmark("gpu_check")


def _gpu_check_run(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "LUM_BENCH_RESULTS": str(tmp / "results"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    json_path, md_path = tmp / "results" / "gpu" / "dry-run.json", tmp / "results" / "gpu" / "dry-run.md"
    assert json_path.is_file() and md_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {json_path}" in proc.stdout
    return proc, json.loads(json_path.read_text()), md_path.read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section_on_the_cpu(tmp_path):
    proc, data, md = _gpu_check_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta, sec = data["meta"], data["sections"]
    assert meta["dry_run"] and {"device", "git_commit", "torch", "timestamp"} <= set(meta)
    assert {"torch", "triton", "deepspeed", "flash-attn"} <= set(meta["versions"])
    assert {k: v["status"] for k, v in sec.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    # pytest: the GPU tests are collected, not run
    assert sec["pytest"]["meta"]["collect_only"] and sec["pytest"]["meta"]["collected"] >= 1
    # attention: the CUDA backends are listed as skipped, sdpa measured and equal to the reference
    assert {s.split(":")[0] for s in sec["attention"]["skipped"]} == {"flash", "torch_varlen", "flex"}
    (row,) = sec["attention"]["rows"]
    assert row["backend"] == "sdpa" and row["max_abs_diff"] < 1e-4
    assert row["tokens_per_s"] > 0 and row["tflops"] > 0
    # group query: every CPU method measured and agreeing with the float32 reference, triton skipped
    assert [r["method"] for r in sec["group_query"]["rows"]] == ["flex", "cascade", "naive", "sdpa"]
    assert all(r["agrees"] and r["ms"] > 0 for r in sec["group_query"]["rows"])
    assert [s.split(":")[0] for s in sec["group_query"]["skipped"]] == ["triton"]
    # training: the real trainer's numbers beside the memory model's
    (run,) = sec["train"]["rows"]
    assert run["preset"] == "lum-tiny" and run["status"] == "ok"
    assert run["tokens_per_s"] > 0 and run["peak_mem_gib"] > 0 and run["pred_mem_gib"] > 0
    for title in gpu_check.TITLES.values():
        assert f"## {title}: ok" in md


def test_gpu_check_budget_skips_what_does_not_fit(tmp_path):
    proc, data, md = _gpu_check_run(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sec = data["sections"]
    assert sec["env"]["status"] == "ok" and sec["env"]["meta"]["dry_run"]
    for name in ("pytest", "attention", "group_query", "train"):
        assert sec[name]["status"] == "skipped" and sec[name]["skipped"][0].startswith("budget:"), sec[name]
        assert f"## {gpu_check.TITLES[name]}: skipped (0 s)" in md


def test_section_limit_and_case_fits():
    assert gpu_check.section_limit(100, cap=30, min_s=10) == 30
    assert gpu_check.section_limit(20, cap=30, min_s=10) == 20
    assert gpu_check.section_limit(5, cap=30, min_s=10) is None
    assert gpu_check.section_limit(-1, cap=30, min_s=0) == 0  # min_s 0: always runs
    assert gpu_check.case_fits(10, None, 1) and not gpu_check.case_fits(0.5, None, 1)
    assert not gpu_check.case_fits(10, 12, 1) and gpu_check.case_fits(12, 12, 1)


def test_parse_pytest_output():
    run = ("....F.s\nFAILED tests/ops/test_a.py::test_x[bf16] - AssertionError: no\n"
           "ERROR tests/ops/test_b.py::test_y - RuntimeError\n"
           "1 failed, 4 passed, 1 skipped, 80 deselected, 1 error in 12.34s\n")
    assert gpu_check.parse_pytest_output(run) == {
        "failed": 1, "passed": 4, "skipped": 1, "deselected": 80, "errors": 1,
        "failed_ids": ["tests/ops/test_a.py::test_x[bf16]", "tests/ops/test_b.py::test_y"]}
    collect = "tests/ops/test_a.py::test_x\n\n22/102 tests collected (80 deselected) in 9.70s\n"
    assert gpu_check.parse_pytest_output(collect) == {"collected": 22, "deselected": 80, "failed_ids": []}


def test_gpu_test_files_finds_marked_modules(tmp_path):
    (tmp_path / "sub").mkdir()
    marked = "import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n"
    (tmp_path / "sub" / "test_dec.py").write_text(marked)
    (tmp_path / "test_module.py").write_text("import pytest\npytestmark = [pytest.mark.gpu]\n")
    (tmp_path / "test_cpu.py").write_text("def test_b():\n    assert 'run pytest -m gpu on the device'\n")
    (tmp_path / "helper.py").write_text(marked)  # not a test module
    want = [tmp_path / "sub" / "test_dec.py", tmp_path / "test_module.py"]
    assert gpu_check.gpu_test_files(tmp_path) == want


class _FakeClock:
    def __init__(self, lefts):
        self.lefts = list(lefts)

    def left(self):
        return self.lefts.pop(0)


def test_run_sections_records_each_failure_and_goes_on():
    ran, writes = [], []

    def ok(name):
        def run(rec, limit):
            ran.append((name, limit))
            rec.add({"case": name})
        return run

    def boom(rec, limit):
        ran.append(("pytest", limit))
        raise RuntimeError("the device fell over")

    def errors(rec, limit):
        ran.append(("attention", limit))
        rec.add({"case": "attention"})
        rec.fail("flex T=8: compile error")

    plan = gpu_check.GPU_PLAN
    runners = {"env": ok("env"), "pytest": boom, "attention": errors, "group_query": ok("group_query"),
               "train": ok("train")}
    # time left before each section: the training section no longer fits
    clock = _FakeClock([400, 390, 300, 200, plan.min_s["train"] - 1])
    records = gpu_check.run_sections(list(gpu_check.SECTIONS), runners, clock, plan,
                                     lambda recs: writes.append({k: r.status for k, r in recs.items()}))
    assert [name for name, _ in ran] == ["env", "pytest", "attention", "group_query"]
    assert dict(ran)["pytest"] == plan.caps["pytest"] and dict(ran)["group_query"] == plan.caps["group_query"]
    assert {k: r.status for k, r in records.items()} == {
        "env": "ok", "pytest": "failed", "attention": "failed", "group_query": "ok", "train": "skipped"}
    assert "RuntimeError: the device fell over" in records["pytest"].errors[0]
    assert records["attention"].rows == [{"case": "attention"}]  # rows measured before an error are kept
    assert records["train"].skipped[0].startswith(f"budget: {plan.min_s['train'] - 1:.0f} s left")
    assert writes[-1] == {k: r.status for k, r in records.items()}  # the report is rewritten as it goes
    md = gpu_check.to_markdown({"device": "X", "dry_run": False, "versions": {"flash-attn": None}}, records)
    assert "| case |" in md and "| attention |" in md and "**error**: flex T=8: compile error" in md
    assert "flash-attn not installed" in md and "## Training throughput, ZeRO-3, one device: skipped" in md


def test_child_failure_keeps_its_rows(tmp_path, monkeypatch):
    def half(plan, rec, clock):
        rec.add({"backend": "sdpa"})
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_check.CHILD_FUNCS, "attention", half)
    out = tmp_path / "child.json"
    assert gpu_check.child_main("attention", gpu_check.DRY_PLAN, out, 10) == 1
    got = json.loads(out.read_text())
    assert got["status"] == "failed" and got["rows"] == [{"backend": "sdpa"}]
    assert "RuntimeError: CUDA error: an illegal memory access" in got["errors"][0]


def test_run_process_kills_what_it_started_at_its_limit(tmp_path):
    pid_file = tmp_path / "pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(60)\n")
    t0 = time.monotonic()
    assert gpu_check.run_process([sys.executable, "-c", script], timeout=3) is None
    assert time.monotonic() - t0 < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous; a killed orphan may linger as a zombie until reaped
        status = Path(f"/proc/{grandchild}/status")
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} started by the command still runs")
    assert gpu_check.run_process([sys.executable, "-c", "raise SystemExit(3)"], timeout=30) == 3


@pytest.mark.parametrize("plan", ["GPU_PLAN", "DRY_PLAN"])
def test_gpu_check_training_configs_load(plan, tmp_path):
    """Every training run of the one-shot GPU check is a valid config (checked here, not on the lent GPU)."""
    plan = getattr(gpu_check, plan)
    for preset in plan.presets:
        overrides = gpu_check.train_overrides(plan, preset, tmp_path / "data", tmp_path / preset)
        cfg = load_config(PretrainConfig, REPO / plan.train_config, overrides)
        assert (cfg.model.preset, cfg.data.prepare) == (preset, plan.train_data)
        assert cfg.data.path == str(tmp_path / "data")
        assert cfg.data.token_budget * cfg.data.rows_per_batch == plan.train_tokens >= cfg.data.max_seq_len
        assert (cfg.train.zero_stage, cfg.train.max_steps, cfg.data.packing) == (3, plan.train_steps, "pack")
        assert (REPO / "configs" / "model" / f"{preset}.yaml").is_file()


def test_failed_training_run_keeps_what_it_logged(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert gpu_check.logged_metrics(metrics) == {}
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 4, "loss": 9.0, "tokens_per_s": 100.0, "mem_gib": 1.0},
        {"step": 8, "loss": 7.0, "tokens_per_s": 120.0, "tflops_per_device": 0.5, "mfu": 0.4,
         "data_wait": 0.01, "mem_gib": 2.0},
        {"step": 8, "valid/hr@10": 0.1}]) + "\n")
    assert gpu_check.logged_metrics(metrics) == {"tokens_per_s": 120.0, "tflops_per_device": 0.5, "mfu": 0.4,
                                                 "data_wait": 0.01, "peak_mem_gib": 2.0, "final_loss": 7.0}
    log = tmp_path / "run" / "train.log"
    runner = gpu_check.timed_runner(2)
    assert runner([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), log) == 124
    assert "killed: past its time limit of 2 s" in log.read_text()


def test_training_without_deepspeed_fails_at_once_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_importable", lambda module: module != "deepspeed")
    rec = gpu_check.Record()
    gpu_check.train_section(gpu_check.DRY_PLAN, rec, 60, tmp_path)
    assert rec.rows == [] and rec.errors == [
        "deepspeed is not installed: carry its wheel (pure Python + JIT ops; pip install --no-deps)"]


def test_context_use_smoke(tmp_path):
    data = _smoke(tmp_path, "context_use.py")
    rows = data["rows"]
    assert [r["behaviours"] for r in rows] == [2, 8] and all(r["users"] == 20 for r in rows)
    assert all(0 <= r[k] <= 1 for r in rows for k in ("hr@10", "ndcg@10", "cond_hr@10", "cond_ndcg@10"))
    assert rows[0]["mrr"] != rows[1]["mrr"]  # the same model, a shorter history: another ranking
    assert (tmp_path / "results" / "context_use_smoke.md").is_file()


def test_valid_test_gap_smoke(tmp_path):
    data = _smoke(tmp_path, "valid_test_gap.py")
    rows = {r["ranking"]: r for r in data["rows"]}
    assert list(rows) == ["valid", "test, validation behaviour left out", "test"]
    assert all(r["users"] == 20 for r in rows.values())
    reference = data["meta"]["evaluate_checkpoint"]  # launch/evaluate.py's scoring of the same checkpoint and users
    for split in ("valid", "test"):
        for k in ("hr@10", "ndcg@10"):
            assert rows[split][k] == pytest.approx(reference[f"{split}/{k}"], rel=1e-6)
    assert (tmp_path / "results" / "valid_test_gap_smoke.md").is_file()


def test_repeat_targets_smoke(tmp_path):
    data = _smoke(tmp_path, "repeat_targets.py")
    rows = {r["ranking"]: r for r in data["rows"]}
    current, earlier, repeat, new = (rows[name] for name in (
        "current rule (a repeated target is a miss)", "earlier rule (a repeated target stays a candidate)",
        "users whose target repeats, earlier rule", "users whose target is new"))
    assert current["users"] == earlier["users"] == repeat["users"] + new["users"] == 20 and repeat["users"] > 0
    reference = data["meta"]["evaluate_checkpoint"]  # launch/evaluate.py's scoring of the same checkpoint and users
    for k in ("hr@10", "ndcg@10"):
        assert current[k] == pytest.approx(reference[f"valid/{k}"], rel=1e-6)
        # Under the current rule the repeating users score nothing: the mean is the new users' share of it.
        assert current[k] == pytest.approx(new[k] * new["users"] / 20, rel=1e-6)
        assert earlier[k] == pytest.approx(current[k] + repeat[k] * repeat["users"] / 20, rel=1e-6)
    # (A 4-step model may hit nothing in the top 10; every rank counts in the MRR.)
    assert current["mrr"] == pytest.approx(reference["valid/mrr"], rel=1e-6) and earlier["mrr"] > current["mrr"]
    assert (tmp_path / "results" / "repeat_targets_smoke.md").is_file()


def test_transition_buckets_smoke(tmp_path):
    data = _smoke(tmp_path, "transition_buckets.py")
    rows = data["rows"]
    for split in ("valid", "test"):
        these = {(r["bucketing"], r["bucket"]): r for r in rows if r["split"] == split}
        assert these[("all", "all")]["users"] == 20
        for key in ("transition", "target popularity"):  # each bucketing splits the same users
            assert sum(r["users"] for (k, _), r in these.items() if k == key) == 20
        assert all(r["hr_ratio"] == 1.0 or r["users"] == 0 or r["hr@10"] == 0 for r in these.values())
    assert (tmp_path / "results" / "transition_buckets_smoke.md").is_file()


@pytest.fixture(scope="module")
def skip_checkpoint(tmp_path_factory) -> Path:
    """A 4-step LUM with the previous-item skip."""
    work = tmp_path_factory.mktemp("skip")
    # Trained in a child process, as the other smokes: the test session stays free of DeepSpeed's global state.
    _run_python("-c", "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from context_use import "
                f"smoke_checkpoint; smoke_checkpoint(Path({str(work)!r}), ['model.overrides.previous_item_skip=true'])")
    return work / "run"


def test_transition_buckets_skip_scales_score_the_model_with_its_skip_scaled(skip_checkpoint):
    """Each scale a ranks as the same model with W set to a W; W is restored; the probe names each scale."""
    tb = _load_benchmark("transition_buckets")
    ckpt = skip_checkpoint
    model, cfg, meta = load_model(resolve_checkpoint(ckpt))
    model.eval()
    seqs = [tokenize_eval(u, meta, cfg.data.max_seq_len, u["valid_end"], cfg.data.item_attributes)
            for u in tb.users_with_both_splits(cfg.data.path)]
    w = torch.randn_like(model.previous_item_skip.weight)  # large enough to move ranks, unlike 4 steps' W
    model.previous_item_skip.weight.data = w.clone()
    scaled = tb.ranks_per_skip_scale(model, cfg, seqs, [1.0, 0.0, 0.5])
    assert torch.equal(model.previous_item_skip.weight, w)
    for scale, ranks in scaled.items():
        model.previous_item_skip.weight.data = scale * w
        np.testing.assert_array_equal(ranks, tb.rank_users(model, cfg, seqs))
    assert (scaled[0.0] != scaled[1.0]).any()  # the skip matters here, so the comparisons above can fail

    rows = tb.probe(ckpt, ["test"], 20, [1.0, 0.0])
    assert {r["checkpoint"] for r in rows} == {f"{tb.run_name(ckpt)} (skip x1)", f"{tb.run_name(ckpt)} (skip x0)"}


def test_transition_prior_adds_weighted_log_counts_of_the_last_items_successors(skip_checkpoint):
    """The prior is log(1 + count) of the training pairs; each weight ranks as the scores plus weight x temperature x
    the last item's prior row; the probe names each weight."""
    tb = _load_benchmark("transition_buckets")
    users = [{"item": [5, 6, 7, 8], "train_end": 3, "valid_end": 4}, {"item": [5, 6, 5], "train_end": 3, "valid_end": 3}]
    prior = tb.transition_prior(tb.training_counts(users)[0], 10).to_dense()
    expected = torch.zeros(10, 10)
    expected[5, 6], expected[6, 7], expected[6, 5] = np.log(3), np.log(2), np.log(2)
    torch.testing.assert_close(prior, expected)

    model, cfg, meta = load_model(resolve_checkpoint(skip_checkpoint))
    model.eval()
    users = tb.users_with_both_splits(cfg.data.path)
    seqs = [tokenize_eval(u, meta, cfg.data.max_seq_len, u["valid_end"], cfg.data.item_attributes) for u in users]
    last = np.array([u["item"][u["valid_end"] - 1] for u in users])
    prior = tb.transition_prior(tb.training_counts(users)[0], meta.num_items)
    w = 0.2 / cfg.loss.temperature  # a bonus of 0.2 x log(1 + count) on the cosine scores: moves some ranks
    weighted = tb.ranks_per_prior_weight(model, cfg, seqs, last, prior, [0.0, w])
    np.testing.assert_array_equal(weighted[0.0], tb.rank_users(model, cfg, seqs))
    dense = prior.to_dense()
    by_hand = tb.rank_users(model, cfg, seqs, lambda packed: 0.2 * dense[last[packed]])
    np.testing.assert_array_equal(weighted[w], by_hand)
    assert (weighted[w] != weighted[0.0]).any()  # the prior moves ranks here, so the comparisons above can fail

    rows = tb.probe(skip_checkpoint, ["test"], 20, prior_weights=[0.0, 1.0])
    name = tb.run_name(skip_checkpoint)
    assert {r["checkpoint"] for r in rows} == {f"{name} (prior x0)", f"{name} (prior x1)"}


def test_evaluate_writes_out_json_and_md_under_the_name_given(skip_checkpoint, tmp_path):
    """``launch/evaluate.py --out P`` writes P.json and P.md also when P holds a dot (a version, a weight), which
    ``Path.with_suffix`` would cut ("eval-w0.25" to "eval-w0.json")."""
    out = tmp_path / "eval-w0.25"
    _run_python("launch/evaluate.py", "--checkpoint", str(skip_checkpoint), "--split", "valid", "--max-users", "5",
                "--out", str(out))
    result = json.loads(Path(f"{out}.json").read_text())
    assert result["metrics"]["valid/count"] == 5
    assert Path(f"{out}.md").read_text().startswith("# Full-ranking evaluation")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-w0.25.json", "eval-w0.25.md"]


def test_transition_buckets_count_training_pairs_and_bucket_each_user():
    tb = _load_benchmark("transition_buckets")
    users = [{"item": [5, 6, 7, 8, 9], "train_end": 3, "valid_end": 4},  # trains on 5 6 7
             {"item": [5, 6, 5, 6, 7], "train_end": 3, "valid_end": 4},  # trains on 5 6 5
             {"item": [6, 7, 8, 5], "train_end": 2, "valid_end": 3}]  # trains on 6 7
    pairs, items = tb.training_counts(users)
    assert pairs == {(5, 6): 2, (6, 7): 2, (6, 5): 1} and items == {5: 3, 6: 3, 7: 2}
    valid = tb.user_features(users, "valid", pairs, items)  # (7 -> 8), (5 -> 6), (7 -> 8)
    assert valid["transition"].tolist() == [0, 2, 0] and valid["target popularity"].tolist() == [0, 3, 0]
    test = tb.user_features(users, "test", pairs, items)  # (8 -> 9), (6 -> 7), (8 -> 5)
    assert test["transition"].tolist() == [0, 2, 0] and test["target popularity"].tolist() == [0, 2, 3]
    rows = tb.bucket_rows("m", "test", np.array([0, 12, 3]), test)
    by = {(r["bucketing"], r["bucket"]): r for r in rows}
    assert by[("all", "all")]["hr@10"] == pytest.approx(2 / 3)
    assert (by[("transition", "0")]["users"], by[("transition", "0")]["hr@10"]) == (2, 1.0)
    assert (by[("transition", "2-4")]["users"], by[("transition", "2-4")]["hr@10"]) == (1, 0.0)
    assert by[("transition", "5+")]["users"] == 0
    assert [by[("target popularity", b)]["users"] for b in ("0-4", "5-19", "20-99", "100+")] == [3, 0, 0, 0]


# --- benchmarks/quality.py: the table, with one model's runs reused from earlier tables ---

def _fake_result(hr: float, minutes: float = 2.0) -> dict:
    splits = {f"{s}/{p}{m}": v for s in ("valid", "test") for p, v in (("", hr), ("pop_", 0.01))
              for m in ("hr@10", "ndcg@10")}
    return {"eval": splits, "epochs": 10.0, "wall_seconds": 60 * minutes}


def test_quality_table_reuses_the_other_models_runs_and_refuses_a_missing_one(tmp_path, monkeypatch):
    quality = _load_benchmark("quality")
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    for seed, hr in enumerate((0.30, 0.34)):
        out = quality.run_dir(tmp_path / "runs", "ml100k", "lum", seed)
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps(_fake_result(hr)))
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"runs": {"ml100k/sasrec": [_fake_result(0.20), _fake_result(0.30)],
                                             "ml100k/lum": [_fake_result(0.01)]}}))
    common = ["--report-only", "--models", "lum", "--datasets", "ml100k", "--seeds", "0", "1", "--runs",
              str(tmp_path / "runs"), "--table", "candidate"]
    quality.main([*common, "--reuse", str(previous)])
    data = json.loads((tmp_path / "results" / "quality" / "candidate.json").read_text())
    test_row = next(r for r in data["rows"] if r["split"] == "test")
    assert test_row["lum_hr@10"] == [0.30, 0.34] and test_row["sasrec_hr@10"] == [0.20, 0.30]  # LUM from its runs
    assert "| 1.280 / 1.280 |" in (tmp_path / "results" / "quality" / "candidate.md").read_text()  # 0.32 / 0.25
    rerun = tmp_path / "rerun.json"  # a later table's runs of a dataset replace the earlier table's
    rerun.write_text(json.dumps({"runs": {"ml100k/sasrec": [_fake_result(0.40), _fake_result(0.40)]}}))
    quality.main([*common, "--reuse", str(previous), str(rerun)])
    data = json.loads((tmp_path / "results" / "quality" / "candidate.json").read_text())
    assert next(r for r in data["rows"] if r["split"] == "test")["sasrec_hr@10"] == [0.40, 0.40]
    previous.write_text(json.dumps({"runs": {"ml100k/lum": [_fake_result(0.01)]}}))
    with pytest.raises(SystemExit, match="no runs for ml100k/sasrec"):
        quality.main([*common, "--reuse", str(previous)])
