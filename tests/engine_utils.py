"""Small MegatronGPTACFTModel configs and batches for the engine tests (NeMo's byte-level
tokenizer: no files needed)."""

from __future__ import annotations

import re
import zlib

import torch
from omegaconf import OmegaConf


def tiny_model_cfg(num_layers=2, hidden=64, heads=4, seq=32, head_layers=1, head_kind="head",
                   **extra):
    """A MegatronGPTModel config of a tiny GPT with the byte-level tokenizer (512 ids)."""
    cfg = {
        "mcore_gpt": True, "micro_batch_size": 4, "global_batch_size": 8,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "encoder_seq_length": seq, "max_position_embeddings": seq, "num_layers": num_layers,
        "hidden_size": hidden, "ffn_hidden_size": 4 * hidden, "num_attention_heads": heads,
        "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "make_vocab_size_divisible_by": 128, "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": False, "normalization": "layernorm",
        "bias": True, "precision": 32, "seed": 1234,
        "tokenizer": {"library": "byte-level", "type": None, "model": None, "vocab_file": None,
                      "merge_file": None},
        "data": {"data_impl": "mock", "data_prefix": [], "seq_length": seq, "num_workers": 0},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95],
                  "sched": {"name": "CosineAnnealing", "warmup_steps": 2, "min_lr": 1e-4}},
        "acft": {"nado_head": {"num_layers": head_layers, "fp32": False,
                               "loss_chunk_tokens": 256, "kind": head_kind}},
    }
    cfg.update(extra)
    return OmegaConf.create(cfg)


TRAINER = {"devices": 1, "num_nodes": 1, "accelerator": "auto", "precision": 32,
           "gradient_clip_val": 1.0}


def build(tp=1, pp=1, world=None, seed=1234, restore_from=None, **cfg_extra):
    """This worker's model at (tp, pp) in a world of ``world`` processes."""
    from nemo_acft.algorithms.setup import quiet_libraries
    from nemo_acft.models.build import build_model

    quiet_libraries()
    world = world or tp * pp
    return build_model(tiny_model_cfg(**cfg_extra), tp=tp, pp=pp,
                       trainer_cfg={**TRAINER, "devices": world}, seed=seed,
                       restore_from=restore_from)


def same_weights_for_any_split(module, tp):
    """Give every parameter values drawn from its *global* name (layer numbers, not the stage's
    local indices) and sliced for this TP rank, so TP=1, TP=2 and PP=2 hold one model; the NADO
    head gets non-zero values too."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = name
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if m:
                key = f"layer{module.decoder.layers[int(m[1])].layer_number}.{m[2]}"
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            shape = list(p.shape)
            split = getattr(p, "tensor_model_parallel", False) and tp > 1
            if split:
                shape[p.partition_dim] *= tp
            full = torch.randn(shape, generator=g) * (0.5 if name.startswith("nado_head") else 0.05)
            if name.endswith("norm.weight") or name.endswith("layer_norm_weight"):
                full += 1.0
            p.copy_(full.chunk(tp, p.partition_dim)[tp_rank] if split else full)


def corpus_batch(rows=8, seq=32, vocab=500, domains=2, seed=0):
    """A random corpus batch with ragged lengths and two domains."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (rows, seq + 1), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].contiguous(), "loss_mask": mask,
            "domain_ids": torch.arange(rows) % domains}
