"""Sweep results -> run table (runs.csv / runs.json), figures and a markdown report with the fits.

Rows come from each run's ``result.json`` and ``metrics.jsonl`` (written by lum_dist.train.trainer).
Figures (matplotlib, Agg), for the axes a sweep varies: ranking metrics and final training loss vs dense
parameters (log x, one series per sequence length) and vs sequence length (one series per model); always
training loss vs training compute (log-log) and the learning curves. Metrics are averaged over seeds before
the a*ln(x)+b fits; the compute fit uses every run. A sweep with a ``yardstick`` (another sweep with the
same run names, e.g. SASRec at the same sizes) also gets each run beside the yardstick's run of the same
name. Every file is written atomically, so a report is never seen half-written.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lum_dist.scaling.fit import LogFit, PowerLawFit, fit_log, fit_power_law  # noqa: E402
from lum_dist.scaling.grid import Run, SweepConfig, expand_grid, load_sweep, resolve_path  # noqa: E402
from lum_dist.scaling.memory import H100_80GB, ModelShape, TrainSetup, gpus_table, shape_from_preset  # noqa: E402
from lum_dist.utils import atomic_write_bytes, atomic_write_text, format_number  # noqa: E402

METRICS = ("hr@10", "ndcg@10")
COMMITTED = "committed"  # a run not on disk whose finished row the report's committed runs.json keeps
FINISHED = ("ok", "skipped", COMMITTED)  # run statuses with a result
COLUMNS = ("name", "model", "max_seq_len", "seed", "status", "dense_params", "embedding_params",
           "flops_per_token", "tokens", "compute", "final_loss", "hr@10", "ndcg@10", "mrr", "pop_hr@10",
           "tokens_per_s", "mfu", "split", "valid_hr@10", "valid_ndcg@10")


def read_run_metrics(path: Path) -> dict[int, dict[str, float]]:
    """Per-step metrics of a run, the records of one step merged (a later value of a key wins).

    Unlike lum_dist.train.monitor.read_metrics, which keeps only a step's last record: the trainer
    logs the final evaluation at the last training step, and that record would hide the final loss."""
    out: dict[int, dict[str, float]] = {}
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            try:
                rec = json.loads(line)
                out.setdefault(int(rec["step"]), {}).update(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {i}: not a metrics record with a step ({e})") from e
    return out


def _eval_metric(eval_result: dict[str, float], key: str) -> tuple[float | None, str]:
    """``<split>/<key>`` from the trainer's eval dict, whatever the split is called."""
    for k, v in eval_result.items():
        split, _, name = k.rpartition("/")
        if name == key:
            return float(v), split
    return None, ""


def tokens_trained(result: dict[str, Any]) -> int:
    """Token slots a run trained on: its budget scaled by the steps it ran, for a run that early stopping ended
    before its budget (a result.json without ``steps`` ran them all)."""
    budget, max_steps = int(result["tokens_budgeted"]), int(result.get("max_steps") or 0)
    steps = int(result.get("steps", max_steps))
    return budget * steps // max_steps if max_steps else budget


