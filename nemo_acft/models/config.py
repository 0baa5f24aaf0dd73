"""Configuration of the GPT trunk and the NADO head, and its translation to megatron-core."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class NADOHeadConfig:
    """The NADO block on the last pipeline stage.

    Attributes:
        num_layers: transformer layers of the head's own, reading the trunk's final hidden
            states (detached); 0 = only the vocab-parallel output layer.
        fp32: keep the head's parameters and compute in fp32 whatever the trunk dtype.
        loss_chunk_tokens: the training loss (CE + KL) with labels: tokens per chunk of the
            fused pass (:func:`nemo_acft.nado.fused.fused_ce_kl`); 0 = the unfused path
            (``cross_entropy`` and ``closed_form_kl`` under autograd).
    """

    num_layers: int = 0
    fp32: bool = False
    loss_chunk_tokens: int = 256


@dataclass
class GPTConfig:
    """Shape of the GPT trunk (megatron-core ``GPTModel``)."""

    vocab_size: int
    seq_length: int = 128
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = False
    normalization: str = "LayerNorm"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    params_dtype: str = "float32"
    nado: NADOHeadConfig = dataclasses.field(default_factory=NADOHeadConfig)

    def __post_init__(self):
        if isinstance(self.nado, dict):
            self.nado = NADOHeadConfig(**self.nado)
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype={self.params_dtype!r}: expected one of {sorted(_DTYPES)}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r}: "
                             "expected 'rope' or 'learned_absolute'")
        for key in ("vocab_size", "seq_length", "num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int, world_size: Optional[int] = None) -> None:
        """Raise a ValueError naming the offending value if (tp, pp) cannot split this model.

        Called before any process group is built.
        """
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}: "
                             "expected positive integers")
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.padded_vocab_size(tp) % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide the padded "
                             f"vocabulary {self.padded_vocab_size(tp)}")
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        if ffn % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide ffn_hidden_size={ffn}")
        if self.num_layers % pp:
            raise ValueError(f"pipeline_model_parallel_size={pp} does not divide "
                             f"num_layers={self.num_layers}")
        if world_size is not None and world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not a multiple of "
                             f"tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp}")

    def transformer_config(self, tp: int, pp: int):
        """The megatron-core ``TransformerConfig`` of the trunk for this (tp, pp)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel(tp, pp)
        dtype = _DTYPES[self.params_dtype]
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization=self.normalization,
            init_method_std=self.init_method_std,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            pipeline_dtype=dtype,
            params_dtype=dtype,
            bf16=dtype is torch.bfloat16,
            fp16=dtype is torch.float16,
            # CPU initialisation builds each full weight from the default generator and slices
            # it, so a TP=2 model holds exactly the TP=1 weights (and is reproducible).
            use_cpu_initialization=not torch.cuda.is_available(),
            perform_initialization=True,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )
