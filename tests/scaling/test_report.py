"""Report generation from fake finished runs: run table, fits that recover the planted laws, figures, markdown."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import yaml

from lum_dist.scaling.grid import expand_grid, load_sweep, run_sweep
from lum_dist.scaling.memory import ModelShape
from lum_dist.scaling.report import collect_row, compute_fit, learning_curve, report_sweep, series_fits

from .fake_runs import HIDDEN_TO_DENSE, expected_hr, fake_runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_sweep(tmp_path, seeds=(0, 1), hiddens=tuple(HIDDEN_TO_DENSE)):
    presets = [{"name": f"h{h}", "preset": "lum-tiny", "overrides": {"hidden_size": h}} for h in hiddens]
    spec = {"name": "fake", "base_config": "configs/pretrain/debug-cpu.yaml", "presets": presets,
            "max_seq_lens": [32, 64, 128], "seeds": list(seeds), "out_dir": str(tmp_path / "runs"),
            "report_dir": str(tmp_path / "report"), "overrides": ["data.token_budget=2048"]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(tmp_path / "sweep.yaml", ["tokens_per_run=8192"])  # 4 steps of 2048 tokens
    return sweep, expand_grid(sweep)


def test_report_from_fake_runs(tmp_path):
    sweep, runs = make_sweep(tmp_path)
    failing = "h64_L128_seed1"
    statuses = {s.run.name: s.status for s in run_sweep(sweep, runs, fake_runner([], (failing,)), lambda s: None)}
    shapes = {"tiny": ModelShape(2, 64, 4, 128, 32, 100_000, 50_000)}
    report = report_sweep(sweep, runs, statuses, memory_shapes=shapes)

    with open(tmp_path / "runs" / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 18 == len(json.loads((tmp_path / "runs" / "runs.json").read_text()))
    by_name = {r["name"]: r for r in table}
    assert by_name[failing]["status"] == "failed" and by_name[failing]["hr@10"] == ""
    row = by_name["h32_L64_seed0"]
    assert row["status"] == "ok" and row["split"] == "test" and int(row["dense_params"]) == 10_000
    assert float(row["hr@10"]) == pytest.approx(expected_hr(10_000, 64))
    assert float(row["compute"]) == pytest.approx((6 * 10_000 + 6 * 64) * 8192)

    for png in ("metric_vs_params", "metric_vs_seq_len", "loss_vs_params", "loss_vs_seq_len", "loss_vs_compute",
                "learning_curves"):
        assert (tmp_path / "report" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC
        assert f"({png}.png)" in report.read_text()
    text = report.read_text()
    assert "17 of 18 runs finished" in text and failing in text
    # The planted laws: hr@10 slope 0.02 per ln(params) at every length, 0.01 per ln(L) for every model.
    assert text.count("hr@10 = 0.02 * ln(N)") == 3 and text.count("hr@10 = 0.01 * ln(L)") == 3
    # ... and on validation, where the runs were selected (the fake runs score 1.5x test there): fitted beside it
    assert text.count("`valid_hr@10 = 0.03 * ln(N)") == 3 and text.count("`valid_hr@10 = 0.015 * ln(L)") == 3
    assert "R² = 1.000" in text and "C^(-0.1)" in text
    assert "GPUs needed per preset" in text and "| tiny |" in text
    assert not list((tmp_path / "report").glob("*.tmp"))  # atomic writes leave no temporaries


def make_yardstick(tmp_path, hiddens=tuple(HIDDEN_TO_DENSE), fail=(), halve="h64_L32_seed0"):
    """A finished fake sweep "baseline" with the fake sweep's run names; ``halve``'s test HR@10 halved."""
    yard_dir = tmp_path / "yardstick"
    yard_dir.mkdir()
    yard_sweep, yard_runs = make_sweep(yard_dir, seeds=(0,), hiddens=hiddens)
    (yard_dir / "sweep.yaml").write_text(yaml.safe_dump({**yaml.safe_load((yard_dir / "sweep.yaml").read_text()),
                                                          "name": "baseline", "tokens_per_run": 8192}))
    run_sweep(yard_sweep, yard_runs, fake_runner([], fail), lambda s: None)
    halved = yard_dir / "runs" / halve / "result.json"
    result = json.loads(halved.read_text())
    result["eval"]["test/hr@10"] /= 2
    halved.write_text(json.dumps(result))
    return yard_dir / "sweep.yaml"


def test_report_prints_each_run_beside_its_yardstick(tmp_path):
    """A sweep with a yardstick (the same run names, another model): each finished run beside the yardstick's."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    sweep.yardstick = str(make_yardstick(tmp_path, fail=("h128_L32_seed0",)))
    run_sweep(sweep, runs, fake_runner([]), lambda s: None)
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()

    section = text[text.index("## Beside the yardstick (baseline)"):text.index("## Final training loss")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| h")}
    assert len(rows) == 8 and "h128_L32_seed0" not in rows  # its yardstick run failed
    hr = expected_hr(40_000, 32)
    assert f"{1.5 * hr:.4f} / {1.5 * hr:.4f}" in rows["h64_L32_seed0"]  # validation, both
    assert f"{hr:.4f} / {hr / 2:.4f}" in rows["h64_L32_seed0"] and rows["h64_L32_seed0"].endswith("| 2.00 / 1.00 |")
    assert all(line.endswith("| 1.00 / 1.00 |") for name, line in rows.items() if name != "h64_L32_seed0")
    assert (tmp_path / "report" / "metric_vs_params_yardstick.png").read_bytes()[:8] == PNG_MAGIC
    assert "hr@10, sweep = fake (3 points)" in section and "hr@10, sweep = baseline (3 points)" in section


def test_a_yardstick_whose_runs_are_gone_is_read_from_its_reports_run_table(tmp_path):
    """A fresh clone has the baseline's report (with runs.json beside it) but not its runs: the sweep's report
    reads the yardstick from that table and prints the same rows as from the runs themselves."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    yard_path = make_yardstick(tmp_path, fail=("h128_L32_seed0",))
    sweep.yardstick = str(yard_path)
    run_sweep(sweep, runs, fake_runner([]), lambda s: None)
    from_runs = report_sweep(sweep, runs, memory_shapes={}).read_text()
    yard_sweep = load_sweep(yard_path)
    report_sweep(yard_sweep, expand_grid(yard_sweep), memory_shapes={})
    assert len(json.loads((tmp_path / "yardstick" / "report" / "runs.json").read_text())) == 9
    assert json.loads((tmp_path / "report" / "runs.json").read_text()) == \
        json.loads((tmp_path / "runs" / "runs.json").read_text())  # the sweep's own copy beside its report

    for gone in expand_grid(yard_sweep)[1:]:  # one run left on disk, then none
        shutil.rmtree(gone.output_dir, ignore_errors=True)
    for _ in range(2):
        from_table = report_sweep(sweep, runs, memory_shapes={}).read_text()
        section = from_table[from_table.index("## Beside the yardstick"):from_table.index("## Final training loss")]
        assert section.count("| h") == 8 and section in from_runs  # h128_L32's yardstick run failed, as before
        shutil.rmtree(tmp_path / "yardstick" / "runs", ignore_errors=True)

    (tmp_path / "yardstick" / "report" / "runs.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"yardstick/report/runs.json: not a run table"):
        report_sweep(sweep, runs, memory_shapes={})


def test_runs_not_on_disk_keep_their_committed_rows(tmp_path):
    """One run added to (or re-done in) a finished sweep whose other runs are gone: the report reads those from
    the run table it committed, marked "committed"; none becomes "missing" (a yardstick: the test above)."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    run_sweep(sweep, runs, fake_runner([], ("h128_L32_seed0",)), lambda s: None)
    first = {r["name"]: r for r in json.loads(report_sweep(sweep, runs, memory_shapes={}).with_name("runs.json")
                                              .read_text())}
    redone = "h64_L64_seed0"
    for run in runs:
        if run.name != redone:
            shutil.rmtree(run.output_dir, ignore_errors=True)
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()
    table = {r["name"]: r for r in json.loads((tmp_path / "report" / "runs.json").read_text())}
    assert table[redone] == first[redone] and table[redone]["status"] == "ok"
    assert table["h128_L32_seed0"]["status"] == "missing"  # a failed run has nothing to keep
    kept = [n for n in table if n not in (redone, "h128_L32_seed0")]
    assert len(kept) == 7 and all(table[n] == {**first[n], "status": "committed"} for n in kept)
    assert "8 of 9 runs finished (7 read from the committed run table, not on disk)" in text
    assert "hr@10 = 0.02 * ln(N)" in text  # the fits still see every finished run
    curves = json.loads((tmp_path / "report" / "learning_curves.json").read_text())
    assert len(curves) == 8 and all(len(c["loss"]) == len(c["tokens"]) > 0 for c in curves.values())
    assert "Not drawn" not in text  # the committed runs' curves came from learning_curves.json

    (tmp_path / "report" / "learning_curves.json").unlink()  # a report from before curves were kept
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()
    assert "Not drawn: 7 runs read from the committed run table" in text
    assert list(json.loads((tmp_path / "report" / "learning_curves.json").read_text())) == [redone]
    (tmp_path / "report" / "learning_curves.json").write_text('{"h32_L32_seed0": {"tokens": []}}')
    with pytest.raises(ValueError, match=r"report/learning_curves.json: not a table of learning curves"):
        report_sweep(sweep, runs, memory_shapes={})

    (tmp_path / "report" / "runs.json").write_text("[{}]")
    with pytest.raises(ValueError, match=r"report/runs.json: not a run table"):
        report_sweep(sweep, runs, memory_shapes={})


def test_context_sweep_beside_its_yardstick_is_plotted_against_length(tmp_path):
    """One size at several lengths: the yardstick figure and fits are against sequence length, not parameters."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,), hiddens=(64,))
    sweep.yardstick = str(make_yardstick(tmp_path, hiddens=(64,)))
    run_sweep(sweep, runs, fake_runner([]), lambda s: None)
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()

    section = text[text.index("## Beside the yardstick (baseline)"):text.index("## Final training loss")]
    assert "(metric_vs_seq_len_yardstick.png)" in section and "metric_vs_params_yardstick" not in section
    assert (tmp_path / "report" / "metric_vs_seq_len_yardstick.png").read_bytes()[:8] == PNG_MAGIC
    assert "hr@10, sweep = fake (3 points): `hr@10 = 0.01 * ln(L)" in section  # the planted length law
    assert "hr@10, sweep = baseline (3 points)" in section and section.count("| h64_L") == 3
    # one size: nothing to fit against parameters, and the report says which model every run is
    assert "Every run is model h64." in text and "## Metric vs dense parameters" not in text
    assert not (tmp_path / "report" / "metric_vs_params.png").exists()


def test_a_size_sweep_at_one_length_reports_only_the_size_axis(tmp_path):
    """One length, several sizes: the sections and figures against length (one point per model, nothing to fit)
    are left out, and a stale figure of them from an earlier report of the folder is removed."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    sweep.max_seq_lens = [64]
    runs = expand_grid(sweep)
    run_sweep(sweep, runs, fake_runner([]), lambda s: None)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "loss_vs_seq_len.png").write_bytes(PNG_MAGIC)
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()
    assert "Every run has max_seq_len = 64." in text and "not fitted" not in text
    assert "Every run at 8,192 tokens: a loss at equal data." in text
    assert "sequence length" not in text and text.count("hr@10 = 0.02 * ln(N)") == 1
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == [
        "learning_curves.png", "loss_vs_compute.png", "loss_vs_params.png", "metric_vs_params.png"]


