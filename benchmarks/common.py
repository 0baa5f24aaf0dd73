"""What every benchmark script shares: its figures as a flat JSON dict and a PNG next to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict

from nemo_acft.io_utils import atomic_write


def write_results(json_path: str, figures: Dict[str, Any], plot: Callable[[Any, Path], None],
                  plot_data: Any) -> None:
    """``figures`` to ``json_path`` and ``plot(plot_data, <json_path>.png)``, both written to a
    temporary name and renamed."""
    path = Path(json_path)
    with atomic_write(path) as fh:
        json.dump(figures, fh, indent=1)
    plot(plot_data, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def engine(vocab: int, hidden: int, layers: int, heads: int, seq: int, head_layers: int = 1,
           chunk: int = 256, precision: Any = 32, device: str = "cpu"):
    """A :class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel` of this shape in a world of
    one process (NeMo's byte-level tokenizer, the vocabulary set by ``override_vocab_size``),
    with a non-zero NADO head (so the KL and the guidance are not trivial)."""
    import torch
    from omegaconf import OmegaConf

    from nemo_acft.algorithms.setup import quiet_libraries
    from nemo_acft.models.build import build_model

    quiet_libraries()
    cfg = OmegaConf.create({
        "mcore_gpt": True, "micro_batch_size": 1, "global_batch_size": 1,
        "encoder_seq_length": seq, "max_position_embeddings": seq, "num_layers": layers,
        "hidden_size": hidden, "ffn_hidden_size": 4 * hidden, "num_attention_heads": heads,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "override_vocab_size": vocab,
        "position_embedding_type": "rope", "share_embeddings_and_output_weights": False,
        "normalization": "layernorm", "bias": True, "precision": precision, "seed": 1,
        "tokenizer": {"library": "byte-level", "type": None, "model": None},
        "data": {"data_impl": "mock", "data_prefix": [], "num_workers": 0},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
        "acft": {"nado_head": {"num_layers": head_layers, "loss_chunk_tokens": chunk}},
    })
    model = build_model(cfg, tp=1, pp=1, seed=0,
                        trainer_cfg={"devices": 1, "num_nodes": 1,
                                     "accelerator": "gpu" if device == "cuda" else "cpu",
                                     "precision": precision, "gradient_clip_val": 1.0})
    with torch.no_grad():
        for n, p in model.module.named_parameters():
            if n.startswith("nado_head."):
                p.normal_(0, 0.02)
    return model


def plain_gpt(model):
    """Stock ``MegatronGPTModel`` with ``model``'s config and trunk weights (no head)."""
    import copy

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from omegaconf import open_dict

    cfg = copy.deepcopy(model.cfg)
    with open_dict(cfg):
        cfg.pop("acft", None)
    plain = MegatronGPTModel(cfg, model.trainer)
    plain.model.load_state_dict(model.module.base_state_dict(), strict=True)
    return plain.model
