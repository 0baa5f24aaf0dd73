"""θ (the trunk) and φ (the NADO head) as megatron-core distributed checkpoints.

Each part is saved with ``megatron.core.dist_checkpointing`` (the ``torch_dist`` format) from
the module's ``sharded_state_dict``: every rank of a world writes its shards, and a world with
another tensor/pipeline layout reads them back, resharded on load. This is how θ_k and φ_k
cross between the LM group and the oracle group, and how rolling checkpoints are kept; with
``optimizer`` (and ``scheduler``) the optimizer state goes with them, sharded like the
parameters (megatron's ``optim_state_to_sharding_state``, as its ``FP32Optimizer`` does), so
that a resumed run continues bit for bit.

Library choice: megatron-core's ``dist_checkpointing`` is the format NeMo's ``.nemo`` files and
Megatron-LM checkpoints use; nothing here re-implements resharding.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import multiprocessing.queues
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist

from nemo_acft.models.gpt_nado import NADO_PREFIX

PARTS = ("trunk", "head")


def part_sharded_state_dict(module, part: str) -> Dict[str, Any]:
    """The sharded state dict of ``part`` of a ``GPTNADOModel`` stage: ``trunk`` (every key but
    the head's; what a plain GPT loads) or ``head`` (``nado_head.*``; empty off the last
    pipeline stage)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: expected one of {PARTS}")
    head = part == "head"
    return {k: v for k, v in module.sharded_state_dict(prefix="").items()
            if k.startswith(NADO_PREFIX) == head}


def _optimizer_sharded_state_dict(optimizer, model_sd: Dict[str, Any],
                                  is_loading: bool = False) -> Dict[str, Any]:
    """The optimizer's state with each per-parameter tensor as a ShardedTensor keyed like its
    parameter, and the step (shared by all parameters) as common state. NeMo's distributed
    optimizers (``distributed_fused_adam``, ``mcore_distributed_optim``: GPU only, not run on
    these machines) shard their own state; apex's O2 master-weight wrapper is not supported."""
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)
    from nemo.core.optim.optimizers import init_optimizer_states

    if hasattr(optimizer, "sharded_state_dict"):  # NeMo's/megatron's distributed optimizers
        try:
            return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        except TypeError:
            return optimizer.sharded_state_dict(model_sd)
    if hasattr(optimizer, "float16_groups"):
        raise NotImplementedError("checkpoints of the optimizer under model.megatron_amp_O2=true "
                                  "(apex's master-weight wrapper) are not supported: set "
                                  "megatron_amp_O2=false (autocast) or use NeMo's distributed "
                                  "optimizer")

    init_optimizer_states(optimizer)  # every parameter has its moments (a template on load)
    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(
        model_sd, itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups))
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"optimizer steps differ between parameters ({sorted(steps)[:4]}): "
                         "a checkpoint keeps one step for all")
    step = next((s["step"] for s in state["state"].values() if "step" in s), None)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    state["common_step"] = None if step is None else copy.deepcopy(step)
    return state