def collect_row(run: Run, status: str = "") -> dict[str, Any]:
    """One table row for ``run``: its result.json (if finished) and the last logged training metrics."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(name=run.name, model=run.model, max_seq_len=run.max_seq_len, seed=run.seed)
    history = read_run_metrics(run.output_dir / "metrics.jsonl")
    logged = [history[s] for s in sorted(history)]
    losses = [m["loss"] for m in logged if "loss" in m]
    row["final_loss"] = losses[-1] if losses else None
    speeds = [m for m in logged if "tokens_per_s" in m]
    if speeds:
        row["tokens_per_s"] = speeds[-1]["tokens_per_s"]
        row["mfu"] = speeds[-1].get("mfu")
    if not run.finished():
        row["status"] = status or "missing"
        return row
    try:
        result = json.loads(run.result_path.read_text())
        params = result["params"]
        row.update(dense_params=int(params["dense"]), embedding_params=int(params["embedding"]),
                   flops_per_token=float(result["flops_per_token"]), tokens=tokens_trained(result))
        row["compute"] = row["flops_per_token"] * row["tokens"]
        for key in ("hr@10", "ndcg@10", "mrr", "pop_hr@10"):
            row[key], split = _eval_metric(result["eval"], key)
            row["split"] = row["split"] or split
        for key in METRICS:  # the selection split beside the reported one (runs select on validation)
            row[f"valid_{key}"] = result["eval"].get(f"valid/{key}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run.result_path}: malformed result.json ({type(e).__name__}: {e})") from e
    row["status"] = status or "ok"  # a run that wrote result.json but exited non-zero stays "failed"
    return row


def learning_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(tokens seen, training loss) at every logged step of ``run``."""
    history = read_run_metrics(run.output_dir / "metrics.jsonl")
    steps = [s for s in sorted(history) if "loss" in history[s]]
    return (np.array(steps, dtype=np.float64) * run.tokens_per_step,
            np.array([history[s]["loss"] for s in steps], dtype=np.float64))


