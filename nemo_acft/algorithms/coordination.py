"""How a group shows it is alive, finds the other group, and stops cleanly.

- ``exchange/status/<side>.json``: running | done | failed | stopped, written by the side's
  global rank 0, with a heartbeat counter a live side advances (:class:`Heartbeat`), the host
  and the pid of every rank of the side's world. The other side tells a live process from a
  dead one's last word (kill -9, a lost node, ``scancel``) by whether the beat advances
  (:class:`Liveness`), without comparing clocks across hosts.
- :func:`handshake`: a side starts only once the other side's beat advances (an old status
  file of an earlier attempt does not count), and fails after a timeout naming the directory as
  this host sees it.
- SIGTERM/SIGUSR1 (Slurm's time-limit warning, ``scancel``) set a flag; the blocks ask
  :func:`stop_agreed` at each step boundary, a collective over the world, so every rank stops at
  the same step (an LM block checkpoints first) with :class:`StopRequested`.
- :class:`Watchdog`: every rank of a world beats in ``exchange/status/<side>/rank<r>.json``
  with how far its main loop got (:mod:`nemo_acft.progress`); a rank whose beat stops (it was
  stopped, or hangs in the kernel) is named by its peers, and a rank whose main loop has not
  advanced for ``stuck_timeout_s`` while not waiting names itself, with every rank's stacks
  dumped to its log. Either ends the world with that message, which the other side reads too.
- :func:`side_lock`: one live world per side and run.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from nemo_acft import progress
from nemo_acft.algorithms.exchange import ArtifactStore
from nemo_acft.io_utils import atomic_write

log = logging.getLogger("nemo_acft")


def _status_path(store: ArtifactStore, side: str) -> Path:
    return store.root / "status" / f"{side}.json"


def write_status(store: ArtifactStore, side: str, state: str, **extra) -> None:
    """``exchange/status/<side>.json`` (atomically replaced)."""
    with atomic_write(_status_path(store, side)) as fh:
        json.dump({"state": state, "host": socket.gethostname(), "pid": os.getpid(),
                   "time": time.time(), **extra}, fh)


def read_status(store: ArtifactStore, side: str) -> Optional[Dict[str, Any]]:
    """The side's status, or None when it has none (yet) or it is being replaced."""
    try:
        return json.loads(_status_path(store, side).read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """Keeps ``status/<side>.json`` at ``running`` with a counter ``beat`` advanced every
    ``every_s`` seconds by a thread of global rank 0; ``finish(state)`` stops it and writes the
    final state. Other ranks hold a Heartbeat that does nothing."""

    def __init__(self, store: ArtifactStore, side: str, every_s: float = 2.0, **extra):
        self.store, self.side, self.every_s, self.extra = store, side, every_s, extra
        self.beat = 0
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.active:
            self._write("running")
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{side}",
                                            daemon=True)
            self._thread.start()

    def _write(self, state: str, **extra) -> None:
        self.beat += 1
        write_status(self.store, self.side, state, beat=self.beat, **self.extra, **extra)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write("running")
                except OSError as e:  # a full or lost file system: the other side will notice
                    log.warning("[%s] heartbeat not written: %s", self.side, e)

    def finish(self, state: str, **extra) -> None:  # noqa: D102
        if not self.active:
            return
        with self._lock:
            self._stop.set()
            self._write(state, **extra)
        self._thread.join(timeout=5)


class Liveness:
    """Whether the other side is alive, from its status file: dead once it reports failed or
    stopped, or when its heartbeat has not advanced for ``stale_s`` seconds of this host's
    clock. ``reason`` says why. Any rank may ask."""

    def __init__(self, store: ArtifactStore, other: str, stale_s: float):
        self.store, self.other, self.stale_s = store, other, stale_s
        self._beat, self._seen = None, time.monotonic()
        self.reason = ""

    def __call__(self) -> bool:
        if stop_requested() is not None:
            raise StopRequested(f"signal {stop_requested()} while waiting for the {self.other} "
                                "side")
        st = read_status(self.store, self.other)
        now = time.monotonic()
        if st is None:
            return True  # not started yet, or being replaced: the timeouts cover it
        failed = failed_rank(self.store, self.other, st.get("pids") or [])
        if failed is not None:
            self.reason = f"the {self.other} side failed: {failed}"
            return False
        if st.get("state") in ("failed", "stopped"):
            self.reason = (f"the {self.other} side reported {st['state']!r} on host "
                           f"{st.get('host')}: {st.get('error', 'no error message')}")
            return False
        if st.get("state") == "done":
            return True
        if st.get("beat") != self._beat:
            self._beat, self._seen = st.get("beat"), now
        elif now - self._seen > self.stale_s:
            self.reason = (f"the {self.other} side's heartbeat ({_status_path(self.store, self.other)}, "
                           f"host {st.get('host')}, pid {st.get('pid')}) has not advanced for "
                           f"{now - self._seen:.0f} s: the process is gone (killed, cancelled or "
                           "its node lost)")
            return False
        return True


