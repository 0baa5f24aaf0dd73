"""Patches that let megatron-core run on a CPU-only torch build over gloo.

megatron-core 0.13 assumes CUDA in a handful of places that the CPU path of this package reaches
(GPT forward with the local layer spec, the RNG tracker, the pipeline schedules). :func:`apply`
replaces exactly those, and does nothing when CUDA is available, so GPU runs use megatron-core
untouched. It is called once by :mod:`nemo_acft.models`; no other module knows about it.

Each patch below says what it replaces and where megatron-core calls it. When megatron-core
is upgraded, re-check the list with::

    grep -rn "torch.cuda\\.\\|device=\\"cuda\\"\\|\\.cuda()" megatron/core/{models,transformer,tensor_parallel,pipeline_parallel}
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch

_APPLIED = False


def _cpu_device() -> torch.device:
    """Stands in for ``torch.cuda.current_device()``."""
    return torch.device("cpu")


def _no_op(*_args, **_kwargs) -> None:
    """Stands in for ``torch.cuda.synchronize()``: CPU ops are synchronous."""


def _tensor_cuda_on_cpu(self: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    """Stands in for ``Tensor.cuda()``: the tensor stays where it is (the CPU)."""
    return self


def _cpu_device_arg(device):
    """Maps a ``"cuda"`` device argument to the CPU; leaves every other value alone."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


_FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange"})


def _on_cpu(factory, *args, device=None, **kwargs):
    return factory(*args, device=_cpu_device_arg(device), **kwargs)


class _TorchWithCpuFactories(types.ModuleType):
    """The ``torch`` module as seen by one megatron module, with factory functions whose
    ``device="cuda"`` becomes the CPU. Everything else is the real torch."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        return functools.partial(_on_cpu, attr) if name in _FACTORIES else attr


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG-states tracker over the CPU default generator.

        Replaces ``CudaRNGStatesTracker.add`` (``torch.cuda.get_rng_state`` /
        ``torch.cuda.manual_seed``) and ``.fork`` (``_get/_set_cuda_rng_state`` on the CUDA
        generator): on a CPU-only build the device generator *is* the CPU generator, so the
        tracked states (e.g. the tensor-parallel dropout stream) are CPU generator states.
        """

        def add(self, name, seed):  # noqa: D102
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):  # noqa: D102
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def apply() -> bool:
    """Install the CPU patches if CUDA is unavailable. Idempotent. Returns whether patched."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False

    # 0. Not a patch: megatron warns at import and at every spec build that apex is missing
    #    and it falls back to torch norms. That fallback is the intended CPU path.
    warnings.filterwarnings("ignore", message="Apex is not installed")
    #    Likewise the advice to set CUDA_DEVICE_MAX_CONNECTIONS, which has no meaning on CPU.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    # 1. torch.cuda.current_device(): megatron allocates buffers with
    #    `device=torch.cuda.current_device()` (global memory buffer used by local attention,
    #    tensor_parallel/layers.py and mappings.py, transformer_layer.py, rotary embeddings,
    #    p2p_communication.py). On a CPU build it raises; the CPU device is the right answer.
    torch.cuda.current_device = _cpu_device
    # 2. torch.cuda.synchronize(): called in pipeline_parallel/p2p_communication.py after
    #    batched isend/irecv. CPU (gloo) ops have completed by the time wait() returns.
    torch.cuda.synchronize = _no_op
    # 3. Tensor.cuda(): schedules.py builds its token counter with `torch.tensor(0).cuda()`
    #    (pipelined schedules) and language_module.py moves the shared embedding with
    #    `weight.data.cuda()` before its all-reduce (PP > 1). Without CUDA the tensor stays put.
    torch.Tensor.cuda = _tensor_cuda_on_cpu
    # 4. Literal `device="cuda"` allocations in two modules on our path:
    #    schedules.forward_backward_no_pipelining (`torch.zeros([], ..., device="cuda")`, the
    #    token counter) and transformer/utils.get_default_causal_mask (`torch.ones(sq, sq,
    #    device="cuda")`, the causal mask local attention builds when none is passed). Those
    #    modules alone get a torch whose factory functions map "cuda" to the CPU (no global
    #    TorchFunctionMode, so no per-op overhead anywhere else).
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    schedules.torch = _TorchWithCpuFactories()
    transformer_utils.torch = _TorchWithCpuFactories()
    # 5. The RNG tracker (tensor_parallel/random.py): `initialize_rng_tracker` builds a
    #    CudaRNGStatesTracker whose add/fork use the CUDA generator. Replace the builder so
    #    `model_parallel_cuda_manual_seed` and `get_cuda_rng_tracker` get the CPU tracker.
    from megatron.core.tensor_parallel import random as mcore_random

    tracker_cls = _cpu_rng_tracker_class()

    def initialize_rng_tracker(*_args, force_reset: bool = False, **_kwargs):
        if force_reset or not mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mcore_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
            mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mcore_random.initialize_rng_tracker = initialize_rng_tracker
    _APPLIED = True
    return True
