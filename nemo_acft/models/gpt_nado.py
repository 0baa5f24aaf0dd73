"""megatron-core GPT with a NADO head on the last pipeline stage.

The trunk is megatron-core's ``GPTModel`` unchanged. On the last pipeline stage a
:class:`NADOHead` reads the trunk's final hidden states (detached: the NADO objective never
moves the trunk), runs optional transformer layers of its own and a vocab-parallel output layer
initialised at zero (``R = σ(0) = 1/2`` everywhere, so ``q = p`` at the start). Other stages are
plain GPT stages, so megatron's pipeline schedules need no change (NeMo-Aligner's reward-model
pattern).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_acft.config import NADO_KINDS
from nemo_acft.models.parallel import tp_group
from nemo_acft.nado import closed_form_kl, cross_entropy
from nemo_acft.nado.fused import fused_ce_kl, fused_ce_kl_from_hidden
from nemo_acft.nado.sparse import SparseQ, fused_ce_sparse_kl

NADO_PREFIX = "nado_head."


@dataclass
class NADOHeadConfig:
    """The NADO block on the last pipeline stage (``model.acft.nado_head``).

    Attributes:
        kind: ``head`` (this project's design: the head reads the trunk's final hidden states,
            detached, so one trunk forward serves both) | ``separate`` (the authors' prototypes:
            a NADO model of its own that reads the tokens: a token embedding, ``num_layers``
            transformer layers and the output layer, R independent of θ; warm-started from
            θ_0's embedding and first ``num_layers`` layers, see
            :meth:`NADOHead.warm_start_from`).
        num_layers: transformer layers of the head's own, reading the trunk's final hidden
            states (detached); 0 = only the vocab-parallel output layer. ``separate``: the
            separate model's layers (at least 1).
        fp32: keep the head's parameters and compute in fp32 whatever the trunk dtype.
        loss_chunk_tokens: the training loss (CE + KL) with labels: tokens per chunk of the
            fused pass (:func:`nemo_acft.nado.fused.fused_ce_kl`) at TP = 1; at TP = t a chunk
            holds t × as many tokens, so its ``[chunk, V/t]`` work buffers keep their size and
            the pass's all-reduces (several per chunk) fall t-fold; 0 = the unfused path
            (``cross_entropy`` and ``closed_form_kl`` under autograd).
        compile_loss: ``torch.compile`` each chunk of the fused pass (TP = 1, any
            ``reference``; at TP > 1 the eager pass): its elementwise work fused, at a one-off
            compile of tens of seconds per process (``benchmarks/fused_pass.py``). The loss
            against a shipped q (``reference_on: oracle``, :mod:`nemo_acft.nado.sparse`) is
            always eager.
    """

    num_layers: int = 0
    fp32: bool = False
    kind: str = "head"
    loss_chunk_tokens: int = 256
    compile_loss: bool = False

    def __post_init__(self):
        if self.num_layers < 0 or self.loss_chunk_tokens < 0:
            raise ValueError(f"nado_head num_layers={self.num_layers}, loss_chunk_tokens="
                             f"{self.loss_chunk_tokens}: expected integers >= 0")
        if self.kind not in NADO_KINDS:
            raise ValueError(f"nado_head kind={self.kind!r}: expected one of {NADO_KINDS}")
        if self.kind == "separate" and self.num_layers < 1:
            raise ValueError(f"nado_head kind=separate, num_layers={self.num_layers}: a separate "
                             f"NADO model needs at least one transformer layer")
        if not isinstance(self.compile_loss, bool):
            raise ValueError(f"nado_head compile_loss={self.compile_loss!r}: expected true or "
                             f"false")


class TokenLosses(NamedTuple):
    """Per-token outputs of the last stage when labels are given, each ``[b, s]`` fp32.

    With the head switched off (``head_enabled = False``: the LM loss alone, e.g. pre-training
    and the plain fine-tune) ``kl`` and ``log_z`` are None."""

    lm_loss: Tensor  # cross-entropy of the labels under p
    kl: Optional[Tensor]  # closed-form KL(q || p), gradient p − q into the LM logits
    log_z: Optional[Tensor]  # NADO estimate of log R(prefix) (no gradient), for the gate


class ReferenceHidden(NamedTuple):
    """What a *reference* model (``model.acft.reference: frozen | base``) hands the LM step:
    its final hidden states and its head's, each ``[s, b, h]`` (no gradient), and the two output
    weights ``[V/TP, h]``. The step projects them chunk by chunk inside the fused loss, so the
    reference's ``[tokens, V/TP]`` logits never exist at once."""

    lm: Tensor
    nado: Tensor
    lm_weight: Tensor
    nado_weight: Tensor


