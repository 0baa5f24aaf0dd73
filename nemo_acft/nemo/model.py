"""``MegatronGPTACFTModel``: NeMo's ``MegatronGPTModel`` with the NADO head and the KL term.

Following NeMo-Aligner's reward model, only two hooks change:

- ``model_provider_func`` builds :class:`~nemo_acft.models.GPTNADOModel` (the GPT trunk exactly as
  NeMo builds it, plus the NADO head on the last pipeline stage);
- ``loss_func`` receives the last stage's :class:`~nemo_acft.models.gpt_nado.TokenLosses`
  (per-token LM loss, closed-form KL on the vocab-parallel logits, log Z) inside Megatron's
  forward-backward schedule and returns ``L_LM + λ · mean gated KL``.

Everything else (data, optimizer, schedules, checkpointing, ``.nemo``) is NeMo's.

Config: ``model.acft`` with ``lambda``, ``domains`` (names; a sequence's domain id indexes this
list), ``domain_lambdas`` (name → λ, the others get ``lambda``), ``delta`` (feasibility gate, null
= off), ``min_z`` (infeasible-prefix gate, 0 = off), ``nado`` (``num_layers``, ``fp32``), ``data``
(optional domain-tagged JSONL in place of NeMo's datasets: ``train_path``, ``validation_path``,
``text_key``, ``domain_key``), ``mode`` (``lm`` | ``nado``), ``alpha`` and ``samples_path`` (NADO
mode). Batches without ``domain_ids`` (NeMo's own datasets) are domain 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import json
from collections import deque

import torch
from megatron.core import parallel_state
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import (
    MegatronGPTModel,
    get_specs,
    mcore_model_customize,
)
from nemo.collections.nlp.modules.common.megatron.utils import (
    average_losses_across_data_parallel_group,
)
from omegaconf import DictConfig

from nemo_acft.models.config import NADOHeadConfig
from nemo_acft.models.gpt_nado import GPTNADOModel, TokenLosses
from nemo_acft.models.parallel import tp_group
from nemo_acft.nado import kl_penalty, nado_loss

ACFT_KEYS = {"lambda", "domains", "domain_lambdas", "delta", "min_z", "nado", "mode", "alpha",
             "samples_path", "data"}
DATA_KEYS = {"train_path", "validation_path", "text_key", "domain_key"}
MODES = ("lm", "nado")


def acft_settings(cfg: DictConfig) -> Dict:
    """``model.acft`` with defaults; an unknown key or a bad value is a ValueError naming it."""
    acft = dict(cfg.get("acft") or {})
    unknown = sorted(set(acft) - ACFT_KEYS)
    if unknown:
        raise ValueError(f"model.acft.{unknown[0]}: unknown key; known: {sorted(ACFT_KEYS)}")
    out = {"lambda": float(acft.get("lambda", 1.0)), "delta": acft.get("delta"),
           "min_z": float(acft.get("min_z", 0.0)), "nado": dict(acft.get("nado") or {}),
           "mode": acft.get("mode", "lm"), "alpha": float(acft.get("alpha", 1.0)),
           "samples_path": acft.get("samples_path"),
           "domains": [str(d) for d in (acft.get("domains") or ["default"])],
           "domain_lambdas": {str(k): float(v) for k, v in dict(acft.get("domain_lambdas") or {}).items()},
           "data": dict(acft.get("data") or {})}
    if len(set(out["domains"])) != len(out["domains"]):
        raise ValueError(f"model.acft.domains={out['domains']}: names must be unique")
    for name, lam in out["domain_lambdas"].items():
        if name not in out["domains"]:
            raise ValueError(f"model.acft.domain_lambdas.{name}: not a domain; "
                             f"model.acft.domains={out['domains']}")
        if lam < 0:
            raise ValueError(f"model.acft.domain_lambdas.{name}={lam}: expected >= 0")
    if out["data"]:
        unknown = sorted(set(out["data"]) - DATA_KEYS)
        if unknown:
            raise ValueError(f"model.acft.data.{unknown[0]}: unknown key; known: {sorted(DATA_KEYS)}")
        for key in ("train_path", "validation_path"):
            path = out["data"].get(key)
            if key == "train_path" or path is not None:
                if not path or not Path(path).is_file():
                    raise ValueError(f"model.acft.data.{key}={path!r}: no such JSONL file")
    if out["mode"] not in MODES:
        raise ValueError(f"model.acft.mode={out['mode']!r}: expected one of {MODES}")
    if out["mode"] == "nado":
        path = out["samples_path"]
        if not path or not Path(path).is_file():
            raise ValueError(f"model.acft.samples_path={path!r}: NADO mode needs an existing "
                             "samples file (samples.pt of an oracle block)")
    if out["lambda"] < 0:
        raise ValueError(f"model.acft.lambda={out['lambda']}: expected >= 0")
    if out["delta"] is not None and not 0 < float(out["delta"]) <= 1:
        raise ValueError(f"model.acft.delta={out['delta']}: expected null or a value in (0, 1]")
    try:
        NADOHeadConfig(**out["nado"])
    except TypeError as e:
        raise ValueError(f"model.acft.nado: {e}") from None
    return out


def validate_config(cfg: DictConfig, world_size: int) -> Dict:
    """Check ``model`` before any process group is built: ``model.acft``, ``mcore_gpt``, and
    that TP divides the heads and the FFN width, PP the layers, TP·PP the world size (each a
    ValueError naming the value). NeMo pads the vocabulary to a multiple of
    ``make_vocab_size_divisible_by · TP`` itself. Returns the ACFT settings."""
    from nemo_acft.models.config import GPTConfig

    if not cfg.get("mcore_gpt", False):
        raise ValueError("model.mcore_gpt=False: MegatronGPTACFTModel needs the megatron-core "
                         "GPT (set model.mcore_gpt=True)")
    settings = acft_settings(cfg)
    shape = GPTConfig(vocab_size=1, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                      num_attention_heads=cfg.num_attention_heads,
                      ffn_hidden_size=cfg.get("ffn_hidden_size"),
                      make_vocab_size_divisible_by=cfg.get("make_vocab_size_divisible_by", 128))
    shape.check_parallel(cfg.get("tensor_model_parallel_size", 1),
                         cfg.get("pipeline_model_parallel_size", 1), world_size)
    return settings


class MegatronGPTACFTModel(MegatronGPTModel):
    """``MegatronGPTModel`` + NADO head + λ · closed-form KL (see the module docstring)."""

    def __init__(self, cfg: DictConfig, trainer):
        self.acft = validate_config(cfg, trainer.world_size)
        #: per-micro-batch metrics of the current step (lm_loss, kl, penalty, gated_share, mean_z)
        self.acft_metrics: List[Dict[str, float]] = []
        #: one entry per training step: the step's mean metrics and NeMo's reduced loss
        self.acft_history: List[Dict[str, float]] = []
        #: domain ids of the micro-batches fetched on the last stage, consumed by ``loss_func``
        self._domain_queue: deque = deque()
        lambdas = [self.acft["domain_lambdas"].get(d, self.acft["lambda"])
                   for d in self.acft["domains"]]
        self._domain_lambdas = torch.tensor(lambdas, dtype=torch.float32)
        super().__init__(cfg, trainer)
        if self.acft["mode"] == "nado":  # the sampling/NADO group: only the head trains
            for module in self.get_model_module_list():
                for name, param in module.named_parameters():
                    param.requires_grad_(name.startswith("nado_head."))

    def model_provider_func(self, pre_process, post_process):
        """The trunk exactly as ``MegatronGPTModel`` builds it, as a ``GPTNADOModel``."""
        cfg = self.cfg
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
            nado=NADOHeadConfig(**self.acft["nado"]),
        )
        mcore_model_customize(cfg, model)
        return model

    def loss_func(self, loss_mask, num_valid_tokens_in_ub, output_tensor):
        """``L_LM + λ · mean_i gate_i KL_i`` for one micro-batch (last pipeline stage).

        The LM term is normalised as NeMo's (sum over masked tokens / valid tokens); the KL term
        is :func:`kl_penalty` with the micro-batch's domain ids (fetched by :meth:`get_batch`) and
        the per-domain λ. Metrics, reduced over data parallel: lm_loss, penalty, kl, gated_share,
        mean_z (mean R of the prefixes) and ``kl/<domain>`` (token-weighted, over the domains
        present in the step).
        """
        if not isinstance(output_tensor, TokenLosses):
            return super().loss_func(loss_mask, num_valid_tokens_in_ub, output_tensor)
        mask = loss_mask.float().view_as(output_tensor.lm_loss)
        lm_loss = (output_tensor.lm_loss.float() * mask).sum() / num_valid_tokens_in_ub
        domain_ids = (self._domain_queue.popleft() if self._domain_queue
                      else torch.zeros(mask.shape[0], dtype=torch.long))
        domain_ids = domain_ids.to(mask.device).long().view(-1)
        penalty, parts = kl_penalty(output_tensor.kl, output_tensor.log_z, mask, domain_ids,
                                    self._domain_lambdas.to(mask.device), self.acft["delta"],
                                    self.acft["min_z"])
        onehot = torch.nn.functional.one_hot(domain_ids, len(self.acft["domains"])).float()
        kl_sums = onehot.t() @ (output_tensor.kl.float().detach() * mask).sum(-1)
        token_counts = onehot.t() @ mask.sum(-1)
        reduced = average_losses_across_data_parallel_group(
            [lm_loss.detach(), penalty.detach(), parts["kl"], parts["gated_share"],
             parts["mean_z"], *kl_sums, *token_counts])
        values = reduced.tolist()
        metrics = dict(zip(("lm_loss", "penalty", "kl", "gated_share", "mean_z"), values[:5]))
        n = len(self.acft["domains"])
        for name, kl_sum, count in zip(self.acft["domains"], values[5:5 + n], values[5 + n:]):
            metrics[f"kl_sum/{name}"], metrics[f"tokens/{name}"] = kl_sum, count
        self.acft_metrics.append(metrics)
        return lm_loss + penalty

    def get_batch(self, data_iterator, tuning):
        """NeMo's batch; a batch's ``domain_ids`` (domain-tagged data) are queued for
        :meth:`loss_func` on the last pipeline stage."""
        if data_iterator is None:
            return super().get_batch(data_iterator, tuning)
        peeked = next(data_iterator)
        data = peeked[0] if isinstance(peeked, tuple) else peeked
        if parallel_state.is_pipeline_last_stage() and isinstance(data, dict):
            ids = data.get("domain_ids")
            self._domain_queue.append(ids if ids is not None
                                      else torch.zeros(data["tokens"].shape[0], dtype=torch.long))
        return super().get_batch(iter([peeked]), tuning)

    # --- NADO-training mode -------------------------------------------------------------

    def build_train_valid_test_datasets(self):
        """NADO mode: the labelled samples of ``model.acft.samples_path`` (train and
        validation); LM mode: ``model.acft.data`` (domain-tagged JSONL) when set, else NeMo's
        datasets."""
        if self.acft["mode"] != "nado" and self.acft["data"]:
            data = self.acft["data"]
            seq = int(self.cfg.encoder_seq_length)
            kwargs = dict(tokenizer=self.tokenizer, seq_length=seq, domains=self.acft["domains"],
                          text_key=data.get("text_key", "text"),
                          domain_key=data.get("domain_key", "domain"))
            self._train_ds = DomainTextDataset(data["train_path"], **kwargs)
            val = data.get("validation_path")
            self._validation_ds = DomainTextDataset(val, **kwargs) if val else self._train_ds
            self._test_ds = None
            return self._train_ds, self._validation_ds, self._test_ds
        if self.acft["mode"] != "nado":
            return super().build_train_valid_test_datasets()
        self._train_ds = LabelledSamplesDataset(self.acft["samples_path"])
        self._validation_ds = self._train_ds
        self._test_ds = None
        return self._train_ds, self._validation_ds, self._test_ds

    def get_forward_output_and_loss_func(self, validation_step=False, tuning=False):
        """NADO mode: ``nado_loss`` on the last stage's (LM, NADO) logits, the LM logits
        detached; LM mode: NeMo's function (whose ``loss_func`` hook is :meth:`loss_func`)."""
        if self.acft["mode"] != "nado":
            return super().get_forward_output_and_loss_func(validation_step, tuning)
        alpha = self.acft["alpha"]

        def fwd_output_and_loss_func(dataloader_iter, model, checkpoint_activations_all_layers=None):
            batch = next(dataloader_iter)
            if isinstance(batch, tuple):
                batch = batch[0]
            output = model(batch["tokens"], batch["position_ids"], None)

            def loss_func(output_tensor):
                lm_logits, nado_logits = output_tensor
                loss, parts = nado_loss(lm_logits.detach(), nado_logits, batch["labels"],
                                        batch["seq_label"], batch["loss_mask"], alpha=alpha,
                                        tp_group=tp_group())
                reduced = average_losses_across_data_parallel_group(
                    [loss.detach(), parts["ce"], parts["cons"]])
                self.acft_metrics.append({"nado_loss": float(reduced[0]),
                                          "nado_ce": float(reduced[1]),
                                          "nado_cons": float(reduced[2])})
                return loss, {"avg": reduced[:1]}

            return output, loss_func

        return fwd_output_and_loss_func

    def on_load_checkpoint(self, checkpoint) -> None:
        """Restore: a checkpoint with the head loads as NeMo loads it; a plain GPT checkpoint
        (no ``nado_head.`` weights) loads into the trunk, the head keeps its fresh zeros (R = 1/2,
        q = p), and any other mismatch is an error naming the keys."""
        state = checkpoint.get("state_dict") or {}
        if state and not any(k.startswith("model.nado_head.") for k in state):
            if len(self.get_model_module_list()) != 1:
                raise ValueError("restoring a plain GPT .nemo with virtual pipeline stages is not "
                                 "supported")
            trunk = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            self.get_model_module_list()[0].load_base_state_dict(trunk)
            self.acft_restored_base_only = True
            return
        self.acft_restored_base_only = False
        super().on_load_checkpoint(checkpoint)

    def training_step(self, dataloader_iter):
        """NeMo's step, then the ACFT metrics (mean over micro-batches, reduced over data
        parallel) logged on the last pipeline stage."""
        self.acft_metrics = []
        self._domain_queue.clear()
        loss = super().training_step(dataloader_iter)
        if self.acft_metrics and parallel_state.is_pipeline_last_stage():
            means = {key: sum(m[key] for m in self.acft_metrics) / len(self.acft_metrics)
                     for key in self.acft_metrics[0] if "/" not in key}
            for name in self.acft["domains"]:
                tokens = sum(m.get(f"tokens/{name}", 0.0) for m in self.acft_metrics)
                if tokens > 0:  # token-weighted mean KL of the domain over the step
                    means[f"kl/{name}"] = sum(m[f"kl_sum/{name}"]
                                              for m in self.acft_metrics) / tokens
            for key, value in means.items():
                self.log(f"acft/{key}", value, prog_bar=key == "kl", rank_zero_only=True,
                         batch_size=1)
            self.acft_history.append({**means, "loss": float(loss)})
        return loss


