"""Run a test function on N real processes over gloo (torch.distributed), collect results.

The processes are forked from the test process after NeMo and megatron-core are imported in
it (once per session), so a world starts in well under a second instead of an import each;
nothing distributed is ever initialised in the test process itself. With CUDA they are spawned.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def preload() -> None:
    """Import the heavy stack in this process, so that forked workers start with it."""
    import nemo_acft.models.acft_model  # noqa: F401


def run_workers(fn, world_size: int, *args, timeout: float = 300.0):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes.

    ``fn`` must be a module-level function; it returns a picklable result (tensors welcome).
    Returns the list of results by rank; raises with the workers' tracebacks on failure.
    """
    if torch.cuda.is_available():
        if world_size > torch.cuda.device_count():  # NCCL: a GPU per rank
            import pytest

            pytest.skip(f"a world of {world_size} needs {world_size} GPUs "
                        f"({torch.cuda.device_count()} here)")
        ctx = mp.get_context("spawn")
    else:
        preload()
        ctx = mp.get_context("fork")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out_dir, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for r, p in enumerate(procs):
            err = os.path.join(out_dir, f"rank{r}.err")
            if os.path.exists(err):
                errors.append(f"--- rank {r} ---\n" + open(err).read())
            elif p.exitcode != 0:
                errors.append(f"--- rank {r} --- exit code {p.exitcode} (timeout {timeout}s?)")
        if errors:
            raise RuntimeError("distributed workers failed:\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