class NADOHead(MegatronModule):
    """Optional transformer layers + a zero-initialised vocab-parallel output layer.

    Args:
        config: the trunk's TransformerConfig (copied; ``fp32`` switches the head's dtype).
        head: the head's own settings.
        spec: transformer-layer spec for the head's layers.
        vocab_size: padded vocabulary size (the same as the LM output layer's).
        first_layer_number: layer numbers continue the trunk's, so a KV-cache keyed by layer
            number never mixes the head's layers with the trunk's.
        max_sequence_length, position_embedding_type: the trunk's; ``kind: separate`` builds
            its token embedding (megatron-core's ``LanguageModelEmbedding``) with them, and its
            layers take the trunk's rotary embedding (same ``kv_channels``).
    """

    def __init__(self, config: TransformerConfig, head: NADOHeadConfig, spec: ModuleSpec,
                 vocab_size: int, first_layer_number: int, max_sequence_length: int = 0,
                 position_embedding_type: str = "learned_absolute"):
        overrides = {"num_layers": max(head.num_layers, 1)}
        if head.fp32:
            overrides.update(params_dtype=torch.float32, bf16=False, fp16=False,
                             pipeline_dtype=torch.float32)
        head_config = dataclasses.replace(config, **overrides)
        super().__init__(config=head_config)
        self.fp32 = head.fp32
        self.separate = head.kind == "separate"
        self.embedding = None
        if self.separate:
            from megatron.core.models.common.embeddings.language_model_embedding import (
                LanguageModelEmbedding)

            self.embedding = LanguageModelEmbedding(
                config=head_config, vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type)
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=head_config, layer_number=first_layer_number + i)
            for i in range(head.num_layers)
        )
        self.final_layernorm = None
        if head.num_layers:
            self.final_layernorm = build_module(
                spec.submodules.input_layernorm, config=head_config,
                hidden_size=head_config.hidden_size, eps=head_config.layernorm_epsilon,
            )
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            head_config.hidden_size,
            vocab_size,
            config=head_config,
            init_method=torch.nn.init.zeros_,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Sharded state dict for megatron's ``dist_checkpointing`` (resharding on load): each
        of the head's layers under its own ``layers.<i>.`` key, its tensor-parallel weights split
        as the layer declares them. (The default for the ``ModuleList`` would treat the layers'
        TP shards as replicated tensors.)"""
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for i, layer in enumerate(self.layers):
            out.update(layer.sharded_state_dict(prefix=f"{prefix}layers.{i}.",
                                                sharded_offsets=sharded_offsets,
                                                metadata=metadata))
        for name in ("embedding", "final_layernorm", "output_layer"):
            module = getattr(self, name)
            if module is not None:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.",
                                                      sharded_offsets, metadata))
        return out

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                rotary_pos_emb: Optional[Tensor] = None, inference_context=None,
                last_token_only: bool = False, return_hidden: bool = False,
                input_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """Args: hidden_states ``[s, b, h]`` (detached trunk output; unused by ``separate``,
        which embeds ``input_ids`` ``[b, s]`` at ``position_ids``).
        Returns: NADO logits ``[s, b, V/TP]`` (vocab-parallel), or with ``return_hidden`` the
        ``[s, b, h]`` input of the output layer (for a loss that projects chunk by chunk)."""
        if self.separate:
            if input_ids is None:
                raise ValueError("nado_head kind=separate reads the tokens: this stage got no "
                                 "input_ids")
            hidden_states = self.embedding(input_ids=input_ids, position_ids=position_ids)
        if self.fp32:
            hidden_states = hidden_states.float()
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask,
                                     rotary_pos_emb=rotary_pos_emb,
                                     inference_context=inference_context)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        if last_token_only:
            hidden_states = hidden_states[-1:]
        if return_hidden:
            return hidden_states
        logits, _ = self.output_layer(hidden_states)
        return logits

    @torch.no_grad()
    def warm_start_from(self, trunk: GPTModel) -> None:
        """``kind: separate``: copy the trunk's token (and position) embedding and its first
        ``num_layers`` transformer layers into this model (the prototypes start their NADO model
        from the base LM); the output layer stays at zero (R = 1/2, q = p). Needs the trunk's
        embedding and those layers on this rank: pipeline parallelism 1, where φ_0 is written."""
        if not self.separate:
            raise ValueError("warm_start_from: only nado_head kind=separate has its own embedding")
        if not trunk.pre_process or not trunk.post_process:
            raise ValueError("nado_head kind=separate: φ_0 is warm-started from θ_0's embedding "
                             "and first layers, which needs pipeline_model_parallel_size=1 in "
                             "the world that writes φ_0 (the oracle group)")
        if len(trunk.decoder.layers) < len(self.layers):
            raise ValueError(f"nado_head kind=separate, num_layers={len(self.layers)}: the "
                             f"trunk has only {len(trunk.decoder.layers)} layers to start from")
        pairs = [(self.embedding, trunk.embedding)]
        pairs += list(zip(self.layers, trunk.decoder.layers))
        for mine, theirs in pairs:  # built from one spec: the same keys and shapes
            src = theirs.state_dict()
            for key, value in mine.state_dict().items():
                if not torch.is_tensor(value):  # e.g. transformer-engine's _extra_state
                    continue
                if key not in src or src[key].shape != value.shape:
                    raise ValueError(f"nado_head kind=separate: {key} {tuple(value.shape)} has no "
                                     f"counterpart of that shape in the trunk")
                value.copy_(src[key])


class GPTNADOModel(GPTModel):
    """megatron-core GPTModel + :class:`NADOHead` on the last pipeline stage.

    ``forward(input_ids, position_ids, attention_mask)`` on the last stage returns
    ``(lm_logits, nado_logits)``, each ``[b, s, V/TP]`` (vocab-parallel; ``nado_logits`` is None
    while ``head_enabled`` is False); with ``labels`` it returns :class:`TokenLosses`, whose KL
    takes q from ``reference=`` when given (a :class:`ReferenceHidden`, or the reference's q
    computed elsewhere as a ``[b, s, ...]`` :class:`~nemo_acft.nado.sparse.SparseQ`); with
    ``return_hidden=True`` it returns its own :class:`ReferenceHidden` (the model as a
    reference). Other stages return hidden states, like GPTModel. The model is built by
    :class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel` (NeMo's builder).

    The head's parameters live under ``nado_head.`` in the state dict.
    """

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec,
                 vocab_size: int, max_sequence_length: int,
                 nado: Optional[NADOHeadConfig] = None, **kwargs):
        if kwargs.get("mtp_block_spec") is not None:
            raise ValueError("multi-token prediction is not supported with a NADO head")
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        self.nado_config = nado = nado or NADOHeadConfig()
        self.nado_head = None
        #: False skips the head (sampling from p, the LM loss alone): forward returns
        #: (lm_logits, None), or TokenLosses without kl and log_z
        self.head_enabled = True
        if self.post_process:
            self.nado_head = NADOHead(config, nado, transformer_layer_spec, vocab_size,
                                      first_layer_number=config.num_layers + 1,
                                      max_sequence_length=max_sequence_length,
                                      position_embedding_type=kwargs.get(
                                          "position_embedding_type", "learned_absolute"))
        self._reference: Optional[ReferenceHidden] = None
        self._return_hidden = False

    def forward(self, *args, reference: Optional[ReferenceHidden] = None,
                return_hidden: bool = False, **kwargs):
        """GPTModel's forward; ``reference`` and ``return_hidden`` as in the class docstring
        (they only matter on the last pipeline stage)."""
        self._reference, self._return_hidden = reference, return_hidden
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._reference, self._return_hidden = None, False

    def output_weight(self) -> Tensor:
        """The LM output layer's weight ``[V/TP, h]`` (the embedding when they are tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     decoder_input=None, attention_mask=None, inference_params=None,
                     packed_seq_params=None, sequence_len_offset=None,
                     runtime_gather_output=None, extra_block_kwargs=None, inference_context=None):
        if not self.post_process:
            return hidden_states
        last_token_only = bool(
            not self.training and inference_context is not None
            and inference_context.materialize_only_last_token_logits
        )
        chunk = self.nado_config.loss_chunk_tokens * self.config.tensor_model_parallel_size
        if self._return_hidden or self._reference is not None:
            if self.config.sequence_parallel:
                raise ValueError("model.acft.reference=frozen|base needs "
                                 "model.sequence_parallel=False")
        if self._return_hidden:  # this model is the reference of an LM step
            nado_hidden = self.nado_head(hidden_states.detach(), attention_mask, rotary_pos_emb,
                                         inference_context, return_hidden=True,
                                         input_ids=input_ids, position_ids=position_ids)
            return ReferenceHidden(hidden_states, nado_hidden, self.output_weight(),
                                   self.nado_head.output_layer.weight)
        if self._reference is not None and labels is not None:
            return self._reference_losses(hidden_states, labels, runtime_gather_output, chunk)
        # the training loss projects the head's hidden states chunk by chunk inside the fused
        # pass: the [tokens, V/TP] NADO logits are never materialised
        project_in_loss = (labels is not None and chunk > 0
                           and not self.config.sequence_parallel)
        nado_logits = None
        if self.head_enabled:
            nado_logits = self.nado_head(hidden_states.detach(), attention_mask, rotary_pos_emb,
                                         inference_context, last_token_only,
                                         return_hidden=project_in_loss, input_ids=input_ids,
                                         position_ids=position_ids)
        if last_token_only:
            hidden_states = hidden_states[-1:]
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        lm_logits, _ = self.output_layer(hidden_states, weight=output_weight,
                                         runtime_gather_output=runtime_gather_output)
        if labels is None:
            if nado_logits is None:
                return lm_logits.transpose(0, 1).contiguous(), None
            return lm_logits.transpose(0, 1).contiguous(), nado_logits.transpose(0, 1).contiguous()
        # Not megatron's compute_language_model_loss: its cross-entropy overwrites the logits
        # in place, and the KL reads the same logits.
        if nado_logits is None:  # the LM loss alone
            lm_loss = cross_entropy(lm_logits, labels.transpose(0, 1), tp_group())
            return TokenLosses(lm_loss.transpose(0, 1), None, None)
        if project_in_loss:  # one pass, shared logsumexp, hand-written backward
            lm_loss, kl, log_z = fused_ce_kl_from_hidden(
                lm_logits, nado_logits, self.nado_head.output_layer.weight,
                labels.transpose(0, 1), tp_group(), chunk,
                compile=self.nado_config.compile_loss)
        elif chunk > 0:
            lm_loss, kl, log_z = fused_ce_kl(lm_logits, nado_logits, labels.transpose(0, 1),
                                             tp_group(), chunk,
                                             compile=self.nado_config.compile_loss)
        else:
            kl, log_z = closed_form_kl(lm_logits, nado_logits, tp_group(), return_log_z=True)
            lm_loss = cross_entropy(lm_logits, labels.transpose(0, 1), tp_group())
        return TokenLosses(lm_loss.transpose(0, 1), kl.transpose(0, 1), log_z.transpose(0, 1))

    def _reference_losses(self, hidden_states, labels, runtime_gather_output, chunk):
        """LM loss and KL(q_ref ‖ p), q_ref from ``self._reference`` (the head's φ on the
        reference's hidden states, or a :class:`SparseQ` shipped with the batch: the coarsened
        KL of :mod:`nemo_acft.nado.sparse`); ``log_z`` is the reference's Z, read by the
        gates."""
        ref = self._reference
        output_weight = (self.shared_embedding_or_output_weight()
                         if self.share_embeddings_and_output_weights else None)
        lm_logits, _ = self.output_layer(hidden_states, weight=output_weight,
                                         runtime_gather_output=runtime_gather_output)
        y = labels.transpose(0, 1)
        if isinstance(ref, SparseQ):
            lm_loss, kl = fused_ce_sparse_kl(lm_logits, y, ref.transpose(0, 1), tp_group(),
                                             chunk or y.numel())
            return TokenLosses(lm_loss.transpose(0, 1), kl.transpose(0, 1), ref.log_z.float())
        if chunk > 0:
            lm_loss, kl, log_z = fused_ce_kl_from_hidden(
                lm_logits, ref.nado, ref.nado_weight, y, tp_group(), chunk,
                ref_hidden=ref.lm, ref_weight=ref.lm_weight,
                compile=self.nado_config.compile_loss)
        else:
            with torch.no_grad():
                ref_logits = ref.lm.float() @ ref.lm_weight.float().t()
                nado_logits = ref.nado.float() @ ref.nado_weight.float().t()
            kl, log_z = closed_form_kl(lm_logits, nado_logits, tp_group(), return_log_z=True,
                                       ref_lm_logits=ref_logits)
            lm_loss = cross_entropy(lm_logits, y, tp_group())
        return TokenLosses(lm_loss.transpose(0, 1), kl.transpose(0, 1), log_z.transpose(0, 1))

    # --- checkpoints: trunk and head separately -------------------------------------------

    def load_base_state_dict(self, state_dict: Dict[str, Tensor]) -> None:
        """Load a plain GPTModel state dict (this rank's shard); the head keeps its weights.

        Raises a KeyError naming the keys if anything but the head is missing or unexpected.
        """
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(NADO_PREFIX)]
        if missing or result.unexpected_keys:
            raise KeyError(f"base GPT state dict does not match the trunk: missing {missing}, "
                           f"unexpected {list(result.unexpected_keys)}")

    def base_state_dict(self) -> Dict[str, Tensor]:
        """The trunk's state dict without the head: what a plain GPTModel loads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(NADO_PREFIX)}