class LabelledSamplesDataset(torch.utils.data.Dataset):
    """The oracle block's ``samples.pt`` (tokens, prompt_lengths, lengths, labels) as NADO
    training examples: inputs, next-token targets, the generated positions as loss mask, and
    the sequence label (NaN = unlabelled, masked by ``nado_loss``)."""

    def __init__(self, path: str):
        from nemo_acft.sampling import Samples
        from nemo_acft.training.blocks import nado_targets

        data = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("tokens", "prompt_lengths", "lengths", "labels") if k not in data]
        if missing:
            raise ValueError(f"{path}: samples file without {missing}")
        samples = Samples(tokens=data["tokens"], prompt_lengths=data["prompt_lengths"],
                          lengths=data["lengths"], logprobs=torch.zeros(0))
        self.inputs, self.targets, self.mask = nado_targets(samples)
        self.labels = data["labels"].float()

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"tokens": self.inputs[i], "labels": self.targets[i], "loss_mask": self.mask[i],
                "position_ids": torch.arange(self.inputs.shape[1]),
                "seq_label": self.labels[i]}


class DomainTextDataset(torch.utils.data.Dataset):
    """Domain-tagged JSONL (one object per line with a text and a domain field) as GPT training
    examples of ``seq_length`` tokens: the text's ids and EOS, truncated, padded with EOS and
    masked there; ``domain_ids`` index ``domains``. A bad line is a ValueError naming the file,
    the line and the field."""

    def __init__(self, path, tokenizer, seq_length: int, domains: List[str],
                 text_key: str = "text", domain_key: str = "domain"):
        index = {name: i for i, name in enumerate(domains)}
        eos = tokenizer.eos_id
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        n = len(lines)
        self.tokens = torch.full((n, seq_length + 1), eos, dtype=torch.long)
        self.mask = torch.zeros((n, seq_length))
        self.domain_ids = torch.zeros(n, dtype=torch.long)
        rows = 0
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            text, domain = record.get(text_key), record.get(domain_key)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{line_no}: field {text_key!r} must be a non-empty "
                                 "string")
            if domain not in index:
                raise ValueError(f"{path}:{line_no}: {domain_key}={domain!r} is not one of "
                                 f"model.acft.domains={domains}")
            ids = (list(tokenizer.text_to_ids(text)) + [eos])[:seq_length + 1]
            self.tokens[rows, :len(ids)] = torch.tensor(ids)
            self.mask[rows, :len(ids) - 1] = 1.0
            self.domain_ids[rows] = index[domain]
            rows += 1
        if rows == 0:
            raise ValueError(f"{path}: no records")
        self.tokens, self.mask, self.domain_ids = (self.tokens[:rows], self.mask[:rows],
                                                   self.domain_ids[:rows])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        seq = self.mask.shape[1]
        return {"tokens": self.tokens[i, :-1], "labels": self.tokens[i, 1:],
                "loss_mask": self.mask[i], "position_ids": torch.arange(seq),
                "domain_ids": self.domain_ids[i]}