def test_fits_average_seeds_and_skip_failed(tmp_path):
    sweep, runs = make_sweep(tmp_path)
    statuses = {s.run.name: s.status for s in run_sweep(sweep, runs, fake_runner([], ("h32_L32_seed0",)),
                                                        lambda s: None)}
    rows = [collect_row(r, statuses[r.name]) for r in runs]
    fits = series_fits(rows, "max_seq_len", "dense_params", "hr@10")
    assert sorted(fits) == [32, 64, 128]
    for seq_len, (xs, _, fit) in fits.items():
        np.testing.assert_allclose(xs, sorted(HIDDEN_TO_DENSE.values()))  # seeds averaged: one point per size
        assert fit.a == pytest.approx(0.02) and fit.b == pytest.approx(-0.1 + 0.01 * math.log(seq_len))
    c, loss, power = compute_fit(rows)
    assert len(c) == 17 and power.alpha == pytest.approx(0.1) and power.coef == pytest.approx(50.0)


def test_an_early_stopped_run_counts_the_tokens_it_trained_not_its_budget(tmp_path):
    """Early stopping ends a run before its budget: its tokens and compute are the steps it ran, and the report says
    the final losses are not at equal data."""
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    sweep.max_seq_lens = [64]
    runs = expand_grid(sweep)
    run_sweep(sweep, runs, fake_runner([]), lambda s: None)
    stopped = runs[0].result_path
    stopped.write_text(json.dumps({**json.loads(stopped.read_text()), "steps": 1}))  # of 4
    rows = {r.name: collect_row(r) for r in runs}
    assert rows[runs[0].name]["tokens"] == 2048 and rows[runs[1].name]["tokens"] == 8192
    assert rows[runs[0].name]["compute"] == pytest.approx(rows[runs[0].name]["flops_per_token"] * 2048)
    text = report_sweep(sweep, runs, memory_shapes={}).read_text()
    assert "Runs stopped at different token counts (2,048 to 8,192; early stopping)" in text


