"""Small helpers shared by every stage: atomic writes, folder locks, data location, seeding, rank info.

No torch import at the top: data preparation and the command-line parsers import this module, and torch
costs seconds of start-up (the two helpers that need it import it themselves, for that reason only).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import platform
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def data_dir() -> Path | None:
    """Where the real public datasets live: ``$LUM_DATA_DIR``, else ``../shared/data`` if it exists."""
    env = os.environ.get("LUM_DATA_DIR")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FolderInUse(ValueError):
    """Another live process holds the folder's lock (a user error: two runs pointed at one folder)."""


LOCK_NAME = ".lock"
_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth): re-entrant within a process


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<folder>/.lock`` for the block; raise :class:`FolderInUse`, naming the
    folder and the holder's PID, if another process holds it. The kernel drops the lock when its holder dies
    (even by SIGKILL), so a crashed run never leaves a stale lock; the file itself stays (harmless). Nested
    uses in one process share the lock (the pipeline holds its run folder, then pretraining holds it
    again). A POSIX record lock (``lockf``), not ``flock``: forked children (data-loader workers) do not
    inherit it, so they cannot keep a dead run's folder locked while they wind down."""
    folder = Path(folder).resolve()
    if folder in _held:
        fd, depth = _held[folder]
        _held[folder] = (fd, depth + 1)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown PID"
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another run ({holder}): wait for it to end, or write "
                              f"to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held[folder] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held[folder]
        if depth > 1:
            _held[folder] = (fd, depth - 1)
        else:
            del _held[folder]
            os.close(fd)  # releases the lock


def seed_everything(seed: int) -> None:
    import torch  # see the module docstring: start-up time, not an import cycle

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    import torch  # see the module docstring: start-up time, not an import cycle

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def expand_data_path(value: str) -> str:
    """Expand ``${LUM_DATA_DIR}`` (default: ../shared/data when it exists) and other env vars in a path."""
    if "${LUM_DATA_DIR}" in value or "$LUM_DATA_DIR" in value:
        root = data_dir()
        if root is None:
            raise FileNotFoundError(
                f"{value!r} needs the raw datasets: set LUM_DATA_DIR to the folder holding them"
            )
        value = value.replace("${LUM_DATA_DIR}", str(root)).replace("$LUM_DATA_DIR", str(root))
    return os.path.expandvars(value)


def expand_source(source: dict) -> dict:
    """A data source spec with its ``input``/``meta`` paths expanded (see expand_data_path)."""
    return {k: expand_data_path(v) if k in ("input", "meta") and isinstance(v, str) else v
            for k, v in source.items()}


def format_number(v: Any) -> str:
    """A table cell: ``-`` for None, thousands separators, 3 decimals below 100, e-notation below 0.01 (every
    printed table and report uses this one rule)."""
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if not isinstance(v, float):
        return str(v)
    if v != 0 and abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def device_name() -> str:
    """The accelerator this process computes on, or the CPU with its core count."""
    import torch  # see the module docstring: start-up time, not an import cycle

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """HEAD's hash of this checkout, suffixed ``-dirty`` when tracked files differ from it; "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """Device, git commit, torch version and a UTC timestamp: what every result file records."""
    import torch  # see the module docstring: start-up time, not an import cycle

    return {"device": device_name(), "git_commit": git_commit(), "torch": torch.__version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