def write_run_table(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """runs.csv and runs.json under ``out_dir``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = Path(out_dir) / "runs.csv", Path(out_dir) / "runs.json"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(json_path, json.dumps(rows, indent=2) + "\n")
    return csv_path, json_path


# ---------------------------------------------------------------------------------------------
# fits over the finished runs


def _done(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] in FINISHED]


def seed_means(rows: list[dict[str, Any]], group: str, x: str, y: str) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Per value of ``group``: sorted distinct x and the mean of y over seeds (rows with y present)."""
    acc: dict[Any, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _done(rows):
        if r[y] is not None and r[x] is not None:
            acc[r[group]][float(r[x])].append(float(r[y]))
    out = {}
    for g, pts in acc.items():
        xs = np.array(sorted(pts))
        out[g] = (xs, np.array([np.mean(pts[v]) for v in xs]))
    return out


def _fit_or_none(fn, x: np.ndarray, y: np.ndarray):
    return fn(x, y) if len(np.unique(x)) >= 2 else None


def series_fits(rows: list[dict[str, Any]], group: str, x: str, y: str) -> dict[Any, tuple[np.ndarray, np.ndarray, LogFit | None]]:
    """Per series: (x, seed-mean y, a*ln(x)+b fit or None when fewer than two distinct x)."""
    return {g: (xs, ys, _fit_or_none(fit_log, xs, ys)) for g, (xs, ys) in seed_means(rows, group, x, y).items()}


def compute_fit(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, PowerLawFit | None]:
    pts = [(r["compute"], r["final_loss"]) for r in _done(rows) if r["compute"] and r["final_loss"]]
    c = np.array([p[0] for p in pts], dtype=np.float64)
    loss = np.array([p[1] for p in pts], dtype=np.float64)
    return c, loss, _fit_or_none(fit_power_law, c, loss)


# ---------------------------------------------------------------------------------------------
# figures


def _legend(ax, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # no finished run: an empty plot, without a warning
        ax.legend(**kwargs)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def fitted_metrics(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The reported metrics, and where they are test metrics, the validation metrics the runs were selected on:
    with a few hundred users one split is a noisy sample, and a law that holds on both is worth more."""
    if any(r["split"] == "test" and r.get("valid_hr@10") is not None for r in _done(rows)):
        return METRICS + tuple(f"valid_{m}" for m in METRICS)
    return METRICS


def plot_metric_fits(rows: list[dict[str, Any]], group: str, x: str, xlabel: str, path: Path) -> dict[str, dict]:
    """One panel per metric (:func:`fitted_metrics`, two to a row), one series per ``group`` value with its fitted
    curve; returns the fits."""
    metrics = fitted_metrics(rows)
    nrows = -(-len(metrics) // 2)
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 4 * nrows), squeeze=False, layout="constrained")
    fits: dict[str, dict] = {}
    for ax, metric in zip(axes.flat, metrics, strict=True):
        fits[metric] = series_fits(rows, group, x, metric)
        for g, (xs, ys, fit) in fits[metric].items():
            (line,) = ax.plot(xs, ys, "o", label=f"{group}={g}")
            if fit is not None:
                grid = np.geomspace(xs.min(), xs.max(), 50)
                ax.plot(grid, fit(grid), "--", color=line.get_color(), label=f"fit R²={fit.r2:.3f}")
        ax.set_xscale("log", base=2 if x == "max_seq_len" else 10)
        ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} vs {xlabel}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    _save(fig, path)
    return fits


def loss_fits(rows: list[dict[str, Any]], group: str, x: str) -> dict[Any, tuple[np.ndarray, np.ndarray,
                                                                                  PowerLawFit | None]]:
    """Per series: (x, seed-mean final training loss, power law loss = a x^-b or None when < 2 distinct x)."""
    return {g: (xs, ys, _fit_or_none(fit_power_law, xs, ys))
            for g, (xs, ys) in seed_means(rows, group, x, "final_loss").items()}


def plot_loss_fits(rows: list[dict[str, Any]], group: str, x: str, xlabel: str, path: Path) -> dict[Any, tuple]:
    """Final training loss against ``x`` (log-log), one series per ``group`` value with its power law."""
    fits = loss_fits(rows, group, x)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g, (xs, ys, fit) in fits.items():
        (line,) = ax.loglog(xs, ys, "o", label=f"{group}={g}")
        if fit is not None:
            grid = np.geomspace(xs.min(), xs.max(), 50)
            ax.loglog(grid, fit(grid), "--", color=line.get_color(), label=f"{fit.equation('L', 'x')}  R²={fit.r2:.3f}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.set(xlabel=xlabel, ylabel="final training loss", title=f"loss vs {xlabel}")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7)
    _save(fig, path)
    return fits


def _loss_fit_lines(fits: dict[Any, tuple], group: str, xname: str) -> list[str]:
    lines = []
    for g, (xs, ys, fit) in fits.items():
        if not fit:
            lines.append(f"- {group} = {g} ({len(xs)} points): not fitted (< 2 distinct x)")
            continue
        falls = "yes" if np.all(np.diff(ys) < 0) else "no"
        lines.append(f"- {group} = {g} ({len(xs)} points): `{fit.equation('loss', xname)}`, R² (log-log) = "
                     f"{fit.r2:.3f}; falls monotonically: {falls}")
    return lines


def plot_loss_vs_compute(rows: list[dict[str, Any]], path: Path) -> PowerLawFit | None:
    c, loss, fit = compute_fit(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(c, loss, "o", label="runs")
    if fit is not None:
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.loglog(grid, fit(grid), "--", label=f"{fit.equation()}  R²={fit.r2:.3f}")
    # A loss range inside one decade has only minor ticks: label them plainly, not as 6x10^0.
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="training compute C (FLOPs)", ylabel="final training loss", title="loss vs compute")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7)
    _save(fig, path)
    return fit


def plot_learning_curves(rows: list[dict[str, Any]], curves: dict[str, tuple[np.ndarray, np.ndarray]],
                         path: Path) -> None:
    """One panel per model; a line per run (colour: sequence length, style: seed)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["max_seq_len"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 3.8), sharey=True,
                             squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for r in rows:
            tokens, loss = curves.get(r["name"], ((), ()))
            if r["model"] == model and len(tokens):
                ax.plot(tokens, loss, color=f"C{lengths.index(r['max_seq_len']) % 10}",
                        linestyle=("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4],
                        label=f"L={r['max_seq_len']} seed {r['seed']}")
        ax.set(xlabel="tokens", title=f"{model}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=6)
    axes[0][0].set_ylabel("training loss (InfoNCE)")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# markdown


def markdown_table(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    cols = list(columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_number(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _fit_lines(fits: dict[str, dict], group: str, xname: str) -> list[str]:
    lines = []
    for metric, series in fits.items():
        for g, (xs, _, fit) in series.items():
            what = f"`{fit.equation(metric, xname)}`, R² = {fit.r2:.3f}" if fit else "not fitted (< 2 distinct x)"
            lines.append(f"- {metric}, {group} = {g} ({len(xs)} points): {what}")
    return lines


def beside_yardstick(rows: list[dict[str, Any]], yardstick_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished run beside the finished yardstick run of the same name: dense parameters, validation and
    test HR@10 / NDCG@10 of both (``run / yardstick``) and the test ratios."""
    yard = {r["name"]: r for r in _done(yardstick_rows)}
    out = []
    for r in _done(rows):
        y = yard.get(r["name"])
        if y is None:
            continue
        row: dict[str, Any] = {"name": r["name"], "dense_params": r["dense_params"],
                               "yardstick dense_params": y["dense_params"]}
        for split, prefix in (("valid", "valid_"), ("test", "")):
            for m in METRICS:
                a, b = r[prefix + m], y[prefix + m]
                row[f"{split} {m}"] = "-" if a is None or b is None else f"{a:.4f} / {b:.4f}"
        row["test ratio"] = " / ".join(f"{r[m] / y[m]:.2f}" if r[m] and y[m] else "-" for m in METRICS)
        out.append(row)
    return out


class Axis(NamedTuple):
    """What a sweep can vary: series by ``group``, ``x`` on the horizontal axis, figures ``*_vs_<stem>.png``."""
    group: str
    x: str
    heading: str
    xlabel: str
    xname: str  # the variable in the fitted equations
    stem: str


SIZE_AXIS = Axis("max_seq_len", "dense_params", "dense parameters", "dense parameters", "N", "params")
LENGTH_AXIS = Axis("model", "max_seq_len", "sequence length", "max sequence length (tokens)", "L", "seq_len")


def yardstick_section(rows: list[dict[str, Any]], name: str, yard_rows: list[dict[str, Any]], yard_name: str,
                      report_dir: Path) -> list[str]:
    """The report's lines on sweep ``name`` beside sweep ``yard_name``, and their figure: metrics vs dense
    parameters for a size sweep, vs sequence length for a context sweep (one size, several lengths)."""
    by_len = len({r["dense_params"] for r in rows}) == 1 and len({r["max_seq_len"] for r in rows}) > 1
    axis = LENGTH_AXIS if by_len else SIZE_AXIS
    figure = f"metric_vs_{axis.stem}_yardstick.png"
    series = [{**r, "sweep": name} for r in rows] + [{**r, "sweep": yard_name} for r in yard_rows]
    fits = plot_metric_fits(series, "sweep", axis.x, axis.xlabel, report_dir / figure)
    table = beside_yardstick(rows, yard_rows)
    return [f"## Beside the yardstick ({yard_name})", "", "Cells are `this sweep / yardstick`; the ratio is this sweep's "
            "test metric over the yardstick's (HR@10 / NDCG@10).", "",
            markdown_table(table, table[0].keys()) if table else "No run has a finished yardstick run yet.", "",
            f"![metrics vs {axis.xlabel}, beside the yardstick]({figure})", "",
            *_fit_lines(fits, "sweep", axis.xname), ""]


def axis_sections(rows: list[dict[str, Any]], report_dir: Path, axis: Axis) -> tuple[list[str], list[str]]:
    """The metric and the loss sections (markdown lines) against one axis, with their figures."""
    metric = plot_metric_fits(rows, axis.group, axis.x, axis.xlabel, report_dir / f"metric_vs_{axis.stem}.png")
    loss = plot_loss_fits(rows, axis.group, axis.x, axis.xlabel, report_dir / f"loss_vs_{axis.stem}.png")
    return ([f"## Metric vs {axis.heading}", "", f"![metric vs {axis.heading}](metric_vs_{axis.stem}.png)", "",
             *_fit_lines(metric, axis.group, axis.xname), ""],
            [f"## Final training loss vs {axis.heading}", "", _tokens_line(rows), "",
             f"![loss vs {axis.heading}](loss_vs_{axis.stem}.png)", "", *_loss_fit_lines(loss, axis.group, axis.xname),
             ""])


def _tokens_line(rows: list[dict[str, Any]]) -> str:
    """Whether the final losses compare runs at equal data: early stopping ends runs at different token counts."""
    tokens = sorted({r["tokens"] for r in _done(rows)})
    if len(tokens) <= 1:
        return f"Every run at {tokens[0]:,} tokens: a loss at equal data." if tokens else "No finished run."
    return (f"Runs stopped at different token counts ({tokens[0]:,} to {tokens[-1]:,}; early stopping): "
            f"the fit compares where each run ended, not losses at equal data.")


def write_report(rows: list[dict[str, Any]], curves: dict[str, tuple[np.ndarray, np.ndarray]], report_dir: Path,
                 title: str, memory_rows: list[dict[str, Any]] | None = None, memory_note: str = "",
                 yardstick_lines: list[str] | None = None) -> Path:
    """Figures + ``report.md`` under ``report_dir``; returns the markdown's path. Only the axes the sweep varies
    get a section and a figure (a size sweep at one length has nothing to fit against length); a figure of an
    axis that no longer varies is removed. ``yardstick_lines`` (:func:`yardstick_section`) go after the
    metric sections."""
    report_dir = Path(report_dir)
    models, lengths = list(dict.fromkeys(r["model"] for r in rows)), sorted({r["max_seq_len"] for r in rows})
    by_size, by_length = len(models) > 1 or len(lengths) < 2, len(lengths) > 1
    metric_md: list[str] = []
    loss_md: list[str] = []
    for varies, axis in ((by_size, SIZE_AXIS), (by_length, LENGTH_AXIS)):
        if varies:
            metric_lines, loss_lines = axis_sections(rows, report_dir, axis)
            metric_md += metric_lines
            loss_md += loss_lines
        else:  # a figure left by an earlier report of another grid
            for kind in ("metric", "loss"):
                (report_dir / f"{kind}_vs_{axis.stem}.png").unlink(missing_ok=True)
    loss_fit = plot_loss_vs_compute(rows, report_dir / "loss_vs_compute.png")
    plot_learning_curves(rows, curves, report_dir / "learning_curves.png")

    done, failed = _done(rows), [r for r in rows if r["status"] not in FINISHED]
    fixed = ([f"Every run has max_seq_len = {lengths[0]}."] if not by_length and lengths else []) + \
            ([f"Every run is model {models[0]}."] if not by_size else [])
    from_table = sum(r["status"] == COMMITTED for r in rows)
    no_curve = sum(r["status"] == COMMITTED and not len(curves.get(r["name"], ((), ()))[0]) for r in rows)
    md = [f"# {title}", "", f"{len(done)} of {len(rows)} runs finished"
          + (f" ({from_table} read from the committed run table, not on disk)" if from_table else "")
          + (f"; not finished: {', '.join(r['name'] + ' (' + r['status'] + ')' for r in failed)}." if failed else "."),
          *([" ".join(fixed)] if fixed else []), "",
          *metric_md, *(yardstick_lines or []), *loss_md,
          "## Loss vs training compute", "", "![loss vs compute](loss_vs_compute.png)", "",
          (f"- `{loss_fit.equation()}` (C in FLOPs = flops_per_token x tokens), R² (log-log) = {loss_fit.r2:.3f}, "
           f"{loss_fit.n} runs" if loss_fit else "- not fitted (< 2 distinct compute values)"), "",
          "## Learning curves", "",
          *([f"Not drawn: {no_curve} runs read from the committed run table, whose curves are not on record.", ""]
            if no_curve else []),
          "![learning curves](learning_curves.png)", "",
          "## Runs", "", markdown_table(rows, COLUMNS), ""]
    if memory_rows:
        md += ["## GPUs needed per preset (memory model, lum_dist/scaling/memory.py)", "", memory_note, "",
               markdown_table(memory_rows, memory_rows[0].keys()), ""]
    path = report_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


def with_committed_rows(rows: list[dict[str, Any]], table: Path) -> list[dict[str, Any]]:
    """``rows`` with each run missing on disk replaced by its finished row in ``table`` (the ``runs.json`` a report
    left beside ``report.md``), marked "committed": a fresh clone, or one run added to a finished sweep, reports
    every run without re-running the others, and a report never overwrites a result with "missing"."""
    if not table.is_file():
        return rows
    try:
        committed = {r["name"]: r for r in json.loads(table.read_text())}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{table}: not a run table ({e})") from e
    return [{**committed[r["name"]], "status": COMMITTED}
            if r["status"] == "missing" and committed.get(r["name"], {}).get("status") in FINISHED else r
            for r in rows]


def with_committed_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[dict[str, Any]],
                          path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``curves`` plus, for each run read from the committed run table, its curve from ``path`` (the
    ``learning_curves.json`` the report left beside its figure), so the figure keeps every run too."""
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        return {**curves, **{r["name"]: (np.array(saved[r["name"]]["tokens"]), np.array(saved[r["name"]]["loss"]))
                             for r in rows if r["status"] == COMMITTED and r["name"] in saved}}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a table of learning curves ({e})") from e


def write_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    atomic_write_text(path, json.dumps({name: {"tokens": tokens.tolist(), "loss": loss.tolist()}
                                        for name, (tokens, loss) in curves.items() if len(tokens)}) + "\n")


def yardstick_rows(yardstick: SweepConfig) -> list[dict[str, Any]]:
    """The yardstick's run table: each run from disk, else from the run table its own report committed."""
    return with_committed_rows([collect_row(run) for run in expand_grid(yardstick)],
                               resolve_path(yardstick.report_dir) / "runs.json")


def report_sweep(sweep: SweepConfig, runs: list[Run], statuses: dict[str, str] | None = None,
                 memory_shapes: dict[str, ModelShape] | None = None) -> Path:
    """Collect every run of ``sweep`` into runs.csv/runs.json (in its out_dir and its report_dir) and write the
    report.

    ``statuses``: run name -> status from run_sweep (else from what is on disk). ``memory_shapes``:
    the presets of the GPU table (default: sweep.memory_presets built with lum_dist.model)."""
    statuses = statuses or {}
    report_dir = resolve_path(sweep.report_dir)
    rows = with_committed_rows([collect_row(run, statuses.get(run.name, "")) for run in runs],
                               report_dir / "runs.json")
    for table_dir in (resolve_path(sweep.out_dir), report_dir):  # the report's copy is committed with it
        write_run_table(rows, table_dir)
    curves_path = report_dir / "learning_curves.json"
    curves = with_committed_curves({run.name: learning_curve(run) for run in runs}, rows, curves_path)
    write_curves(curves, curves_path)
    if memory_shapes is None:
        memory_shapes = {p: shape_from_preset(p, sweep.memory_num_items) for p in sweep.memory_presets}
    setup = TrainSetup()
    note = (f"80 GB H100 (90% usable), bf16 mixed-precision AdamW, activation checkpointing, "
            f"{setup.micro_batch_tokens} tokens per GPU per micro-step, {sweep.memory_num_items:,} items; "
            f"GiB per GPU at {setup.num_gpus} GPUs and the fewest GPUs (power of two) per ZeRO stage "
            f"('-': does not fit on any count).")
    memory_rows = gpus_table(memory_shapes, H100_80GB, setup) if memory_shapes else None
    yardstick_lines = None
    if sweep.yardstick:
        other = load_sweep(resolve_path(sweep.yardstick))
        yardstick_lines = yardstick_section(rows, sweep.name, yardstick_rows(other), other.name, report_dir)
    return write_report(rows, curves, report_dir, f"Scaling sweep {sweep.name}", memory_rows, note, yardstick_lines)
