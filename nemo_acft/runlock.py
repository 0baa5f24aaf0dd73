"""One lock per run directory: which processes may write into a run at the same time.

Every entry point that writes into a run directory takes the lock of its role first, before
any check reads a file and before anything else is written (:func:`lock_run`):

- ``all`` (``acft-train``, the driver of every phase) and ``prepare``, ``finish``, ``eval``
  (``acft-eval`` writing into the run) exclude every other holder;
- ``lm`` and ``oracle`` (the two sides of the parallel schedule, two Slurm steps) run beside
  each other, and exclude everything else, a second copy of themselves included.

A refused process fails at once with one line naming the run directory and the holder (its
role, host, pid and since when). The lock is an exclusive ``flock`` on
``run_dir/.locks/<role>.lock``, which the kernel (and a shared file system with coherent
locks: NFSv4, Lustre with ``-o flock``, GPFS) releases when the holder dies, however it dies;
the file also holds the holder's host and pid for the messages. Processes forked by the holder
(the ranks of its worlds) inherit it. A lock file that still names a holder that no longer
holds it was left by a process that was killed: it is taken over with a warning. Where the
file system has no ``flock`` the file alone decides: a holder on this host that is no longer
running is stale; one on another host is refused, with the file to delete named.

Only global rank 0 of a world that torchrun or srun started takes the lock; the other ranks
are covered by it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

from nemo_acft.errors import Refused
from nemo_acft.io_utils import pid_running

log = logging.getLogger("nemo_acft")

LOCK_DIR = ".locks"
#: roles that may hold their locks at the same time (each still excludes a second copy)
COMPATIBLE = {("lm", "oracle"), ("oracle", "lm")}
ROLES = ("all", "prepare", "lm", "oracle", "finish", "eval")
#: flock errors that mean the file system does not support it
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _holder(path: Path) -> Optional[Dict]:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return {"unreadable": text[:80]}


def describe(holder: Optional[Dict]) -> str:
    """``role, host H, pid P, since <time>`` of a lock file's holder."""
    if not holder:
        return "a process that left no record"
    if "unreadable" in holder:
        return f"unreadable record {holder['unreadable']!r}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"role={holder.get('role')} on host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {since}")


