"""``MegatronGPTACFTModel``: NeMo's ``MegatronGPTModel`` with the NADO head, and the small
interface the algorithms (:mod:`nemo_acft.algorithms`) drive it through.

NeMo builds the model (config, tokenizer, megatron-core ``GPTModel`` as a
:class:`~nemo_acft.models.gpt_nado.GPTNADOModel`, ``.nemo`` save/restore), the optimizer and the
learning-rate schedule (``setup_optimization``/``configure_optimizers``, NeMo's registry and
schedulers), gradient clipping (``clip_grad_norm_fp32``) and data-parallel gradient reduction;
every forward and backward runs inside megatron-core's ``get_forward_backward_func`` schedule, so
any tensor/pipeline/data-parallel layout works. This follows NeMo-Aligner's
``alignable_interface.py``: the model knows how to compute, the loops know when.

The interface (every method is called by every rank of the world with the same arguments):

- :meth:`configure_training` (which part trains, NeMo optimizer + scheduler);
- :meth:`lm_step` (LM loss + Σ_d λ_d · gated closed-form KL, plus extra terms such as the RL
  baseline's policy gradient) and :meth:`nado_step` (``nado_loss``, trunk frozen): one optimizer
  step each, returning metrics reduced over the world;
- :meth:`generate` (KV-cached, TP-aware sampling, guided or not) and :meth:`token_log_probs`;
- :meth:`save_part` / :meth:`load_part`: θ (trunk) and φ (head) as distributed checkpoints,
  resharded on load (:mod:`nemo_acft.models.checkpoint`).

Batches are dicts of CPU tensors holding the *whole* global batch; each data-parallel rank takes
its rows and micro-batches them, and every tensor is placed on the model's device. Losses are
normalised by the global batch's token counts, so any data-parallel size and micro-batch size
gives the same step (up to summation order).

Importing this module checks that the installed nemo-toolkit and megatron-core are the pinned
ones and, on a CPU-only torch, applies :func:`nemo_acft.cpu_compat.apply_nemo`.
"""

from __future__ import annotations

import math
from functools import partial
from importlib import metadata
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

REQUIRED = {"nemo-toolkit": "2.5.0", "megatron-core": "0.13.1"}


def check_versions() -> None:
    """Raise an ImportError naming the required and installed versions when they differ."""
    found = {}
    for dist_name in REQUIRED:
        try:
            found[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            found[dist_name] = None
    wrong = {d: v for d, v in found.items() if v != REQUIRED[d]}
    if wrong:
        raise ImportError(
            "nemo_acft needs " + ", ".join(f"{d}=={v}" for d, v in REQUIRED.items())
            + "; installed: " + ", ".join(f"{d} {v or 'missing'}" for d, v in found.items())
            + ". Install with: bash scripts/setup.sh (the pip constraint file "
            "constraints/cpu.txt on CPU)")


check_versions()

from nemo_acft.cpu_compat import apply_nemo  # noqa: E402

apply_nemo()

from megatron.core import parallel_state  # noqa: E402
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import (  # noqa: E402
    MegatronGPTModel,
    get_specs,
    mcore_model_customize,
)
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from nemo_acft.models import checkpoint  # noqa: E402
from nemo_acft.models.generate import Samples, SamplingParams, generate  # noqa: E402
from nemo_acft.models.gpt_nado import NADO_PREFIX, GPTNADOModel, NADOHeadConfig  # noqa: E402
from nemo_acft.models.objectives import (DistributionStats, LMLoss, LogProbs,  # noqa: E402
                                         NadoLoss, Objective, ReferenceQ, Regularizer,
                                         Reinforce)
from nemo_acft.models.parallel import tp_group  # noqa: E402
from nemo_acft.nado.sparse import SparseQ  # noqa: E402

#: the keys of an LM batch that carry the reference's q (:meth:`MegatronGPTACFTModel.reference_q`),
#: in :class:`~nemo_acft.nado.sparse.SparseQ`'s order
SHIPPED_Q = ("q_ids", "q_log", "q_log_rest", "q_log_z")


def _dp() -> Tuple[int, int]:
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())