def wait_for(store: ArtifactStore, kind: str, iteration: int, timeout_s: float, who: str,
             alive: Liveness) -> Dict[str, Any]:
    """``store.wait_for`` that says why the other side is considered dead."""
    try:
        with progress.waiting(f"{who}'s {kind} iteration {iteration}"):
            return store.wait_for(kind, iteration, timeout_s, waiting_for=who, alive=alive)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {alive.reason}") from None


def handshake(store: ArtifactStore, side: str, other: str, timeout_s: float,
              poll_s: float = 0.2) -> None:
    """Wait until the other side shows it is alive in the same exchange directory: its status
    is ``done``, or ``running`` with a heartbeat that advances while we watch. A RuntimeError
    after ``timeout_s`` names the directory as this host sees it and what to check."""
    with progress.waiting(f"the {other} side to start"):
        _handshake(store, side, other, timeout_s, poll_s)


def _handshake(store, side, other, timeout_s, poll_s) -> None:
    first = read_status(store, other)
    deadline = time.monotonic() + timeout_s
    while True:
        st = read_status(store, other)
        if st is not None and (st.get("state") == "done" or (
                st.get("state") == "running" and (first is None or st.get("beat") != first.get("beat")
                                                  or st.get("pid") != first.get("pid")))):
            log.info("[%s] handshake: the %s side is up on host %s (pid %s)", side, other,
                     st.get("host"), st.get("pid"))
            return
        if time.monotonic() > deadline:
            seen = ("no status file" if st is None else
                    f"a {st.get('state')!r} status that did not advance (host {st.get('host')}, "
                    f"pid {st.get('pid')})")
            raise RuntimeError(
                f"[{side}] the {other} side did not report in {store.root.resolve()} within "
                f"{timeout_s:.0f} s (found {seen}). Check that both groups see this directory on "
                f"a shared file system (this side is on host {socket.gethostname()}), and the "
                f"{other} side's log ({store.root.parent / 'logs' / (other + '.log')}).")
        time.sleep(poll_s)


def _rank_dir(store: ArtifactStore, side: str) -> Path:
    return store.root / "status" / side


