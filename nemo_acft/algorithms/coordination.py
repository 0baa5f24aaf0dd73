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
- :func:`side_lock`: one live world per side and run.
"""

from __future__ import annotations

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
        return store.wait_for(kind, iteration, timeout_s, waiting_for=who, alive=alive)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {alive.reason}") from None


def handshake(store: ArtifactStore, side: str, other: str, timeout_s: float,
              poll_s: float = 0.2) -> None:
    """Wait until the other side shows it is alive in the same exchange directory: its status
    is ``done``, or ``running`` with a heartbeat that advances while we watch. A RuntimeError
    after ``timeout_s`` names the directory as this host sees it and what to check."""
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
