"""What every ``launch/*.py`` entry point shares: ranks that die with their launcher, user errors as one line.

Kept free of heavy imports (no torch, numpy or pyarrow): the launch scripts import it before parsing their
arguments, so that ``--help`` and usage errors answer at once.

A *user error* (bad config key or value, malformed data, a missing input path, a folder in use) prints one
line, ``<script>: error: <message>``, on rank 0 only, and exits with status 2; ``--debug`` or ``LUM_DEBUG=1``
shows its traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import ctypes
import linecache
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

USER_ERROR_EXIT = 2
DEBUG_FLAG = "--debug"
DEBUG_HELP = "on a user error, show the full traceback instead of one line (also: LUM_DEBUG=1)"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
OTHER_RANKS_WAIT_S = 10.0  # how long a non-zero rank waits for rank 0 to report a user error
_OUR_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "launch")


def die_with_parent() -> None:
    """Under a launcher (torchrun, deepspeed, accelerate: they set LOCAL_RANK), ask the kernel to SIGKILL this
    process when its launcher dies. Launchers start each rank in its own session, so without this a
    ``kill -9`` of the launcher leaves the ranks running: they finish, save and race a re-run on the same
    folder. Without a launcher (a plain ``python`` run may outlive its shell on purpose, e.g. under nohup),
    a no-op."""
    if "LOCAL_RANK" in os.environ:
        kill_with_parent()


def kill_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op). Also for
    data-loader workers: a rank killed by SIGKILL cannot stop them, and a worker blocked on a full queue
    would otherwise live on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # best effort: a kernel that refuses leaves the old behaviour
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _raised_by_lum_dist(exc: BaseException) -> bool:
    """True if ``exc`` comes from a ``raise`` statement in lum_dist or launch/ (one of our own input checks),
    not from a library or a builtin such as ``int("x")`` (more likely a bug than bad input)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    file = tb.tb_frame.f_code.co_filename
    ours = any(Path(file).resolve().is_relative_to(root) for root in _OUR_CODE)
    return ours and linecache.getline(file, tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(exc: BaseException) -> bool:
    """Bad input rather than a bug: a missing file, any ValueError subclass lum_dist defines (ConfigError,
    DataError, CheckpointError, FolderInUse), or a plain ValueError that lum_dist's own checks raise."""
    if isinstance(exc, FileNotFoundError):
        return True
    if not isinstance(exc, ValueError):
        return False
    return type(exc).__module__.split(".")[0] == "lum_dist" or _raised_by_lum_dist(exc)


def is_rank_zero() -> bool:
    """Rank 0 of a launcher (torchrun, deepspeed, accelerate), or a process without one."""
    return os.environ.get("RANK", "0") == "0"


def _debug(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("LUM_DEBUG", "") not in ("", "0")


def _has_process_group() -> bool:
    """Whether the command made a default process group (torch is only looked up here, never imported)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def close_process_group() -> bool:
    """Barrier, then destroy the default process group, if the command made one. Returns whether there was
    one."""
    if not _has_process_group():
        return False
    dist = sys.modules["torch.distributed"]
    dist.barrier()  # no rank tears down while another still talks to it
    dist.destroy_process_group()
    return True


def exit_without_teardown(status: int) -> None:
    """Leave a finished distributed command: the atexit handlers run and the streams are flushed, but not the
    interpreter's teardown. Seen on this project's CPU machines (2 of 18 two-rank gloo runs under load): after
    ``destroy_process_group`` and every atexit handler, a rank aborts in that teardown ("terminate called without
    an active exception", SIGABRT), so torchrun reports a run whose work is all written as failed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run ``main(argv)`` as a command: user errors -> one line on rank 0 and exit status 2; an int that
    ``main`` returns is the exit status (0 otherwise)."""
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    try:
        result = main(argv)
        # A job may close the group it made itself (pretrain does); a launcher's rank skips the teardown anyway.
        distributed = close_process_group() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    except Exception as exc:
        if _debug(args) or not is_user_error(exc):
            raise
        if is_rank_zero():  # under a launcher every rank fails alike: say it once
            prog = Path(sys.argv[0]).name or "lum-dist"
            message = " ".join(str(exc).split("\n"))
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        else:
            # Exiting at once could make the launcher stop rank 0 before it printed; waiting, this rank is
            # stopped by the launcher once rank 0 has said it and exited.
            time.sleep(OTHER_RANKS_WAIT_S)
        if _has_process_group():  # the other ranks are gone or waiting: no barrier, and no teardown (see above)
            exit_without_teardown(USER_ERROR_EXIT)
        raise SystemExit(USER_ERROR_EXIT) from None
    status = result if isinstance(result, int) and not isinstance(result, bool) else 0
    if distributed:
        exit_without_teardown(status)
    raise SystemExit(status)
