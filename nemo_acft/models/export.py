"""``.nemo`` out: a plain GPT ``.nemo`` without the head (what stock ``MegatronGPTModel`` serves),
or a ``.nemo`` with the head (for NADO-guided decoding), each NeMo's ``save_to`` (a distributed
checkpoint inside, which NeMo reshards when restoring at another layout). Both are written to a
temporary name in the target directory and renamed, so a reader never sees half a file."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch.distributed as dist
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
from omegaconf import open_dict

from nemo_acft.io_utils import tmp_name

PLAIN_TARGET = f"{MegatronGPTModel.__module__}.{MegatronGPTModel.__name__}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _atomic_save_to(model, path: str | os.PathLike) -> Path:
    """``model.save_to`` (collective under model parallelism) into rank 0's temporary name
    (:func:`~nemo_acft.io_utils.tmp_name`: unique per process), renamed by rank 0 once every
    rank has written its part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    box = [str(tmp_name(path, path.suffix))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    model.save_to(str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if _rank() == 0:
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def export_with_head(model, path) -> Path:
    """The ACFT model as it is: trunk + NADO head (restore with ``MegatronGPTACFTModel``)."""
    return _atomic_save_to(model, path)


def export_plain_gpt(model, path, trainer=None) -> Path:
    """A stock ``MegatronGPTModel`` ``.nemo`` holding the trunk alone (no head, no ``acft``
    config): the artifact to serve."""
    cfg = copy.deepcopy(model.cfg)
    with open_dict(cfg):
        cfg.pop("acft", None)
        cfg.target = PLAIN_TARGET
    plain = MegatronGPTModel(cfg, trainer or model.trainer)
    for dst, src in zip(plain.get_model_module_list(), model.get_model_module_list()):
        dst.load_state_dict(src.base_state_dict(), strict=True)
    return _atomic_save_to(plain, path)
