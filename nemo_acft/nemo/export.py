"""``.nemo`` out: a plain GPT ``.nemo`` without the head (what stock ``MegatronGPTModel`` serves),
or a ``.nemo`` with the head (for NADO-guided decoding). Both are written to a temporary name in
the target directory and renamed, so a reader never sees half a file."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
from omegaconf import open_dict

PLAIN_TARGET = f"{MegatronGPTModel.__module__}.{MegatronGPTModel.__name__}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _atomic_save_to(model, path: str | os.PathLike) -> Path:
    """``model.save_to`` (collective under model parallelism) into a temporary name, renamed by
    rank 0 once every rank has written its part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
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


def main(argv=None) -> None:
    """``acft-export``: turn an ACFT ``.nemo`` (with the head) into the plain GPT ``.nemo`` to
    serve, or re-write it with the head. Launch with torchrun for TP·PP > 1."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--nemo", required=True, help="an ACFT .nemo (MegatronGPTACFTModel)")
    parser.add_argument("--out", required=True, help="the .nemo to write")
    parser.add_argument("--with-head", action="store_true",
                        help="keep the NADO head (for guided decoding); default: plain GPT")
    args = parser.parse_args(argv)
    src = Path(args.nemo)
    if not src.is_file():
        raise SystemExit(f"--nemo {src}: no such file")

    from lightning.pytorch import Trainer
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    from nemo_acft.models import init_distributed
    from nemo_acft.nemo import MegatronGPTACFTModel
    from nemo_acft.nemo.model import validate_config

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = MegatronGPTACFTModel.restore_from(str(src), return_config=True)
    if "acft" not in cfg:
        raise SystemExit(f"--nemo {src}: not an ACFT .nemo (its config has no 'acft'); a plain "
                         "GPT .nemo needs no export")
    validate_config(cfg, world)
    init_distributed(tp=cfg.get("tensor_model_parallel_size", 1),
                     pp=cfg.get("pipeline_model_parallel_size", 1), seed=cfg.get("seed", 1234))
    trainer = Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=world,
                      strategy=NLPDDPStrategy(), logger=False, enable_checkpointing=False,
                      use_distributed_sampler=False)
    model = MegatronGPTACFTModel.restore_from(str(src), trainer=trainer)
    if args.with_head:
        export_with_head(model, args.out)
    else:
        export_plain_gpt(model, args.out)
    if _rank() == 0:
        print(f"wrote {args.out} ({'with' if args.with_head else 'without'} the NADO head)")


if __name__ == "__main__":
    main()
