"""What one forward(-backward) pass of :class:`~nemo_acft.models.acft_model.MegatronGPTACFTModel`
computes, one class per objective: what the forward needs (the head, the labels), the token
counts of the *global* batch that normalise every micro-batch's loss, the loss of one
micro-batch on the last pipeline stage, and its metrics as additive partial means.

Normalising by the global batch makes the micro-batches' and the data-parallel ranks' losses add
up to the batch's, so a step is the same at any data-parallel and micro-batch size (up to
summation order); ``scale`` undoes megatron's ``1/num_microbatches`` and the data-parallel
average of the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from nemo_acft.models.gpt_nado import TokenLosses
from nemo_acft.nado import distribution_stats, kl_penalty, nado_loss, token_log_probs


@dataclass
class Regularizer:
    """``Σ_d λ_d · mean_{i∈d} gate_i · KL_i`` (:func:`~nemo_acft.nado.kl_penalty`): one λ per
    domain id of the batch (``lambdas[d]``), the feasibility gate δ and the ``min_z`` gate.
    ``reference``: q from the model's reference (``set_reference``: a frozen θ and the head on
    its hidden states) instead of from the model being trained; ``shipped``: that q computed
    elsewhere and given with the batch (``q_ids``, ``q_log``, ``q_log_rest``, ``q_log_z``: a
    :class:`~nemo_acft.nado.sparse.SparseQ`, ``model.acft.reference_on: oracle``)."""

    lambdas: torch.Tensor
    delta: Optional[float] = None
    min_z: float = 0.0
    reference: bool = False
    shipped: bool = False


class Objective:
    """The interface (see the module docstring); subclasses are dataclasses."""

    #: the forward runs the NADO head / gets the labels (per-token losses) / only collects /
    #: needs the reference's hidden states / reads the reference's q from the batch
    uses_head = True
    with_labels = False
    collect = False
    uses_reference = False
    uses_shipped_q = False

    def denominators(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Token (or sample) counts of the whole global batch."""
        return {"tokens": batch["loss_mask"].float().sum()}

    def names(self) -> List[str]:  # noqa: D102
        raise NotImplementedError

    def loss(self, mb, output, denom, scale: float, tp, vocab_size: int):
        """``(loss × scale, {"sums": metrics})`` of one micro-batch (the last stage's output)."""
        raise NotImplementedError

    def finish(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """Derived metrics, after the reduction over the world."""
        return metrics


@dataclass
class LMLoss(Objective):
    """The LM loss (the trunk trains), plus the regularizer with the head's φ when given.

    ``lm_weight`` scales the LM loss (0: the regularizer alone, e.g. on the oracle block's
    samples, ``model.acft.kl_on``); ``prefix`` names the metrics of a second term of a step."""

    regularizer: Optional[Regularizer] = None
    lm_weight: float = 1.0
    prefix: str = ""
    with_labels = True

    @property
    def uses_head(self) -> bool:  # noqa: D102
        return self.regularizer is not None and not self.regularizer.reference

    @property
    def uses_reference(self) -> bool:  # noqa: D102
        r = self.regularizer
        return r is not None and r.reference and not r.shipped

    @property
    def uses_shipped_q(self) -> bool:  # noqa: D102
        r = self.regularizer
        return r is not None and r.reference and r.shipped

    def denominators(self, batch):  # noqa: D102
        out = super().denominators(batch)
        if self.regularizer is not None:
            d = self.regularizer.lambdas.numel()
            onehot = torch.nn.functional.one_hot(batch["domain_ids"].long(), d).float()
            out["domain_tokens"] = onehot.t() @ batch["loss_mask"].float().sum(-1)
        return out

    def names(self):  # noqa: D102
        if self.regularizer is None:
            return [self.prefix + "lm_loss"]
        return [self.prefix + n for n in (
            ["lm_loss", "penalty", "kl", "gated_share", "mean_z"]
            + [f"kl_by_domain.{i}" for i in range(self.regularizer.lambdas.numel())])]

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        assert isinstance(output, TokenLosses), type(output)
        mask = mb["loss_mask"].float()
        lm = (output.lm_loss.float() * mask).sum() / denom["tokens"].to(mask.device).clamp_min(1)
        r = self.regularizer
        if r is None:
            return self.lm_weight * lm * scale, {"sums": lm.detach().view(1)}
        penalty, parts = kl_penalty(output.kl, output.log_z, mask, mb["domain_ids"].long(),
                                    r.lambdas.to(mask.device), r.delta, r.min_z,
                                    domain_tokens=denom["domain_tokens"].to(mask.device))
        sums = torch.cat([torch.stack([lm.detach(), penalty.detach(), parts["kl"],
                                       parts["gated_share"], parts["mean_z"]]).float(),
                          parts["kl_by_domain"].float()])
        return (self.lm_weight * lm + penalty) * scale, {"sums": sums}

    def finish(self, metrics):  # noqa: D102
        x = self.prefix
        if self.regularizer is None:
            return {**metrics, x + "loss": self.lm_weight * metrics[x + "lm_loss"]}
        d = self.regularizer.lambdas.numel()
        by_domain = [metrics.pop(f"{x}kl_by_domain.{i}") for i in range(d)]
        return {**metrics, x + "kl_by_domain": by_domain,
                x + "loss": self.lm_weight * metrics[x + "lm_loss"] + metrics[x + "penalty"]}


@dataclass
class NadoLoss(Objective):
    """``nado_loss`` on labelled samples (the head trains; the trunk's logits detached)."""

    alpha: float = 1.0

    def denominators(self, batch):  # noqa: D102
        labelled = torch.isfinite(batch["labels"].float()).float().unsqueeze(-1)
        return {"tokens": (batch["loss_mask"].float() * labelled).sum()}

    def names(self):  # noqa: D102
        return ["nado_loss", "nado_ce", "nado_cons"]

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        z, s = output
        loss, parts = nado_loss(z.detach(), s, mb["targets"], mb["labels"], mb["loss_mask"],
                                alpha=self.alpha, tp_group=tp,
                                num_tokens=denom["tokens"].to(z.device))
        return loss * scale, {"sums": torch.stack([loss.detach(), parts["ce"],
                                                   parts["cons"]]).float()}


@dataclass
class Reinforce(Objective):
    """The RL baseline's extra loss term on sampled continuations:
    ``coef · −(1/n) Σ_i A_i · Σ_t log p(y_i,t) / max_new_tokens`` over the n scored samples
    (the batch's ``advantages`` and ``rewards``, NaN = unscored; ``loss_mask`` marks the
    generated tokens). ``rl_loss`` is the term before ``coef``."""

    coef: float
    max_new_tokens: int
    uses_head = False

    def denominators(self, batch):  # noqa: D102
        return {"scored": torch.isfinite(batch["rewards"].float()).sum().float()}

    def names(self):  # noqa: D102
        return ["rl_loss"]

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        lp = token_log_probs(output[0], mb["targets"], tp, vocab_size=vocab_size)
        seq_lp = (lp * mb["loss_mask"].to(lp.dtype)).sum(-1)
        n = denom["scored"].to(lp.device).clamp_min(1.0)
        rl = -(mb["advantages"].to(lp.dtype) * seq_lp).sum() / (n * self.max_new_tokens)
        return self.coef * rl * scale, {"sums": rl.detach().float().view(1)}


@dataclass
class LogProbs(Objective):
    """Forward only: each target token's log-probability under p (``guidance`` None) or
    ``q_β`` (with the head), and the largest of its position; collected, not reduced."""

    guidance: Optional[float] = None
    collect = True

    @property
    def uses_head(self) -> bool:  # noqa: D102
        return self.guidance is not None

    def denominators(self, batch):  # noqa: D102
        return {}

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        z, s = output
        lp, top = token_log_probs(z, mb["targets"], tp, nado_logits=s if self.uses_head else None,
                                  guidance=1.0 if self.guidance is None else self.guidance,
                                  vocab_size=vocab_size, return_max=True)
        return torch.stack([lp.float(), top.float()])


@dataclass
class ReferenceQ(Objective):
    """Forward only, with the head, on the reference itself: its q at every position as
    :func:`~nemo_acft.nado.sparse.sparse_reference_q`'s top ``top_k`` ids, their log q, the
    tail's log mass and log Z, collected as ``[2·top_k + 2, b, s]`` fp32 (ids as floats:
    exact below 2^24, checked). With a ``loss_mask`` in the micro-batch, q is computed only
    where it is 1 (the positions an LM step's loss counts); elsewhere a placeholder,
    :func:`placeholder_q`."""

    top_k: int
    chunk_tokens: int = 256
    collect = True

    def denominators(self, batch):  # noqa: D102
        return {}

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        from nemo_acft.nado.sparse import sparse_reference_q
        from nemo_acft.nado.vocab_parallel import tp_world_size

        z, s = output
        if z.shape[-1] * tp_world_size(tp) >= 2 ** 24:
            raise ValueError(f"a vocabulary of {z.shape[-1]} per rank: ids past 2^24 are not "
                             f"exact as fp32")
        b, n, v = z.shape
        zf, sf = z.reshape(b * n, v), s.reshape(b * n, v)
        keep = None
        if "loss_mask" in mb:  # the same on every rank of the TP group: the same rows
            keep = (mb["loss_mask"].reshape(-1) > 0).nonzero().squeeze(-1)
            if keep.numel() == b * n:  # every position counts: no copy
                keep = None
            else:
                zf, sf = zf[keep], sf[keep]
        parts = []
        for i in range(0, zf.shape[0], max(self.chunk_tokens, 1)):
            j = min(i + max(self.chunk_tokens, 1), zf.shape[0])
            q = sparse_reference_q(zf[i:j], sf[i:j], self.top_k, tp)
            parts.append(torch.cat([q.ids.float(), q.log_q, q.log_rest[:, None],
                                    q.log_z[:, None]], dim=-1))
        out = torch.cat(parts) if parts else placeholder_q(self.top_k, 0, z.device)
        if keep is not None:
            out = placeholder_q(self.top_k, b * n, z.device).index_copy_(0, keep, out)
        return out.view(b, n, -1).permute(2, 0, 1)


def placeholder_q(top_k: int, rows: int, device=None) -> torch.Tensor:
    """``[rows, 2·top_k + 2]`` rows of :class:`ReferenceQ`'s layout for positions no loss
    counts: all of q on id 0 (ids ``0..top_k−1``, log q ``[0, −inf, …]``), no tail, Z = 1. A
    valid q, so the LM step's KL there is finite (−log p of id 0), and the loss mask zeroes it
    and its gradient."""
    row = torch.full((2 * top_k + 2,), float("-inf"), device=device)
    row[:top_k] = torch.arange(top_k, dtype=torch.float32, device=device)
    row[top_k] = 0.0
    row[-1] = 0.0
    return row.expand(rows, -1).clone()


@dataclass
class DistributionStats(Objective):
    """Forward only, with the head: ``H(p)``, ``H(q)`` and ``log Z`` of every position
    (:func:`~nemo_acft.nado.distribution_stats`); collected, not reduced."""

    collect = True

    def denominators(self, batch):  # noqa: D102
        return {}

    def loss(self, mb, output, denom, scale, tp, vocab_size):  # noqa: D102
        z, s = output
        return torch.stack([x.float() for x in distribution_stats(z, s, tp, vocab_size)])


__all__ = ["Objective", "Regularizer", "LMLoss", "NadoLoss", "Reinforce", "LogProbs", "ReferenceQ",
           "DistributionStats"]