def read_rank(store: ArtifactStore, side: str, rank: int) -> Optional[Dict[str, Any]]:
    """A rank's watchdog file, or None."""
    try:
        return json.loads((_rank_dir(store, side) / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def failed_rank(store: ArtifactStore, side: str, pids: List[int]) -> Optional[str]:
    """The error of a rank of ``side`` that reported ``failed`` in this attempt (its pid is one
    of the side status's ``pids``), or None."""
    d = _rank_dir(store, side)
    for p in sorted(d.glob("rank*.json")) if d.is_dir() else []:
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if st.get("state") == "failed" and st.get("pid") in pids:
            return st.get("error", "no message")
    return None


class Watchdog:
    """Every rank of a world: a thread that every ``every_s`` seconds writes
    ``exchange/status/<side>/rank<r>.json`` (its beat, how far the main loop got, whether it
    waits) and checks

    - its peers: a rank whose beat has not advanced for ``dead_s`` is not running (stopped by
      SIGSTOP or a debugger, swapped out, hung in the kernel): named, with its last step;
    - itself: a main loop that has not advanced (:func:`nemo_acft.progress.tick`) for
      ``stuck_s`` while not waiting (:func:`nemo_acft.progress.waiting`) is stuck: its stacks
      (every thread's, :mod:`faulthandler`) go to ``log_file`` and it is named. A rank that
      sees a peer declared stuck dumps its own stacks too.

    On either, the rank writes its file as ``failed`` with the message (the other side's
    :class:`Liveness` reads it; rank 0 also ends the side's :class:`Heartbeat` as failed) and
    ends its process (:func:`nemo_acft.progress.fatal`), which fails the world with the
    message. ``stop()`` ends the thread and writes ``done``."""

    def __init__(self, store: ArtifactStore, side: str, every_s: float, dead_s: float,
                 stuck_s: float, pids: List[int], log_file: Optional[Path] = None,
                 heartbeat=None):
        self.store, self.side = store, side
        self.every_s, self.dead_s, self.stuck_s = every_s, dead_s, stuck_s
        self.log_file, self.heartbeat, self.pids = log_file, heartbeat, list(pids)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.beat, self.dumped = 0, False
        self._peers: Dict[int, tuple] = {}
        self._started = time.monotonic()
        self._stop = threading.Event()
        _rank_dir(store, side).mkdir(parents=True, exist_ok=True)
        self._write("running")
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{side}", daemon=True)
        self._thread.start()

    def _write(self, state: str, **extra) -> None:
        self.beat += 1
        snap = progress.snapshot()
        with atomic_write(_rank_dir(self.store, self.side) / f"rank{self.rank}.json") as fh:
            json.dump({"state": state, "beat": self.beat, "host": self.host, "pid": self.pid,
                       "rank": self.rank, "progress": snap["count"], "what": snap["what"],
                       "waiting": snap["waiting"], "time": time.time(), **extra}, fh)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._write("running")
            except OSError as e:  # a full or lost file system: the peers will notice
                log.warning("[%s] watchdog file not written: %s", self.side, e)
            message = self._check()
            if message and not self._stop.is_set():
                self._fail(message)

    def _check(self) -> Optional[str]:
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank:
                continue
            st = read_rank(self.store, self.side, r)
            if st is not None and st.get("pid") != self.pids[r]:
                st = None  # an earlier attempt's file
            if st is not None and st.get("state") in ("done", "failed"):
                continue  # finished (or reporting its own failure)
            beat = st.get("beat") if st else None
            if st is not None and st.get("state") == "stuck" and not self.dumped:
                self._dump(f"rank {r} was declared stuck")
            if r not in self._peers or self._peers[r][0] != beat:
                self._peers[r] = (beat, now)
            elif now - self._peers[r][1] > self.dead_s and now - self._started > self.dead_s:
                where = (f"host {st.get('host')}, pid {st.get('pid')}, last step "
                         f"{st.get('what')!r}" if st else "it never reported")
                return (f"rank {r} of the {self.side} world ({where}) has not run for "
                        f"{now - self._peers[r][1]:.0f} s: stopped (SIGSTOP, a debugger) or "
                        "hung in the kernel")
        snap = progress.snapshot()
        if snap["waiting"] is None and snap["idle_s"] > self.stuck_s:
            self._dump("no progress")
            message = (f"rank {self.rank} of the {self.side} world (host {self.host}, pid "
                       f"{self.pid}) is stuck: no progress for {snap['idle_s']:.0f} s after "
                       f"{snap['what']!r}; every thread's stack is in "
                       f"{self.log_file or 'its stderr'} (its peers': in theirs)")
            self._write("stuck", error=message)
            time.sleep(min(2.5 * self.every_s, 10.0))  # the peers see it and dump theirs
            return message
        return None

    def _dump(self, why: str) -> None:
        self.dumped = True
        try:
            if self.log_file is not None:
                with open(self.log_file, "a") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{self.side} rank "
                             f"{self.rank}, pid {self.pid}] watchdog ({why}): every thread's "
                             "stack\n")
                    fh.flush()
                    faulthandler.dump_traceback(file=fh, all_threads=True)
            else:
                faulthandler.dump_traceback(all_threads=True)
        except OSError as e:
            log.warning("[%s] stacks not written: %s", self.side, e)

    def _fail(self, message: str) -> None:
        log.error("[%s] %s", self.side, message)
        try:
            self._write("failed", error=message)
            if self.heartbeat is not None and self.heartbeat.active:
                self.heartbeat.finish("failed", error=message)
        except OSError:
            pass
        progress.fatal(message)

    def stop(self, state: str = "done") -> None:
        """End the thread and write the final state."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._write(state)
        except OSError:
            pass


class StopRequested(BaseException):
    """SIGTERM or SIGUSR1: save and exit at the next step boundary."""


_STOP: Dict[str, Optional[int]] = {"signal": None}


def stop_requested() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _STOP["signal"]


def stop_agreed() -> bool:
    """Collective: whether any rank of the world was asked to stop (so all stop together)."""
    flag = 1.0 if _STOP["signal"] is not None else 0.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([flag])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = float(t)
    if flag and _STOP["signal"] is None:
        _STOP["signal"] = signal.SIGTERM
    return bool(flag)


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 set the flag :func:`stop_agreed` reads; a second signal stops at
    once."""
    def handler(signum, frame):
        if _STOP["signal"] is not None:
            raise StopRequested(f"signal {signum} (second)")
        _STOP["signal"] = signum
        log.warning("signal %d: stopping at the next step boundary", signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def world_pids() -> List[int]:
    """Collective: the pid of every rank of the world, by rank."""
    pids: List[Any] = [os.getpid()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        pids = [None] * dist.get_world_size()
        dist.all_gather_object(pids, os.getpid())
    return pids


@contextmanager
def side_lock(store: ArtifactStore, side: str):
    """One live world per side and run: on global rank 0, a second one fails with the
    holder's host and pid."""
    import fcntl

    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    p = store.root / "status" / f"{side}.lock"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fh = open(p, "a+")
    except OSError as e:
        raise RuntimeError(f"[{side}] cannot write to the exchange directory "
                           f"{store.root.resolve()} on host {socket.gethostname()}: {e}") from e
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise RuntimeError(f"another {side} process of this run is alive ({fh.read().strip()}); "
                           f"lock file {p}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()} pid {os.getpid()}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
