"""Process groups: one torch.distributed world per group of the method (gloo on CPU, nccl on
GPU) and megatron's model-parallel groups inside it.

megatron's ``parallel_state`` holds one layout per process world, so the LM group and the
oracle group, with different tensor/pipeline sizes, are two worlds. A world is started by
torchrun, by ``srun`` (one task per rank: ``SLURM_PROCID``/``SLURM_NTASKS``, with
``MASTER_ADDR``/``MASTER_PORT`` exported by the batch script) or by
:mod:`nemo_acft.launch`; a lone process is a world of one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from nemo_acft.world import world_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234,
                     backend: Optional[str] = None, timeout_s: float = 1800) -> None:
    """Initialise torch.distributed (see :func:`world_env`) and megatron's tensor/pipeline
    groups, then seed the default and the tensor-parallel RNG streams.

    Args:
        tp: tensor-parallel size. pp: pipeline-parallel size (data parallel is the rest).
        seed: same on every rank (megatron offsets the tensor-parallel stream by the TP rank).
        backend: default gloo without CUDA, nccl with it.
        timeout_s: of every collective: a dead peer fails the others after this long.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        w = world_env()
        if w["world_size"] == 1 and "MASTER_PORT" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
        if w["world_size"] > 1 and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"rank {w['rank']} of a world of {w['world_size']}: MASTER_ADDR "
                               "is not set (torchrun sets it; under srun export the first "
                               "node's address and a port)")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if torch.cuda.is_available():
            torch.cuda.set_device(w["local_rank"])
        dist.init_process_group(backend, rank=w["rank"], world_size=w["world_size"],
                                timeout=timedelta(seconds=timeout_s))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_model_parallel_size "
                         f"* pipeline_model_parallel_size = {tp} * {pp}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=max(1, int(round(timeout_s / 60))),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_group():
    """The tensor-parallel group, or None when TP = 1 (the math layer then does no reduction)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
