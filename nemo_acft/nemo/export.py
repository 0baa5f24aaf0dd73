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


def nemo_config_for(gcfg, seed: int = 1234):
    """A ``MegatronGPTModel`` config for the native model of ``gcfg`` (``GPTConfig``), byte-level
    tokenizer, one process: the same megatron-core GPT as ``build_gpt_nado`` builds."""
    from omegaconf import OmegaConf

    if gcfg.normalization != "LayerNorm":
        raise ValueError(f"model.normalization={gcfg.normalization!r}: the .nemo export maps "
                         "LayerNorm only")
    return OmegaConf.create({
        "mcore_gpt": True, "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "encoder_seq_length": gcfg.seq_length, "max_position_embeddings": gcfg.seq_length,
        "num_layers": gcfg.num_layers, "hidden_size": gcfg.hidden_size,
        "ffn_hidden_size": gcfg.ffn_hidden_size or 4 * gcfg.hidden_size,
        "num_attention_heads": gcfg.num_attention_heads, "init_method_std": gcfg.init_method_std,
        "hidden_dropout": gcfg.hidden_dropout, "attention_dropout": gcfg.attention_dropout,
        "make_vocab_size_divisible_by": gcfg.make_vocab_size_divisible_by,
        "override_vocab_size": gcfg.vocab_size,
        "position_embedding_type": gcfg.position_embedding_type,
        "share_embeddings_and_output_weights": gcfg.share_embeddings_and_output_weights,
        "normalization": "layernorm", "bias": True, "precision": 32, "seed": seed,
        "transformer_engine": False, "use_cpu_initialization": True,
        "masked_softmax_fusion": False, "bias_activation_fusion": False,
        "bias_dropout_add_fusion": False, "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False, "gradient_as_bucket_view": False,
        "tokenizer": {"library": "byte-level", "type": None, "model": None, "vocab_file": None,
                      "merge_file": None},
        "data": {"data_impl": "mock", "data_prefix": [], "seq_length": gcfg.seq_length,
                 "num_workers": 0},
        "optim": {"name": "adamw", "lr": 1e-4},
        "target": PLAIN_TARGET,
    })


def export_native(trunk_state, gcfg, path, tokenizer, seed: int = 1234) -> Path:
    """The native loop's trunk (``GPTNADOModel.base_state_dict()`` or a plain ``GPTModel``
    state dict) as a stock ``MegatronGPTModel`` ``.nemo``. Needs the byte-level tokenizer (whose
    ids NeMo's ``byte-level`` tokenizer shares) and a model-parallel world of one process."""
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    if getattr(tokenizer, "vocab", None) != ["<byte-level-512>"]:
        raise ValueError("exporting to .nemo needs data.tokenizer=byte (NeMo's byte-level ids); "
                         "the word tokenizer has no NeMo equivalent")
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(), logger=False,
                      enable_checkpointing=False, use_distributed_sampler=False)
    model = MegatronGPTModel(nemo_config_for(gcfg, seed), trainer)
    state = {k: v for k, v in trunk_state.items() if not k.startswith("nado_head.")}
    model.model.load_state_dict(state, strict=True)
    return _atomic_save_to(model, path)


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
