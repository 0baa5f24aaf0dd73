"""Worlds of processes for the phases of a run on one node: ``acft-train`` starts each world it
needs (a phase's ``devices`` processes, with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and a master
port of its own, as torchrun would) and watches them. Without CUDA the processes are forked from
this one after the heavy imports (NeMo, megatron-core: about 15 s each), so a world starts in
well under a second; with CUDA they are spawned. On a cluster, torchrun or srun starts the
worlds instead (``slurm/``), and this module is not used.

When a process fails, the other processes of every world are stopped (SIGTERM: an LM block
checkpoints and the side reports ``stopped``; SIGKILL after a grace period) and the error names
the world and its log. SIGTERM/SIGUSR1 sent to this process are forwarded to every process.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from typing import Callable, Dict, List, Tuple

import torch

#: exit code of a process that stopped on SIGTERM/SIGUSR1 after checkpointing
STOPPED = 143


def free_port() -> int:
    """A free TCP port on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, args, rank: int, world_size: int, port: int, threads: int) -> None:
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
    # sys.exit, not os._exit: multiprocessing's exit then stops the helper processes the
    # process started (megatron's checkpoint writer keeps a Manager)
    try:
        fn(*args)
    except StopRequested as e:
        print(f"[rank {rank}] stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(STOPPED)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def _context():
    import multiprocessing as mp

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    import nemo_acft.models.acft_model  # noqa: F401  (imported once, inherited by the forks)

    return mp.get_context("fork")


def start_worlds(worlds: Dict[str, Tuple[int, Callable, tuple]],
                 threads: int = 1) -> List[Tuple[str, int, object]]:
    """Start each world ``name -> (size, fn, args)`` (``fn(*args)`` on every rank); returns the
    ``(world, rank, process)`` triples for :func:`wait_worlds`."""
    ctx = _context()
    procs: List[Tuple[str, int, object]] = []
    for name, (size, fn, args) in worlds.items():
        port = free_port()
        for rank in range(size):
            p = ctx.Process(target=_child, args=(fn, args, rank, size, port, threads),
                            name=f"{name}-{rank}")
            p.start()
            procs.append((name, rank, p))
    return procs


def wait_worlds(procs, logs: str = "", grace_s: float = 60.0) -> None:
    """Wait for every process; when one fails, stop the others (SIGTERM, then SIGKILL after
    ``grace_s``). SIGTERM/SIGUSR1 sent to this process meanwhile are forwarded to them. Raises
    SystemExit(143) when they stopped on a signal, RuntimeError naming the first world that
    failed otherwise."""
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
                        p.terminate()
                deadline = time.monotonic() + grace_s
                while any(p.exitcode is None for _, _, p in procs) and time.monotonic() < deadline:
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
    if failed is not None:
        name, rank, code = failed
        if all(p.exitcode in (0, STOPPED, -signal.SIGTERM) for _, _, p in procs) and code == STOPPED:
            raise SystemExit(STOPPED)
        raise RuntimeError(f"the {name} world failed: rank {rank} exited with code {code}"
                           + (f"; logs: {logs}" if logs else ""))


def run_worlds(worlds: Dict[str, Tuple[int, Callable, tuple]], threads: int = 1,
               logs: str = "", grace_s: float = 60.0) -> None:
    """Run each world ``name -> (size, fn, args)`` at the same time and wait for all
    (:func:`start_worlds`, :func:`wait_worlds`)."""
    wait_worlds(start_worlds(worlds, threads), logs, grace_s)


__all__ = ["run_worlds", "start_worlds", "wait_worlds", "free_port", "STOPPED"]