def _in_process_results_queue() -> None:
    """megatron's ``torch_dist`` writer returns its results through a queue it creates as a
    ``spawn``-context ``Manager`` process: about 5 s of start-up in every process on the CPU
    machines, and a process left behind. Its writers run in this process or in processes forked
    from it (megatron forks them itself), so a fork-context queue created here serves them all;
    set before megatron creates its own (its module global)."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = _ResultsQueue(ctx=mp.get_context("fork"))


class _ResultsQueue(multiprocessing.queues.Queue):
    """The writer's results queue. megatron reads it with ``get_nowait`` once the writing
    process has exited, when the result is surely there; :func:`_save_in_process` writes in this
    process, and an ``mp.Queue``'s item reaches the reader only through its feeder thread, so
    ``get_nowait`` right after ``put`` can find it empty. Here it waits for the item instead
    (it is always on its way: the write has returned)."""

    def get_nowait(self):  # noqa: D102
        return self.get(timeout=120)


@contextlib.contextmanager
def _local_files():
    """megatron reads and writes through NVIDIA's multi-storage client (MSC) whenever that
    package is installed (nemo-toolkit installs it), which emits metrics for every read: 0.28 s
    against 0.12 s to load an 11 MiB head on the CPU machines. Every path here is a local or
    shared POSIX file system, so megatron's own switch (its ``--disable-msc``) is off for the
    duration of one save or load, and back as it was after; the files are the same."""
    from megatron.core.msc_utils import MultiStorageClientFeature as msc

    was = msc.is_enabled()
    msc.disable()
    try:
        yield
    finally:
        if was:
            msc.enable()


def _save_in_process(request) -> None:
    """Run megatron's save request here rather than in a process forked for it: a synchronous
    ``dist_checkpointing.save`` schedules the write on a ``TemporalAsyncCaller``, which forks this
    (large) process and joins it — about 0.2 s per hand-over on the CPU machines before a byte is
    written. The steps are the caller's (``TemporalAsyncCaller.schedule_async_call`` and
    ``AsyncRequest.execute_sync``): stage the tensors (``preload_fn``), write (its writer still
    forks one process per bucket), barrier, finalize (the metadata)."""
    if request.async_fn is not None:
        args = list(request.async_fn_args)
        if request.preload_fn:
            args[1] = request.preload_fn()
        request.async_fn(*args, **request.async_fn_kwargs)
    _barrier()
    for finalize in request.finalize_fns:
        finalize()


def save(path, module, part: str, optimizer=None, scheduler=None,
         common: Optional[Dict[str, Any]] = None) -> None:
    """Write ``part`` of ``module`` (and the optimizer/scheduler state) to the empty or new
    directory ``path``. Collective: every rank of the world calls it."""
    from megatron.core import dist_checkpointing

    _in_process_results_queue()
    path = Path(path)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    model_sd = part_sharded_state_dict(module, part)
    state: Dict[str, Any] = {"model": model_sd, "common": dict(common or {}), "part": part}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    with _local_files():
        _save_in_process(dist_checkpointing.save(state, str(path), async_sharded_save=True))
    _barrier()


def load(path, module, part: str, optimizer=None, scheduler=None,
         strict: bool = True) -> Dict[str, Any]:
    """Read ``part`` (saved by :func:`save` from any layout) into ``module``, resharded to its
    layout; and the optimizer/scheduler state when given. Returns the saved ``common`` dict.
    Collective. A checkpoint of the other part, or keys that do not match, is an error naming
    the directory."""
    path = Path(path)
    with _local_files():
        return _load(path, module, part, optimizer, scheduler, strict)


def _load(path: Path, module, part: str, optimizer, scheduler, strict: bool) -> Dict[str, Any]:
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(path))
    if saved.get("part") != part:
        raise ValueError(f"{path}: a checkpoint of the {saved.get('part')!r} part, not {part!r}")
    model_sd = part_sharded_state_dict(module, part)
    template: Dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if "optimizer" not in saved:
            raise ValueError(f"{path}: holds no optimizer state")
        template["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd,
                                                              is_loading=True)
    loaded = dist_checkpointing.load(template, str(path))
    # a stage without the part (the head off the last pipeline stage) loads nothing
    result = module.load_state_dict(loaded.get("model", {}), strict=False)
    if strict:
        missing = [k for k in result.missing_keys if k.startswith(NADO_PREFIX) == (part == "head")]
        if missing or result.unexpected_keys:
            raise KeyError(f"{path}: the {part} does not match the model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")
    if optimizer is not None and hasattr(optimizer, "sharded_state_dict"):
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        state = loaded["optimizer"]
        step = state.pop("common_step", None)
        if step is not None:
            for s in state["state"].values():
                s["step"] = copy.deepcopy(step)
        state["param_groups"] = [{**g, "params": cur["params"]} for g, cur in
                                 zip(state["param_groups"], optimizer.state_dict()["param_groups"])]
        optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    return dict(saved.get("common") or {})


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["PARTS", "part_sharded_state_dict", "save", "load"]
