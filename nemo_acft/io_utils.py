"""File writing shared by every module that saves an artifact.

Everything is written under a temporary name beside its final one and renamed into place, so a
reader never sees half a file or folder. Temporary names carry the writer's host and pid
(``.<name>.tmp-<host>-<pid>[-<random>]``): unique per process, and a later start can tell a
dead writer's leftovers from a live writer's (:func:`remove_dead_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import List

#: ``.<name>.tmp-<host>-<pid>`` (and an optional ``-<random>`` or ``<suffix>``)
_TMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)(?:[-.].*)?$")


def tmp_name(path, suffix: str = "") -> Path:
    """``.<name>.tmp-<host>-<pid><suffix>`` beside ``path``: this process's temporary name."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}{suffix}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path``; on success rename it to ``path`` (never a
    half-written file under the final name), on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_name(path).name + "-")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the folder ``tmp`` in the place of ``final`` (which may exist): the old one is
    renamed aside first and removed last, so ``final`` is at every moment either the old
    complete folder or the new one."""
    old = None
    if final.exists():
        old = tmp_name(final, "-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie, killed but not yet reaped,
    is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_dead_temporaries(root) -> List[Path]:
    """Remove every temporary file or folder under ``root`` (:func:`tmp_name`'s pattern) whose
    writer was a process of this host that is no longer running; a live writer's and another
    host's stay (the side that owns them removes its own). Returns what was removed."""
    root = Path(root)
    removed: List[Path] = []
    if not root.is_dir():
        return removed
    me = _host()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            m = _TMP.match(name)
            if not m or m["host"] != me or pid_running(int(m["pid"])):
                continue
            p = Path(dirpath) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                dirnames.remove(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def rank_log(logs, world: str, rank: int) -> Path:
    """A rank's log in the run's ``logs/`` folder: ``<world>.log`` for global rank 0 (the
    side's own log lines), ``<world>.rank<r>.log`` for the others (their tracebacks and stacks
    dumped by the watchdog)."""
    return Path(logs) / (f"{world}.log" if rank == 0 else f"{world}.rank{rank}.log")


def save_figure(fig, path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG through :func:`atomic_write`, then close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    plt.close(fig)