def test_learning_curve_and_malformed_result(tmp_path):
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    run_sweep(sweep, runs[:1], fake_runner([]), lambda s: None)
    tokens, loss = learning_curve(runs[0])
    np.testing.assert_allclose(tokens, [2048, 4096, 6144, 8192])
    assert loss[-1] < loss[0]  # the re-logged final step (last record wins) is the plain final loss
    (runs[0].output_dir / "result.json").write_text('{"eval": {}}')
    with pytest.raises(ValueError, match=r"result\.json: malformed"):
        collect_row(runs[0])
    assert collect_row(runs[1])["status"] == "missing"


def test_sweep_cli_dry_run_and_report_only(tmp_path, capsys):
    import importlib.util

    from lum_dist.config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("sweep_cli", REPO_ROOT / "launch" / "sweep.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sweep, runs = make_sweep(tmp_path, seeds=(0,))
    run_sweep(sweep, runs[:2], fake_runner([]), lambda s: None)
    args = ["--config", str(tmp_path / "sweep.yaml"), "tokens_per_run=8192"]
    assert cli.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("launch/pretrain.py") == 9 and out.count("(finished)") == 2
    assert not (tmp_path / "report").exists()  # a dry run writes nothing
    assert cli.main([*args, "--report-only"]) == 0
    assert "2 of 9 runs finished" in (tmp_path / "report" / "report.md").read_text()


def test_read_run_metrics_merges_records_of_a_step(tmp_path):
    from lum_dist.scaling.report import read_run_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 3.0}\n{"step": 2, "loss": 2.5, "lr": 0.1}\n{"step": 2, "valid/hr@10": 0.2}\n')
    assert read_run_metrics(path) == {2: {"step": 2, "loss": 2.5, "lr": 0.1, "valid/hr@10": 0.2}}
    path.write_text('{"step": 1, "loss": 3.0}\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
        read_run_metrics(path)
