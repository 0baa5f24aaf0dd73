"""Worlds of processes for the phases of a run on one node: ``acft-train`` starts each world it
needs (a phase's ``devices`` processes, with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and a master
port of its own, as torchrun would) and watches them. On a cluster, torchrun or srun starts the
worlds instead (``slurm/``), and this module is not used.

How the processes start. Without CUDA they are forked from a *fork server*
(``multiprocessing``'s ``forkserver``): a clean interpreter started once per driver that imports
NeMo and megatron-core (about 15 s, overlapping the driver's checks) and does nothing else, so a
world still starts in well under a second, and no process inherits a thread pool that the
driver used (a Hugging Face fast tokenizer's, OpenMP's): forking from the driver itself did,
and a tokenizer in a forked rank then waited forever for threads that were not there. With
CUDA they are spawned. Each process gets the driver's environment (on top of the fork server's)
and working directory as they are when the world starts.

When a process fails, its traceback goes to its log (``<logs>/<world>.log`` for rank 0, beside
the side's own log lines, ``<logs>/<world>.rank<r>.log`` for the others) and its one-line error
to the driver, which stops the other processes of every world (SIGTERM: an LM block
checkpoints and the side reports ``stopped``; SIGKILL after a grace period, at once for a
process that is stopped) and raises :class:`WorldFailed` with the first error, the rank and the
log. SIGTERM/SIGUSR1 sent to the driver are forwarded to every process.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from nemo_acft import progress
from nemo_acft.errors import EXIT_STOPPED, exit_code, one_line
from nemo_acft.io_utils import rank_log

#: exit code of a process that stopped on SIGTERM/SIGUSR1 after checkpointing
STOPPED = EXIT_STOPPED
#: what the fork server imports once (its forks start with it)
PRELOAD = ["nemo_acft.quiet", "nemo_acft.models.acft_model"]


class WorldFailed(RuntimeError):
    """A process of a world failed: the message names the world, the rank, its error and its
    log; ``exit_code`` is what the rank's error means (2: bad input, 1: otherwise)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def free_port() -> int:
    """A free TCP port on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_path(logs: str, world: str, rank: int) -> Optional[Path]:
    """Where a rank's traceback goes (see the module docstring); None without a log folder."""
    return rank_log(logs, world, rank) if logs else None


def _child(fn, args, world: str, rank: int, world_size: int, port: int, threads: int,
           env: Dict[str, str], cwd: str, logs: str, errors) -> None:
    os.environ.update(env)  # on top of the fork server's (which holds what its imports set)
    os.chdir(cwd)
    try:  # die with the driver (Linux): SIGTERM, so a side checkpoints and stops
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    for key in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        os.environ.pop(key, None)  # this world is ours, not the Slurm step's
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    from nemo_acft.algorithms.coordination import StopRequested, install_stop_handlers

    install_stop_handlers()
    path = log_path(logs, world, rank)
    progress.set_reporter(lambda msg: errors.put((time.time(), world, rank, msg,
                                                  str(path) if path else "", 1)))
    # sys.exit, not os._exit: multiprocessing's exit then stops the helper processes the
    # process started (megatron's checkpoint writer keeps a Manager)
    try:
        fn(*args)
    except StopRequested as e:
        print(f"[{world} rank {rank}] stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(STOPPED)
    except BaseException as e:
        report_failure(e, world, rank, logs, errors)
        sys.exit(1)
    sys.exit(0)


def report_failure(e: BaseException, world: str, rank: int, logs: str, errors=None) -> None:
    """A failing rank: its traceback to its log (stderr without one), its one-line error to
    the driver's queue."""
    path = log_path(logs, world, rank)
    text = traceback.format_exc()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{world} rank {rank}, pid "
                         f"{os.getpid()}] failed:\n{text}")
        except OSError:
            path = None
    if path is None:
        print(text, file=sys.stderr, flush=True)
    if errors is not None:
        try:
            errors.put((time.time(), world, rank, one_line(e), str(path) if path else "",
                        exit_code(e)))
        except Exception:
            pass


