"""The launch/*.py commands: --help without heavy imports and with every option explained; user errors as one
line with exit status 2 (printed once under torchrun), tracebacks only with --debug or for real bugs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lum_dist import cli
from lum_dist.data.prepare import normalize_source

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "launch").glob("*.py"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu"}
ENV.pop("LUM_DEBUG", None)

# Run in a fresh interpreter: the script's --help, then what it imported and which options lack a help text.
HELP_PROBE = """
import json, runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
    code = None
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "deepspeed", "transformers", "datasets") if m in sys.modules)
build = runpy.run_path(script, run_name="probe").get("build_parser")
undocumented = build and [a.option_strings or a.dest for a in build()._actions if not a.help]
print(json.dumps({"code": code, "heavy": heavy, "undocumented": undocumented}))
"""


def _run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option_without_importing_torch(script):
    proc = _run("-c", HELP_PROBE, f"launch/{script}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["code"] == 0 and "usage:" in proc.stdout
    assert report["heavy"] == []  # parsing first, heavy modules after: --help answers at once
    assert report["undocumented"] == []


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == cli.USER_ERROR_EXIT, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_command_line_typo_is_one_line_blamed_on_the_command_line():
    proc = _run("launch/pretrain.py", "--config", "configs/pretrain/debug-cpu.yaml", "train.max_step=5")
    line = _assert_one_line_error(proc, "pretrain.py: error: command line: ", "max_step")
    assert "debug-cpu.yaml" not in line  # the file is fine: the typo is on the command line


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/pretrain/debug-cpu.yaml", "train.max_steps=ten"], "expected int, got 'ten'"),
    (["--config", "configs/pretrain/nope.yaml"], "config file not found: configs/pretrain/nope.yaml"),
])
def test_bad_values_and_missing_configs_are_one_line(args, needle):
    _assert_one_line_error(_run("launch/pretrain.py", *args), needle)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    proc = _run("launch/evaluate.py", "--checkpoint", str(tmp_path / "nothing-here"))
    _assert_one_line_error(proc, "evaluate.py: error:", str(tmp_path / "nothing-here"))


def _bad_movielens(tmp_path: Path) -> Path:
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.data").write_text("1\t1\t5\t100\n1\t2\tfive\t101\n1\t2\t4\t102\n1\t1\t3\t103\n1\t2\t2\t104\n")
    (raw / "u.item").write_text("1|A (1995)|||x|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                "2|B (1995)|||x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n", encoding="latin-1")
    return raw


def test_malformed_input_is_one_line_naming_file_line_field_and_the_flag_to_skip(tmp_path):
    raw = _bad_movielens(tmp_path)
    args = ["launch/prepare.py", "--format", "movielens-100k", "--input", str(raw), "--out",
            str(tmp_path / "o")]
    proc = _run(*args)
    _assert_one_line_error(proc, "u.data line 2: field 'rating'", "--skip-bad")
    assert "skip_bad=True" not in proc.stderr  # a Python spelling the command line does not accept
    again = _run(*args, "--skip-bad")
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    raw = _bad_movielens(tmp_path)
    args = ["launch/prepare.py", "--format", "movielens-100k", "--input", str(raw), "--out",
            str(tmp_path / "o")]
    proc = _run(*args, "--debug") if how == "flag" else _run(*args, env={**ENV, "LUM_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_torchrun_the_error_is_printed_once():
    proc = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
                "launch/pretrain.py", "--config", "configs/pretrain/debug-cpu.yaml", "train.max_step=5")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("error: command line: ") == 1, out
    assert "exitcode  : 2" in out  # both ranks exit with the user-error status (torchrun adds its own report)
    assert "launch/pretrain.py\", line" not in out  # no traceback through our code


# ---------------------------------------------------------------------------------------------
# the handler itself


def _raise(exc_factory):
    def main(argv):
        exc_factory()
    return main


def test_user_errors_exit_2_with_one_line_on_rank_0_only(capsys, monkeypatch):
    def bad_source():
        normalize_source({})  # lum_dist's own check: a plain ValueError

    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(SystemExit) as e:
        cli.run(_raise(bad_source), [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "tool.py: error: source spec needs a 'format'; got {}\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "OTHER_RANKS_WAIT_S", 0.0)  # alone here: no launcher stops this rank
    with pytest.raises(SystemExit) as e:
        cli.run(_raise(bad_source), [])
    assert e.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("bug", [
    lambda: 1 / 0,
    lambda: int("x"),  # a ValueError, but from a builtin: a bug, not input we checked
    lambda: np.zeros(-1),
    lambda: {}["key"],
])
def test_real_bugs_keep_their_traceback(bug):
    with pytest.raises((ZeroDivisionError, ValueError, KeyError)):
        cli.run(_raise(bug), [])


def test_exit_status_is_mains_int_else_0():
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: 1, [])
    assert e.value.code == 1
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: {"a": 1}, [])
    assert e.value.code == 0


def test_a_distributed_command_closes_its_group_and_exits_without_teardown(tmp_path):
    """A finished distributed command: the group is destroyed, atexit handlers run, the status is main's, and the
    interpreter's teardown (where a gloo rank was seen to abort after finished runs) is skipped."""
    script = f"""
import atexit, sys
import torch.distributed as dist
from lum_dist import cli

def main(argv):
    dist.init_process_group("gloo", init_method="file://{tmp_path / 'init'}", rank=0, world_size=1)
    atexit.register(lambda: print("atexit: group alive", dist.is_initialized(), flush=True))
    return 3

cli.run(main, [])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "atexit: group alive False" in out.stdout


def test_a_launched_rank_whose_job_closed_its_own_group_still_exits_without_teardown(tmp_path):
    """``pretrain`` closes the group it made before returning: a rank started by a launcher (WORLD_SIZE > 1) skips
    the interpreter's teardown all the same."""
    script = f"""
import torch.distributed as dist
from lum_dist import cli

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

witness = Teardown()

def main(argv):
    dist.init_process_group("gloo", init_method="file://{tmp_path / 'init'}", rank=0, world_size=1)
    dist.destroy_process_group()
    return 0

cli.run(main, [])
"""
    for world, teardown in (("2", False), ("1", True)):
        env = {**os.environ, "WORLD_SIZE": world}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("teardown ran" in out.stdout) is teardown, (world, out.stdout)


def test_a_user_error_in_a_distributed_command_exits_2_without_teardown(tmp_path):
    """A user error with a live process group: one line, status 2, atexit handlers run, and no interpreter teardown
    (a rank that tore down with its gloo group alive was seen to abort with SIGABRT, so torchrun reported a signal
    instead of the error's status 2)."""
    script = f"""
import atexit
import torch.distributed as dist
from lum_dist import cli

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

witness = Teardown()  # collected when the interpreter tears down __main__

def main(argv):
    dist.init_process_group("gloo", init_method="file://{tmp_path / 'init'}", rank=0, world_size=1)
    atexit.register(lambda: print("atexit: group alive", dist.is_initialized(), flush=True))
    raise FileNotFoundError("no such file: data.parquet")

cli.run(main, [])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.endswith("error: no such file: data.parquet\n"), out.stderr[-2000:]
    assert "atexit: group alive True" in out.stdout
    assert "teardown ran" not in out.stdout
    plain = script.replace('    dist.init_process_group("gloo"', '    pass  # dist.init_process_group("gloo"')
    plain = plain.replace("dist.is_initialized()", "False")
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "teardown ran" in out.stdout, out  # the witness works: without a group, teardown
