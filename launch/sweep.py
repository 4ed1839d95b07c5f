"""Scaling-law sweep: run every (preset, max_seq_len, seed) pretraining run, then fit and report.

    python launch/sweep.py --config configs/sweeps/synthetic-size.yaml            # run (resumable), then report
    python launch/sweep.py --config configs/sweeps/cluster-ladder.yaml --dry-run   # print the commands only
    python launch/sweep.py --config configs/sweeps/synthetic-size.yaml --report-only   # re-collect and re-plot

Runs go one after another; finished runs (result.json present) are skipped, a failed run is reported
and the sweep goes on. Sweep fields can be overridden as ``key=value`` (e.g. ``seeds=[0,1]``).
Output: <out_dir>/<run>/ per run, <out_dir>/runs.{csv,json}, <report_dir>/report.md and its figures.
"""

from __future__ import annotations

import argparse
import shlex

from lum_dist import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweeps/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print each run's command and exit")
    mode.add_argument("--report-only", action="store_true",
                      help="collect finished runs and report, run nothing")
    p.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    p.add_argument("overrides", nargs="*", help="sweep field overrides, key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing for start-up time (--help answers without torch), not to dodge an import cycle.
    from lum_dist.scaling.grid import build_command, expand_grid, load_sweep, run_sweep
    from lum_dist.scaling.report import report_sweep

    sweep = load_sweep(args.config, args.overrides)
    runs = expand_grid(sweep)
    if args.dry_run:
        for run in runs:
            length = f"{run.max_epochs:g} epochs" if run.max_epochs else f"{run.max_steps} steps"
            print(f"# {run.name}: {length} x {run.tokens_per_step} tokens per step"
                  f"{' (finished)' if run.finished() else ''}\n{shlex.join(build_command(sweep, run))}")
        return 0
    statuses = {} if args.report_only else {s.run.name: s.status for s in run_sweep(sweep, runs)}
    report = report_sweep(sweep, runs, statuses)
    failed = [name for name, status in statuses.items() if status == "failed"]
    print(f"[sweep] report: {report}" + (f"; FAILED runs: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
