"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) and megatron's model parallel."""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234,
                     backend: Optional[str] = None) -> None:
    """Initialise torch.distributed (from torchrun's env, or a 1-process group) and megatron's
    tensor/pipeline groups, then seed the default and the tensor-parallel RNG streams.

    Args:
        tp: tensor-parallel size. pp: pipeline-parallel size.
        seed: same on every rank (megatron offsets the tensor-parallel stream by the TP rank).
        backend: default gloo without CUDA, nccl with it.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a single process, e.g. a notebook or a unit test
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group(backend, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
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
