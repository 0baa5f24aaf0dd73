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


# --- NeMo (nemo-toolkit 2.5.0, MegatronGPTModel) on CPU -----------------------------------

_NEMO_APPLIED = False


def _local_specs(original):
    """Stands in for ``megatron_gpt_model.get_specs``: it builds every spec eagerly, the TE one
    included, which fails without transformer-engine (``TESpecProvider`` undefined). The default
    and TE spec names get megatron-core's local spec; other names go to NeMo's function."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    @functools.wraps(original)
    def get_specs(spec_name, transformer_config=None, use_te=True, hyena_cfg=None, fp8=False):
        if spec_name in ("", "te_gpt"):
            num_experts = getattr(transformer_config, "num_moe_experts", None)
            return get_gpt_layer_local_spec(num_experts)
        return original(spec_name, transformer_config, use_te, hyena_cfg, fp8)

    return get_specs


def _clip_grad_norm_fp32_cpu(parameters, max_norm, norm_type=2, use_fsdp=False):
    """Stands in for NeMo's ``clip_grad_norm_fp32``, which asserts ``torch.cuda.FloatTensor``
    grads and computes the norm with apex's ``amp_C`` kernels (megatron-core's
    ``get_grad_norm_fp32`` has a ``device='cuda'`` literal too). The same arithmetic: the norm
    over shared and tensor-parallel-duplicate parameters counted once, reduced over the
    model-parallel group, then grads scaled by ``max_norm / (norm + 1e-6)`` when below 1."""
    import math

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    if use_fsdp:
        raise NotImplementedError("FSDP gradient clipping is not available on CPU")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    grads = [p.grad.detach().float() for p in params
             if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    group = parallel_state.get_model_parallel_group()
    if norm_type == math.inf:
        total = torch.stack([g.abs().max() for g in grads]).max() if grads else torch.zeros(())
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    else:
        total = sum((g.norm(norm_type) ** norm_type for g in grads), torch.zeros(()))
        dist.all_reduce(total, group=group)
        total = total ** (1.0 / norm_type)
    coeff = max_norm / (float(total) + 1e-6)
    if coeff < 1.0:
        for p in params:
            p.grad.detach().mul_(coeff)
    return total


def apply_nemo() -> bool:
    """Apply the megatron-core patches and NeMo's own, when CUDA is absent. Idempotent.

    Each replaces a piece of apex/TE/CUDA that NeMo 2.5.0 reaches on the CPU path (numbered
    in the body). Called on import of :mod:`nemo_acft.models.acft_model`.
    """
    global _NEMO_APPLIED
    if torch.cuda.is_available() or _NEMO_APPLIED:
        return False
    apply()
    import os

    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_module
    import nemo.collections.nlp.modules.common.megatron.build_model as build_module
    import nemo.collections.nlp.modules.common.megatron.utils as megatron_utils
    import nemo.collections.nlp.parts.nlp_overrides as overrides
    from megatron.core.tensor_parallel.layers import (
        set_defaults_if_not_set_tensor_model_parallel_attributes,
    )

    # 1. NLPDDPStrategy.__init__ raises ImportError unless apex imported (HAVE_APEX); on CPU
    #    nothing of apex is used by the strategy itself.
    overrides.HAVE_APEX = True
    # 2. MegatronBaseModel._enable_nvidia_optimizations runs re.fullmatch on the unset
    #    NVIDIA_PYTORCH_VERSION (a NeMo bug outside NGC containers): an empty string is "unset".
    os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "")
    # 3. get_specs builds the Transformer Engine spec eagerly: local spec instead.
    if not getattr(gpt_module.get_specs, "__wrapped__", None):
        gpt_module.get_specs = _local_specs(gpt_module.get_specs)
    # 4. build_model calls apex's set_defaults_if_not_set_tensor_model_parallel_attributes,
    #    imported only when apex is present: megatron-core has the same function.
    build_module.set_defaults_if_not_set_tensor_model_parallel_attributes = (
        set_defaults_if_not_set_tensor_model_parallel_attributes)
    # 5. the weight-decay grouping uses apex's listify_model and apex's norm classes to find
    #    norms: the identity-on-lists, and torch's norms (what the local spec builds).
    megatron_utils.listify_model = lambda model: model if isinstance(model, list) else [model]
    megatron_utils.FusedLayerNorm = torch.nn.LayerNorm
    megatron_utils.FastLayerNorm = torch.nn.LayerNorm
    megatron_utils.MixedFusedRMSNorm = torch.nn.RMSNorm
    # 6. setup_transformer_engine_cp_groups creates a torch.cuda.Stream for TE's context
    #    parallelism; only TE modules have set_context_parallel_group, and there are none on CPU.
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import (
        MegatronBaseModel,
    )

    MegatronBaseModel.setup_transformer_engine_cp_groups = lambda self: None
    # 7. gradient clipping (trainer.gradient_clip_val) goes through NeMo's clip_grad_norm_fp32,
    #    which needs CUDA tensors and apex's amp_C: the same arithmetic in torch.
    import nemo.collections.nlp.models.language_modeling.megatron_base_model as base_module

    base_module.clip_grad_norm_fp32 = _clip_grad_norm_fp32_cpu
    # 8. NLPDDPStrategy wraps the model in torch DDP even with one data-parallel replica, and
    #    torch 2.13's DDP refuses to rebuild its buckets at the third step when, as in NeMo's
    #    Megatron training, forward and backward both run inside DDP's forward ("initialize_buckets
    #    must NOT be called during autograd execution"). With one replica DDP has nothing to
    #    reduce: the model is used unwrapped. (Data parallelism > 1 on CPU keeps NeMo's wrapper
    #    and is not covered here.)
    from megatron.core import parallel_state as _ps

    _configure_ddp = overrides.NLPDDPStrategy.configure_ddp

    def configure_ddp(self):
        if _ps.model_parallel_is_initialized() and _ps.get_data_parallel_world_size() == 1:
            self._model = self.model
            return
        _configure_ddp(self)

    overrides.NLPDDPStrategy.configure_ddp = configure_ddp
    _NEMO_APPLIED = True
    return True


#: model-config keys whose CUDA kernels (fusions, Transformer Engine, GPU initialisation) do not
#: exist on a CPU-only torch, and the value each gets there
CPU_MODEL_KEYS = {
    "transformer_engine": False,        # TE's layers need CUDA: megatron-core's local spec
    "use_cpu_initialization": True,     # weights built on the CPU (and identical at any TP)
    "masked_softmax_fusion": False,     # fused softmax kernels: CUDA only
    "bias_activation_fusion": False,
    "bias_dropout_add_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,  # needs apex's fused weight-gradient kernel
    "gradient_as_bucket_view": False,
    "megatron_amp_O2": False,           # apex's master-weight optimizer wrapper
    "sequence_parallel": False,         # torch LayerNorm has no sequence-parallel path
}


def cpu_model_config(cfg):
    """A MegatronGPTModel config with :data:`CPU_MODEL_KEYS` set, when CUDA is absent (returned
    unchanged when it is available). Not a patch of NeMo: the config a CPU run must have."""
    if torch.cuda.is_available():
        return cfg
    from omegaconf import open_dict

    with open_dict(cfg):
        for key, value in CPU_MODEL_KEYS.items():
            cfg[key] = value
        if str(cfg.get("precision", 32)) not in ("32", "32-true"):
            cfg.precision = 32  # bf16/fp16 autocast on CPU is not what the GPU path runs
    return cfg
