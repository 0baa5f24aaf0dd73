"""Where this process's main loop is, for the watchdog that tells a stuck world from a slow one
(:class:`nemo_acft.algorithms.coordination.Watchdog`).

The loops call :func:`tick` at every step they finish (an LM or NADO step, a batch sampled or
scored, a checkpoint written) and wrap what legitimately takes as long as another process
needs (waiting for the other side's artifact, or for rank 0 in a collective) in
:func:`waiting`. A world none of whose ranks has ticked for the stated bound, and that is not
waiting, is stuck. :func:`fatal` is how the watchdog ends such a process: the one-line message
goes to whoever launched it (:func:`set_reporter`) and the process exits at once.

A leaf module: every layer may import it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Dict, Iterator, Optional

_lock = threading.Lock()
_state: Dict = {"count": 0, "what": "starting", "at": time.monotonic(), "waiting": None}
_reporter: Dict[str, Optional[Callable[[str], None]]] = {"fn": None}


def tick(what: str) -> None:
    """The main loop finished ``what`` (a short description: ``LM block 2 step 17``)."""
    with _lock:
        _state["count"] += 1
        _state["what"] = what
        _state["at"] = time.monotonic()


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """The main loop waits for another process (``what``): not stuck however long it takes
    (the waits have their own timeouts)."""
    with _lock:
        before = _state["waiting"]
        _state["waiting"] = what
    try:
        yield
    finally:
        with _lock:
            _state["waiting"] = before
        tick(f"done waiting for {what}")


def snapshot() -> Dict:
    """``count``, ``what`` (the last tick), ``idle_s`` (since it), ``waiting`` (or None)."""
    with _lock:
        return {"count": _state["count"], "what": _state["what"],
                "idle_s": time.monotonic() - _state["at"], "waiting": _state["waiting"]}


def set_reporter(fn: Optional[Callable[[str], None]]) -> None:
    """Where :func:`fatal` sends its message first (the launcher's error queue)."""
    _reporter["fn"] = fn


def fatal(message: str, code: int = 1) -> None:
    """End this process now (from any thread) after reporting ``message``: to the reporter,
    and on stderr."""
    try:
        if _reporter["fn"] is not None:
            _reporter["fn"](message)
    finally:
        print(f"fatal: {message}", file=sys.stderr, flush=True)
        os._exit(code)


__all__ = ["tick", "waiting", "snapshot", "set_reporter", "fatal"]