class MegatronGPTACFTModel(MegatronGPTModel):
    """``MegatronGPTModel`` + NADO head, driven by the algorithms (see the module docstring).

    Config: ``model.acft.nado_head`` (``num_layers``, ``fp32``, ``loss_chunk_tokens``); the rest of
    ``model.acft`` is read by the algorithms.
    """

    def __init__(self, cfg: DictConfig, trainer):
        acft = cfg.get("acft") or {}
        head = acft.get("nado_head") or {}
        self.head_config = NADOHeadConfig(**OmegaConf.to_container(OmegaConf.create(dict(head))))
        super().__init__(cfg, trainer)
        self._trainable: Optional[str] = None
        self._reference_module: Optional[GPTNADOModel] = None

    # --- NeMo hooks ---------------------------------------------------------------------

    def model_provider_func(self, pre_process, post_process):
        """The trunk exactly as ``MegatronGPTModel`` builds it, as a ``GPTNADOModel``."""
        cfg = self.cfg
        if not self.mcore_gpt:
            raise ValueError("model.mcore_gpt=False: MegatronGPTACFTModel needs the "
                             "megatron-core GPT (set model.mcore_gpt=True)")
        model = GPTNADOModel(
            config=self.transformer_config,
            transformer_layer_spec=get_specs(self.spec_name, self.transformer_config,
                                             self.transformer_engine, cfg.get("hyena", None),
                                             cfg.get("fp8", False)),
            vocab_size=cfg.get("override_vocab_size", self.padded_vocab_size),
            max_sequence_length=cfg.get("encoder_seq_length", 512),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", True),
            position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
            rotary_percent=cfg.get("rotary_percentage", 1.0),
            seq_len_interpolation_factor=cfg.get("seq_len_interpolation_factor", None),
            rotary_base=cfg.get("rotary_base", 10000),
            nado=self.head_config,
        )
        mcore_model_customize(cfg, model)
        return model

    def on_load_checkpoint(self, checkpoint) -> None:
        """Restore: a checkpoint with the head loads as NeMo loads it; a plain GPT checkpoint
        (no ``nado_head.`` weights) loads into the trunk, the head keeps its fresh zeros (R = 1/2,
        q = p), and any other mismatch is an error naming the keys."""
        state = checkpoint.get("state_dict") or {}
        if state and not any(k.startswith("model." + NADO_PREFIX) for k in state):
            trunk = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            self.module.load_base_state_dict(trunk)
            self.acft_restored_base_only = True
            return
        self.acft_restored_base_only = False
        super().on_load_checkpoint(checkpoint)

    def setup_optimizer_param_groups(self):
        """NeMo's weight-decay groups, restricted to the parameters that train (the trunk in an
        LM block, the head in an oracle block)."""
        super().setup_optimizer_param_groups()
        groups = []
        for group in self._optimizer_param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params})
        self._optimizer_param_groups = tuple(groups)

    # --- layout -------------------------------------------------------------------------

    @property
    def module(self) -> GPTNADOModel:
        """This rank's pipeline stage (the megatron-core module)."""
        modules = self.get_model_module_list()
        if len(modules) != 1:
            raise ValueError("virtual pipeline stages are not supported "
                             "(model.virtual_pipeline_model_parallel_size)")
        return modules[0]

    @property
    def device(self) -> torch.device:  # noqa: D102
        return next(self.module.parameters()).device

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (ids beyond it are Megatron's padding: never sampled), at
        most the model's output size."""
        out = self.cfg.get("override_vocab_size") or self.padded_vocab_size
        return min(int(self.tokenizer.vocab_size), int(out))

    @property
    def pad_id(self) -> int:  # noqa: D102
        pad = getattr(self.tokenizer, "pad_id", None)
        return int(pad) if isinstance(pad, int) and pad >= 0 else int(self.tokenizer.eos_id)

    @staticmethod
    def layout() -> Dict[str, int]:
        """Tensor, pipeline and data-parallel sizes of this world."""
        return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                "dp": parallel_state.get_data_parallel_world_size()}

    # --- training -----------------------------------------------------------------------

    def configure_training(self, part: str, optim: Dict[str, Any], max_steps: int):
        """Train ``part`` (``trunk`` or ``head``; the other is frozen) with NeMo's optimizer and
        scheduler from ``optim`` (``model.optim``'s layout: ``name``, ``lr``, …, ``sched``) over
        ``max_steps`` steps. Returns ``(optimizer, scheduler)``; a resumed block loads their
        state with :meth:`load_part`."""
        if part not in checkpoint.PARTS:
            raise ValueError(f"part={part!r}: expected one of {checkpoint.PARTS}")
        for name, p in self.module.named_parameters():
            p.requires_grad_(name.startswith(NADO_PREFIX) == (part == "head"))
        cfg = OmegaConf.create(dict(optim))
        with open_dict(cfg):
            if "sched" in cfg and cfg.sched is not None:
                cfg.sched.max_steps = int(max_steps)
        with open_dict(self._cfg):
            self._cfg.optim = cfg
        self._optimizer, self._scheduler = None, None
        self.configure_optimizers()
        self._trainable = part
        return self._optimizer, self.scheduler

    @property
    def scheduler(self):
        """The learning-rate scheduler of :meth:`configure_training` (None without ``sched``)."""
        s = self._scheduler
        return s["scheduler"] if isinstance(s, dict) else s

    def lm_step(self, batch: Dict[str, torch.Tensor], regularizer: Optional[Regularizer] = None,
                micro_batch_size: Optional[int] = None,
                extra: Sequence[Tuple[Dict[str, torch.Tensor], Objective]] = ()
                ) -> Dict[str, float]:
        """One optimizer step of the trunk on a corpus batch: the LM loss, plus the regularizer
        with the head's current φ when ``regularizer`` is given, plus ``extra`` terms
        (``(batch, Reinforce(...))``, computed in their own forward-backward pass and added to
        the same gradient).

        Args:
            batch: ``inputs``/``targets``/``loss_mask`` ``[B, S]``, ``domain_ids`` ``[B]``.
        Returns:
            ``lm_loss``, ``loss``, ``grad_norm``, ``lr`` and, with the regularizer, ``penalty``,
            ``kl``, ``gated_share``, ``mean_z``, ``kl_by_domain`` (a list).
        """
        if self._trainable != "trunk":
            raise RuntimeError("lm_step before configure_training('trunk', ...)")
        return self._train_step([(batch, LMLoss(regularizer))] + list(extra), micro_batch_size)

    def nado_step(self, batch: Dict[str, torch.Tensor], alpha: float = 1.0,
                  micro_batch_size: Optional[int] = None) -> Dict[str, float]:
        """One optimizer step of the head on labelled samples (``nado_loss``; the trunk frozen).

        Args:
            batch: ``inputs``/``targets``/``loss_mask`` ``[B, T]`` and the sequence labels
                ``labels`` ``[B]`` (NaN = unlabelled).
        """
        if self._trainable != "head":
            raise RuntimeError("nado_step before configure_training('head', ...)")
        return self._train_step([(batch, NadoLoss(float(alpha)))], micro_batch_size)

    def _train_step(self, parts, micro_batch_size) -> Dict[str, float]:
        from nemo.collections.nlp.models.language_modeling import megatron_base_model

        self.module.train()
        self._optimizer.zero_grad()
        metrics: Dict[str, Any] = {}
        for batch, objective in parts:
            metrics.update(self._fwd_bwd(batch, objective, micro_batch_size or
                                         self.cfg.micro_batch_size))
        self._grad_reductions()
        clip = self.trainer.gradient_clip_val
        grad_norm = None
        if clip is not None and float(clip) > 0:
            if self.with_distributed_adam:
                from nemo.collections.nlp.modules.common.megatron.clip_grads import (
                    clip_grad_norm_distributed_optimizer,
                )
                grad_norm = clip_grad_norm_distributed_optimizer(self._optimizer, float(clip))
            else:
                params = (self._optimizer.get_parameters_with_grad() if self.megatron_amp_O2
                          else self.get_parameters_with_grad())
                # the module attribute: on CPU, cpu_compat replaces it (patch 7)
                grad_norm = megatron_base_model.clip_grad_norm_fp32(parameters=params,
                                                                    max_norm=float(clip))
        metrics["lr"] = float(self._optimizer.param_groups[0]["lr"])
        self._optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    def _grad_reductions(self) -> None:
        """NeMo's gradient reductions after the pipeline (NeMo-Aligner's ``grad_reductions``):
        data parallel (unless the distributed optimizer does it) and the first/last stage
        embeddings shared under pipeline parallelism."""
        if self.cfg.get("tensor_model_parallel_size", 1) > 1 and self.cfg.get("sequence_parallel", False):
            self.allreduce_sequence_parallel_gradients()
        if self.with_distributed_adam:
            self._optimizer._finish_bucket_grad_sync()
        elif self.megatron_amp_O2:
            if (self.cfg.get("pipeline_model_parallel_size", 1) > 1
                    or self.cfg.get("sequence_parallel", False)):
                self._optimizer.allreduce_main_grads()
        elif _dp()[1] > 1:
            self.allreduce_gradients()
        if (self.cfg.get("pipeline_model_parallel_size", 1) > 1
                and self.cfg.get("share_embeddings_and_output_weights", True)):
            self.allreduce_first_last_embeddings()

    # --- the reference (model.acft.reference: frozen | base) ---------------------------------

    def set_reference(self, trunk_path, head_path) -> None:
        """Load the reference q is built from (``Regularizer(reference=True)``): a trunk θ_ref
        and a head φ, each a part written by :meth:`save_part` (any layout, resharded), into a
        second, frozen copy of this rank's stage. It is built once, without initialising its
        weights, in the trunk's dtype, and holds no gradients or optimizer state: one model's
        weights more in memory (NeMo-Aligner's DPO keeps its reference the same way, or swaps
        it in from the CPU)."""
        if self._reference_module is None:
            import dataclasses

            cfg = self.transformer_config
            self.transformer_config = dataclasses.replace(cfg, perform_initialization=False)
            try:
                ref = self.model_provider_func(self.module.pre_process, self.module.post_process)
            finally:
                self.transformer_config = cfg
            dtype = next(p for n, p in self.module.named_parameters()
                         if not n.startswith(NADO_PREFIX)).dtype
            ref.to(self.device)
            for n, p in ref.named_parameters():
                p.requires_grad_(False)
                if not (n.startswith(NADO_PREFIX) and self.head_config.fp32):
                    p.data = p.data.to(dtype)
            ref.eval()
            self._reference_module = ref
        checkpoint.load(trunk_path, self._reference_module, "trunk")
        checkpoint.load(head_path, self._reference_module, "head")

    @property
    def reference_module(self) -> Optional[GPTNADOModel]:
        """This rank's stage of the reference (None before :meth:`set_reference`)."""
        return self._reference_module

    def _reference_outputs(self, micro, seq: int, mbs: int):
        """The reference's :class:`~nemo_acft.models.gpt_nado.ReferenceHidden` of every
        micro-batch, by a forward-only pass of its pipeline (held on the last stage until the
        training pass takes them: micro-batches × mbs × seq × 2h values)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            out = model(mb["inputs"], mb["position_ids"], None, return_hidden=True)
            return out, lambda output, non_loss_data=False: output

        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro),
                model=[self._reference_module], num_microbatches=len(micro), forward_only=True,
                seq_length=seq, micro_batch_size=mbs, collect_non_loss_data=True)

    # --- the forward-backward schedule ------------------------------------------------------

    def _fwd_bwd(self, batch, objective: Objective, micro_batch_size: int,
                 on_reference: bool = False):
        """Run ``objective`` (:mod:`nemo_acft.models.objectives`) on this DP rank's rows of
        ``batch`` through megatron's schedule: forward and backward, or forward only for an
        objective that collects (the per-token log-probabilities of this DP rank's rows,
        returned as they are). Returns the metrics, reduced over the world, on every rank.
        ``on_reference``: run a collecting objective on the reference instead.

        An objective that uses the reference gets its hidden states per micro-batch: at
        pipeline parallelism 1 from a no-grad forward of the reference inside the step (nothing
        held), otherwise from a forward-only pass of the reference's pipeline before it."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dp_rank, dp = _dp()
        rows = batch["inputs"].shape[0]
        if rows % dp:
            raise ValueError(f"a batch of {rows} rows does not split over data parallel {dp}")
        local = rows // dp
        mbs = min(int(micro_batch_size), local)
        if local % mbs:
            raise ValueError(f"{local} rows per data-parallel rank are not a multiple of the "
                             f"micro-batch size {mbs}")
        n_mb = local // mbs
        denom = objective.denominators(batch)
        device = self.device
        mine = {k: v[dp_rank * local:(dp_rank + 1) * local] for k, v in batch.items()
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows}
        seq = mine["inputs"].shape[1]
        positions = torch.arange(seq).expand(mbs, seq)
        micro = [{**{k: v[i * mbs:(i + 1) * mbs].to(device) for k, v in mine.items()},
                  "position_ids": positions.to(device)} for i in range(n_mb)]
        # the schedule divides each micro-batch's loss by n_mb; the DP reduction averages
        loss_fn = partial(objective.loss, denom=denom, scale=float(n_mb * dp), tp=tp_group(),
                          vocab_size=self.vocab_size)

        ref = self._reference_module
        if (objective.uses_reference or on_reference) and ref is None:
            raise RuntimeError("an objective with the reference before set_reference(...)")
        if on_reference and not objective.collect:
            raise ValueError("on_reference: only a collecting objective runs on the reference")
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        refs = (iter(self._reference_outputs(micro, seq, mbs))
                if objective.uses_reference and pp > 1 else None)

        def reference_of(mb):
            if not (objective.uses_reference and parallel_state.is_pipeline_last_stage()):
                return None
            if refs is not None:
                return next(refs)
            with torch.no_grad():
                return ref(mb["inputs"], mb["position_ids"], None, return_hidden=True)

        if objective.uses_shipped_q:
            missing = [k for k in SHIPPED_Q if k not in batch]
            if missing:
                raise KeyError(f"an LM step with the reference's q shipped "
                               f"(model.acft.reference_on=oracle): the batch lacks {missing}")

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            kwargs = {}
            if objective.uses_reference:
                kwargs["reference"] = reference_of(mb)
            elif objective.uses_shipped_q:
                kwargs["reference"] = SparseQ(*(mb[k] for k in SHIPPED_Q))
            out = model(mb["inputs"], mb["position_ids"], None,
                        labels=mb["targets"] if objective.with_labels else None, **kwargs)
            return out, lambda output, non_loss_data=False: loss_fn(mb, output)

        module = ref if on_reference else self.module
        module.head_enabled = objective.uses_head
        if objective.collect:
            module.eval()
        try:
            data = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro),
                model=[ref] if on_reference else self.model,
                num_microbatches=n_mb, forward_only=objective.collect, seq_length=seq,
                micro_batch_size=mbs, collect_non_loss_data=objective.collect)
        finally:
            module.head_enabled = True
        if objective.collect:
            return data
        return objective.finish(self._reduce_metrics(data, objective.names()))

    def _reduce_metrics(self, data: List[Dict[str, torch.Tensor]], names: List[str]):
        """Sum the micro-batches' partial means, over data parallel, and send them from the
        last pipeline stage to every stage."""
        import torch.distributed as dist

        if parallel_state.is_pipeline_last_stage():
            total = torch.stack([d["sums"] for d in data]).sum(0).to(self.device)
        else:
            total = torch.zeros(len(names), device=self.device)
        if _dp()[1] > 1:
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(total, parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return dict(zip(names, total.tolist()))

    # --- inference ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 guided: bool = False) -> Samples:
        """Sample continuations of token-id ``prompts`` (one batch) from p, or from
        ``q ∝ p·R^β`` when ``guided`` (β = ``params.guidance``): KV-cached, every TP rank draws
        the same tokens. Needs pipeline parallelism 1 (the oracle group's layout)."""
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("generate: pipeline_model_parallel_size="
                             f"{parallel_state.get_pipeline_model_parallel_world_size()}; "
                             "sampling runs at pipeline parallelism 1 (the oracle group's "
                             "layout: model.acft.oracle_group)")
        return generate(self.module, prompts, params, vocab_size=self.vocab_size,
                        guided=guided, tp_group=tp_group(), pad_id=self.pad_id)

    @torch.no_grad()
    def token_log_probs(self, tokens: torch.Tensor, guidance: Optional[float] = None,
                        micro_batch_size: Optional[int] = None, return_max: bool = False):
        """``log p(tokens[:, i+1] | tokens[:, :i+1])`` for every row and position, or
        ``log q_β`` with the head when ``guidance`` β is given; ``[B, T-1]`` fp32 on the CPU,
        on every rank. Padded ids have probability 0 (the sampler's distribution). With
        ``return_max`` also the largest log-probability of each position (a token is the greedy
        choice where its own equals it).

        Args:
            tokens: ``[B, T]`` int64 (what follows a row's end is the caller's to mask).
        """
        out = self._collect(tokens, LogProbs(guidance), 2, micro_batch_size)
        return (out[0], out[1]) if return_max else out[0]

    @torch.no_grad()
    def reference_q(self, tokens: torch.Tensor, top_k: int, micro_batch_size=None,
                    chunk_tokens: int = 256, loss_mask: Optional[torch.Tensor] = None
                    ) -> Dict[str, torch.Tensor]:
        """This model as the reference of an LM step (``model.acft.reference_on: oracle``): its
        q after every prefix ``tokens[:, :i+1]`` as :func:`~nemo_acft.nado.sparse.sparse_reference_q`
        (the ``top_k`` ids, their log q, the tail's log mass, log Z), on the CPU, keyed as an LM
        batch carries them (``q_ids`` ``[B, T-1, k]`` int32, ``q_log`` ``[B, T-1, k]``,
        ``q_log_rest`` and ``q_log_z`` ``[B, T-1]``, fp32). ``top_k`` at least the (padded)
        vocabulary: all of it, and the LM step's KL is the exact one. ``loss_mask``
        ``[B, T-1]``: q only where it is 1 (a placeholder elsewhere,
        :func:`~nemo_acft.models.objectives.placeholder_q`; the forward still reads every
        token)."""
        k = min(int(top_k), int(self.module.vocab_size))
        out = self._collect(tokens, ReferenceQ(k, int(chunk_tokens)), 2 * k + 2,
                            micro_batch_size, loss_mask=loss_mask)
        return {"q_ids": out[:k].round().to(torch.int32).permute(1, 2, 0).contiguous(),
                "q_log": out[k:2 * k].permute(1, 2, 0).contiguous(),
                "q_log_rest": out[2 * k].contiguous(), "q_log_z": out[2 * k + 1].contiguous()}

    @torch.no_grad()
    def distribution_stats(self, tokens: torch.Tensor, on_reference: bool = False,
                           micro_batch_size: Optional[int] = None) -> torch.Tensor:
        """``[3, B, T-1]`` fp32 on the CPU: ``H(p)``, ``H(q)`` and ``log Z`` after every prefix
        ``tokens[:, :i+1]``, by this model or by the reference (:meth:`set_reference`): the
        collapse diagnostics."""
        return self._collect(tokens, DistributionStats(), 3, micro_batch_size, on_reference)

    def _collect(self, tokens, objective: Objective, k: int, micro_batch_size=None,
                 on_reference: bool = False, loss_mask=None) -> torch.Tensor:
        """A collecting objective's ``k`` values per position of ``tokens`` ``[B, T]``, as
        ``[k, B, T-1]`` on the CPU, on every rank (``loss_mask`` ``[B, T-1]``, if given, goes
        to the objective with the batch; padding rows and positions get 0)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        rows, width = tokens.shape
        dp_rank, dp = _dp()
        mbs = int(micro_batch_size or self.cfg.micro_batch_size)
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        seq = width - 1
        if pp > 1:  # the pipeline's messages have one shape: pad to the model's sequence
            seq = max(seq, int(self.cfg.encoder_seq_length))
        per_rank = max(1, math.ceil(rows / dp))
        mbs = min(mbs, per_rank)
        per_rank = math.ceil(per_rank / mbs) * mbs
        padded = torch.full((per_rank * dp, seq + 1), self.pad_id, dtype=torch.long)
        padded[:rows, :width] = tokens
        batch = {"inputs": padded[:, :-1], "targets": padded[:, 1:].contiguous()}
        if loss_mask is not None:
            if tuple(loss_mask.shape) != (rows, width - 1):
                raise ValueError(f"loss_mask {tuple(loss_mask.shape)}: expected "
                                 f"{(rows, width - 1)} for tokens {(rows, width)}")
            batch["loss_mask"] = torch.zeros(per_rank * dp, seq)
            batch["loss_mask"][:rows, :width - 1] = loss_mask
        data = self._fwd_bwd(batch, objective, mbs, on_reference)
        out = torch.zeros(k, per_rank, seq, device=self.device)
        if parallel_state.is_pipeline_last_stage():
            out = torch.cat(list(data), dim=1).to(self.device)
        import torch.distributed as dist

        if pp > 1:
            dist.broadcast(out, parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        if dp > 1:
            parts = [torch.empty_like(out) for _ in range(dp)]
            dist.all_gather(parts, out.contiguous(), group=parallel_state.get_data_parallel_group())
            out = torch.cat(parts, dim=1)
        return out[:, :rows, :width - 1].cpu()

    # --- θ and φ ----------------------------------------------------------------------------

    def save_part(self, path, part: str, with_optimizer: bool = False,
                  common: Optional[Dict[str, Any]] = None) -> None:
        """Write θ (``part="trunk"``) or φ (``"head"``) as a distributed checkpoint, with the
        optimizer and scheduler state of :meth:`configure_training` if ``with_optimizer``."""
        checkpoint.save(path, self.module, part,
                        self._optimizer if with_optimizer else None,
                        self.scheduler if with_optimizer else None, common)

    def load_part(self, path, part: str, with_optimizer: bool = False) -> Dict[str, Any]:
        """Read a part written by :meth:`save_part` in any layout (resharded); returns its
        ``common`` dict."""
        return checkpoint.load(path, self.module, part,
                               self._optimizer if with_optimizer else None,
                               self.scheduler if with_optimizer else None)


__all__ = ["MegatronGPTACFTModel", "Regularizer", "Reinforce", "LMLoss", "NadoLoss", "LogProbs",
           "check_versions", "REQUIRED"]