class RunLock:
    """The lock of one role on one run directory (:func:`lock_run`)."""

    def __init__(self, run_dir: Path, role: str):
        if role not in ROLES:
            raise ValueError(f"run lock role={role!r}: expected one of {ROLES}")
        self.run_dir, self.role = Path(run_dir), role
        self.dir = self.run_dir / LOCK_DIR
        self.path = self.dir / f"{role}.lock"
        self._fh = None
        self._flock = True
        self.committed = False  # set by the holder once it wrote into the run (no undo after)
        self.created: list = []  # files acquiring created (removed by release(undo=True))
        self.created_dirs: list = []

    # --- the primitive -----------------------------------------------------------------------

    def _try_flock(self, fh) -> bool:
        """Exclusive non-blocking flock; False when another process holds it."""
        if not self._flock:
            return True
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            self._no_flock(e)
            return True

    def _no_flock(self, e: OSError) -> None:
        """A flock error: the file system does not support it (the records decide from now on),
        or a real error (raised)."""
        if e.errno not in _NO_FLOCK:
            raise e
        log.warning("run lock: the file system of %s does not support flock (%s); relying on "
                    "the lock files' host and pid", self.dir, e.strerror)
        self._flock = False

    def _held_by_other(self, path: Path) -> Optional[Dict]:
        """The holder of ``path`` when a live process other than this one holds it, else
        None."""
        if not path.is_file():
            return None
        holder = _holder(path)
        if self._flock:
            with open(path, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return holder or {}
                fcntl.flock(fh, fcntl.LOCK_UN)
            return None
        return holder if self._record_live(holder) else None

    @staticmethod
    def _record_live(holder: Optional[Dict]) -> bool:
        """Without flock: whether a lock file's record names a live holder (another host's
        cannot be checked and counts as live)."""
        if not holder or "unreadable" in holder or holder.get("pid") == os.getpid():
            return False
        if holder.get("host") != socket.gethostname():
            return True
        return pid_running(int(holder.get("pid", -1)))

    # --- acquire / release ------------------------------------------------------------------

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`~nemo_acft.errors.Refused` naming the holder."""
        self.created_dirs = [d for d in (self.dir, self.run_dir, *self.run_dir.parents)
                             if not d.exists()]  # deepest first
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Refused(f"run_dir {self.run_dir}: cannot create {self.dir}: "
                          f"{e.strerror}") from None
        with self._guard():
            if not self.path.exists():
                self.created.append(self.path)
            fh = open(self.path, "a+")
            if not self._try_flock(fh):
                holder = _holder(self.path)
                fh.close()
                raise Refused(f"run_dir {self.run_dir} is in use: {describe(holder)} holds "
                              f"{self.path}; wait for it to end or stop it")
            if not self._flock and self._record_live(_holder(self.path)):
                holder = _holder(self.path)
                fh.close()
                hint = ("; if that process is gone, delete the file"
                        if holder.get("host") != socket.gethostname() else "")
                raise Refused(f"run_dir {self.run_dir} is in use: {describe(holder)} holds "
                              f"{self.path}{hint}")
            for other in sorted(self.dir.glob("*.lock")):
                role = other.stem
                if role == self.role or (self.role, role) in COMPATIBLE:
                    continue
                held = self._held_by_other(other)
                if held is not None:
                    self._unlock(fh)
                    raise Refused(f"run_dir {self.run_dir} is in use: {describe(held)} "
                                  f"({other}); role={self.role} cannot run beside role={role}")
            stale = _holder(self.path)
            if stale and stale.get("pid") != os.getpid():
                log.warning("run lock: taking over %s, left by %s, which is no longer running",
                            self.path, describe(stale))
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"role": self.role, "host": socket.gethostname(),
                                 "pid": os.getpid(), "since": time.time()}))
            fh.flush()
            os.fsync(fh.fileno())
            self._fh = fh
        return self

    def _unlock(self, fh) -> None:
        if self._flock:
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialises the check-and-take of every role (held for milliseconds)."""
        path = self.dir / "guard"
        if not path.exists():
            self.created.append(path)
        with open(path, "a+") as fh:
            deadline = time.monotonic() + 10
            while self._flock:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Refused(f"run_dir {self.run_dir}: {path} stayed locked for 10 s")
                    time.sleep(0.02)
                except OSError as e:
                    self._no_flock(e)
            try:
                yield
            finally:
                if self._flock:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def release(self, undo: bool = False) -> None:
        """Give the lock up (the file stays, emptied). ``undo``: also remove what acquiring
        created (the run directory itself when it did not exist and nothing else is in it), so
        that a run refused by its checks leaves the directory as it was."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        fh.seek(0)
        fh.truncate()
        fh.flush()
        if not undo:
            self._unlock(fh)
            return
        with self._guard():  # no other process is between opening a lock file and locking it
            if self.path in self.created:
                self.path.unlink(missing_ok=True)
            self._unlock(fh)
        if self.dir in self.created_dirs and [p.name for p in self.dir.iterdir()] == ["guard"]:
            (self.dir / "guard").unlink(missing_ok=True)
        for d in self.created_dirs:  # deepest first; a directory that is not empty stays
            with contextlib.suppress(OSError):
                d.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fh is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run_dir, role: str) -> RunLock:
    """The acquired lock of ``role`` on ``run_dir`` (see the module docstring); use as a
    context manager or call ``release()``."""
    return RunLock(Path(run_dir), role).acquire()


__all__ = ["RunLock", "lock_run", "describe", "ROLES", "COMPATIBLE", "LOCK_DIR"]