def _context():
    import multiprocessing as mp

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server now (its imports overlap what the caller does next)."""
    if not torch.cuda.is_available():
        from multiprocessing import forkserver

        _context()
        forkserver.ensure_running()


class Worlds:
    """Processes started by :func:`start_worlds`: ``procs`` = ``[(world, rank, process)]`` and
    the queue their errors come back on."""

    def __init__(self, procs, errors, logs: str):
        self.procs, self.errors, self.logs = procs, errors, logs

    def __iter__(self):
        return iter(self.procs)

    def first_error(self) -> Optional[tuple]:
        """The earliest error a failing rank reported, or None."""
        got = []
        while not self.errors.empty():
            got.append(self.errors.get())
        return min(got) if got else None


def start_worlds(worlds: Dict[str, Tuple[int, Callable, tuple]], threads: int = 1,
                 logs: str = "") -> Worlds:
    """Start each world ``name -> (size, fn, args)`` (``fn(*args)`` on every rank; ``fn`` and
    ``args`` picklable); returns the processes for :func:`wait_worlds`."""
    ctx = _context()
    errors = ctx.SimpleQueue()
    env, cwd = dict(os.environ), os.getcwd()
    procs: List[Tuple[str, int, object]] = []
    for name, (size, fn, args) in worlds.items():
        port = free_port()
        for rank in range(size):
            p = ctx.Process(target=_child, args=(fn, args, name, rank, size, port, threads, env,
                                                 cwd, logs, errors), name=f"{name}-{rank}")
            p.start()
            procs.append((name, rank, p))
    return Worlds(procs, errors, logs)


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, a debugger): it would not act on SIGTERM."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
    except (OSError, IndexError):
        return False


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def wait_worlds(worlds: Worlds, logs: str = "", grace_s: float = 60.0) -> None:
    """Wait for every process; when one fails, stop the others (SIGTERM, then SIGKILL after
    ``grace_s``; a stopped process at once). SIGTERM/SIGUSR1 sent to this process meanwhile are
    forwarded to them. Raises SystemExit(143) when they stopped on a signal,
    :class:`WorldFailed` naming the first failure otherwise."""
    procs = worlds.procs
    logs = logs or worlds.logs

    def forward(signum, frame):
        for _, _, p in procs:
            if p.exitcode is None:
                os.kill(p.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    failed = None
    try:
        while True:
            codes = [(n, r, p.exitcode) for n, r, p in procs]
            bad = [(n, r, c) for n, r, c in codes if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                for _, _, p in procs:
                    if p.exitcode is None:
                        p.kill() if _stopped(p.pid) else p.terminate()
                deadline = time.monotonic() + grace_s
                while any(p.exitcode is None for _, _, p in procs) and time.monotonic() < deadline:
                    for _, _, p in procs:
                        if p.exitcode is None and _stopped(p.pid):
                            p.kill()
                    time.sleep(0.1)
                for _, _, p in procs:
                    if p.exitcode is None:
                        p.kill()
                break
            if all(c == 0 for _, _, c in codes):
                break
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for _, _, p in procs:
            p.join(5)
    if failed is None:
        return
    name, rank, code = failed
    if all(p.exitcode in (0, STOPPED, -signal.SIGTERM) for _, _, p in procs) and code == STOPPED:
        raise SystemExit(STOPPED)
    first = worlds.first_error()
    if first is not None:
        _, world, r, message, path, code = first
        raise WorldFailed(f"the {world} world failed: rank {r}: {message}"
                          + (f" (its log: {path})" if path else ""), code)
    how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
    path = log_path(logs, name, rank)
    raise WorldFailed(f"the {name} world failed: rank {rank} {how}"
                      + (f" (its log: {path})" if path else ""))


def run_worlds(worlds: Dict[str, Tuple[int, Callable, tuple]], threads: int = 1,
               logs: str = "", grace_s: float = 60.0) -> None:
    """Run each world ``name -> (size, fn, args)`` at the same time and wait for all
    (:func:`start_worlds`, :func:`wait_worlds`)."""
    wait_worlds(start_worlds(worlds, threads, logs), logs, grace_s)


__all__ = ["run_worlds", "start_worlds", "wait_worlds", "warm_up", "report_failure",
           "free_port", "log_path", "STOPPED", "WorldFailed", "Worlds"]
