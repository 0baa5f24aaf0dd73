"""Build one world's :class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel`: the
process groups, NeMo's Lightning ``Trainer`` (which NeMo's model classes need; the method's
loops drive the model themselves, ``trainer.fit`` is never called) and the model, from a model
config or a ``.nemo``."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict


def make_trainer(devices: int, num_nodes: int = 1, accelerator: str = "auto",
                 precision: Any = 32, gradient_clip_val: Optional[float] = 1.0):
    """NeMo's ``NLPDDPStrategy`` trainer for a world of ``devices × num_nodes`` processes.

    The world is ours (:func:`nemo_acft.models.parallel.init_distributed`: torchrun, srun or
    :mod:`nemo_acft.launch`), so Lightning gets the plain ``LightningEnvironment`` with this
    rank's ``LOCAL_RANK``/``NODE_RANK``, not its Slurm detection (which refuses srun steps sized
    by ``--ntasks``)."""
    import os

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    from nemo_acft.models.parallel import world_env

    w = world_env()
    os.environ["LOCAL_RANK"] = str(w["local_rank"])
    os.environ["NODE_RANK"] = str(w["rank"] // max(devices, 1))
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                   strategy=NLPDDPStrategy(), precision=precision,
                   plugins=[LightningEnvironment()],
                   gradient_clip_val=gradient_clip_val, logger=False,
                   enable_checkpointing=False, use_distributed_sampler=False,
                   enable_progress_bar=False, max_steps=-1)


def with_layout(cfg: DictConfig, tp: int, pp: int, dp: int = 1) -> DictConfig:
    """A copy of the model config at tensor/pipeline sizes ``tp``/``pp`` in a world of data
    parallel size ``dp``, adapted to a CPU-only torch where CUDA is absent
    (:func:`nemo_acft.cpu_compat.cpu_model_config`). The batch sizes are the algorithms'
    business (each step passes its own); NeMo only checks at construction that the global
    batch divides into micro-batches over the data-parallel ranks, so a world where the LM
    group's sizes do not (the oracle group at another data-parallel size) is built with one
    micro-batch per rank."""
    from nemo_acft.cpu_compat import cpu_model_config

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(out):
        out.tensor_model_parallel_size = tp
        out.pipeline_model_parallel_size = pp
        out.pop("restore_from_path", None)
        mbs = int(out.get("micro_batch_size", 1))
        if int(out.get("global_batch_size", mbs)) % (mbs * dp):
            out.global_batch_size = mbs * dp
    return cpu_model_config(out)


def build_model(model_cfg: DictConfig, *, tp: int, pp: int, trainer_cfg: Dict[str, Any],
                seed: int, restore_from: Optional[str] = None, timeout_s: float = 1800):
    """Initialise this process's world (tensor ``tp`` × pipeline ``pp`` × data parallel) and
    build the model on the device: fresh from ``model_cfg``, or ``restore_from`` a GPT or ACFT
    ``.nemo`` with ``model_cfg`` as its config (NeMo reshards a distributed-checkpoint ``.nemo``
    to this layout; a plain GPT's head starts at zero). ``timeout_s``: of every collective (a
    dead or stopped peer fails the others after this long)."""
    from nemo_acft.models.acft_model import MegatronGPTACFTModel
    from nemo_acft.models.checkpoint import _in_process_results_queue
    from nemo_acft.models.parallel import init_distributed

    from nemo_acft.models.parallel import world_env

    _in_process_results_queue()  # before NeMo's own first checkpoint save (see there)
    cfg = with_layout(model_cfg, tp, pp, max(world_env()["world_size"] // (tp * pp), 1))
    init_distributed(tp=tp, pp=pp, seed=seed, timeout_s=timeout_s)
    trainer = make_trainer(**trainer_cfg)
    if restore_from:
        model = MegatronGPTACFTModel.restore_from(restore_from, trainer=trainer,
                                                  override_config_path=cfg, strict=False)
    else:
        model = MegatronGPTACFTModel(cfg, trainer)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


__all__ = ["make_trainer", "with_layout", "build_model"]
