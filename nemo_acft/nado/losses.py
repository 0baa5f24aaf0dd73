"""The method's math: guided distribution q, closed-form KL(q || p), and the NADO training loss.

Notation (METHOD.md): ``z`` are the LM logits, ``s`` the NADO logits, both ``[..., V]`` over the
next token, with ``R(x_<=i ∘ v) = σ(s_i[v])``. The guided (constraint-projected) distribution is

    log q_i = log_softmax(z_i + logσ(s_i)),     Z_i = Σ_v p_i(v) σ(s_i[v]).

All tensors named ``*_logits`` may be vocab-parallel: the last dimension is this rank's shard of
the vocabulary and every normaliser is reduced over ``tp_group`` (see :mod:`.vocab_parallel`).
Computation is in fp32 for fp16/bf16/fp32 inputs (fp64 stays fp64); results are in that dtype.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from nemo_acft.nado.vocab_parallel import (
    ProcessGroup,
    mask_padded_vocab,
    vocab_log_softmax,
    vocab_logsumexp,
    vocab_max,
    vocab_select,
    vocab_sum,
)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the accumulation dtype: at least fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shifted_log_sigmoid(nado_logits: torch.Tensor, tp_group: ProcessGroup):
    """``logσ(s) − max_v logσ(s)`` and the shift ``[..., 1]``.

    The shift cancels in q and in the KL, and keeps ``z + logσ(s)`` at the magnitude of z: with
    R ≈ 0 everywhere (s ≈ −1e4) an unshifted sum would drop z's low digits in fp32.
    """
    log_r = F.logsigmoid(_acc(nado_logits))
    shift = vocab_max(log_r, tp_group)
    return log_r - shift, shift


def guided_log_probs(
    lm_logits: torch.Tensor, nado_logits: torch.Tensor, tp_group: ProcessGroup = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``log q = log_softmax(z + β·logσ(s))``: NADO-guided next-token log-probabilities.

    ``scale`` β = 1 is METHOD.md's q ∝ p·R; other values give ``q_β ∝ p·R^β``, a guidance
    strength for NADO decoding (β → 0 recovers p). Differentiable in both arguments (plain
    autograd through the vocab-parallel reductions).

    Args:
        lm_logits: ``[..., V_local]``, vocab-parallel LM logits ``z``.
        nado_logits: ``[..., V_local]``, vocab-parallel NADO logits ``s``.
        tp_group: tensor-parallel group the vocabulary is split over; None = not split.
        scale: the guidance strength β ≥ 0.
    Returns:
        ``[..., V_local]`` (fp32 or fp64), this rank's shard of ``log q``.
    """
    return vocab_log_softmax(_guided_logits(lm_logits, nado_logits, tp_group, scale), tp_group)


def _guided_logits(lm_logits, nado_logits, tp_group, scale):
    """``z + β·(logσ(s) − max logσ(s))`` in the accumulation dtype (unnormalised log q_β)."""
    if not scale >= 0:
        raise ValueError(f"guidance scale={scale}: expected a number >= 0")
    log_r = _shifted_log_sigmoid(nado_logits, tp_group)[0]
    return _acc(lm_logits) + (log_r if scale == 1.0 else scale * log_r)


def token_log_probs(lm_logits: torch.Tensor, targets: torch.Tensor,
                    tp_group: ProcessGroup = None, nado_logits: Optional[torch.Tensor] = None,
                    guidance: float = 1.0, vocab_size: Optional[int] = None,
                    return_max: bool = False):
    """``log p(y_i | x_<=i)`` of each target token, or ``log q_β(y_i | x_<=i)`` with NADO
    logits: the one per-token log-probability of the package (perplexity, the RL baseline's
    policy gradient, the zero-shot probe and the harness go through it). Differentiable.

    Args:
        lm_logits: ``[..., V_local]``, vocab-parallel LM logits ``z``.
        targets: ``[...]`` int64 ids of the full vocabulary.
        tp_group: tensor-parallel group; None = vocabulary not split.
        nado_logits: ``[..., V_local]`` vocab-parallel NADO logits ``s``; None = p itself.
        guidance: β of ``q_β ∝ p·R^β`` (with ``nado_logits``).
        vocab_size: the tokenizer's vocabulary: padded ids (``>= vocab_size``) get probability
            0, so the distribution is the one the sampler draws from; None = every id counts.
        return_max: also return the largest log-probability of each position (the greedy
            token's).
    Returns:
        ``[...]`` in the accumulation dtype (at least fp32), replicated over ``tp_group``; with
        ``return_max`` a pair (the targets', the largest).
    """
    x = (_acc(lm_logits) if nado_logits is None
         else _guided_logits(lm_logits, nado_logits, tp_group, guidance))
    if vocab_size is not None:
        x = mask_padded_vocab(x, vocab_size, tp_group)
    log_p = vocab_log_softmax(x, tp_group)
    picked = vocab_select(log_p, targets, tp_group)
    if return_max:
        return picked, vocab_max(log_p, tp_group).squeeze(-1)
    return picked


@torch.no_grad()
def distribution_stats(lm_logits: torch.Tensor, nado_logits: torch.Tensor,
                       tp_group: ProcessGroup = None, vocab_size: Optional[int] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The collapse diagnostics of a position: entropies ``H(p)``, ``H(q)`` (``q ∝ p·σ(s)``) and
    ``log Z = log Σ_v p(v) σ(s[v])``, each ``[...]`` in the accumulation dtype, replicated.
    Padded ids (``>= vocab_size``) have probability 0."""
    z = _acc(lm_logits)
    guided = _guided_logits(lm_logits, nado_logits, tp_group, 1.0)
    if vocab_size is not None:
        z = mask_padded_vocab(z, vocab_size, tp_group)
        guided = mask_padded_vocab(guided, vocab_size, tp_group)

    def entropy(x):
        log_p = vocab_log_softmax(x, tp_group)
        p = log_p.exp()
        return -vocab_sum(torch.where(p > 0, p * log_p, torch.zeros_like(p)), tp_group)

    log_z = vocab_logsumexp(vocab_log_softmax(z, tp_group) + F.logsigmoid(_acc(nado_logits)),
                            tp_group)
    return entropy(z), entropy(guided), log_z


class _ClosedFormKL(torch.autograd.Function):
    """KL(q || p) per position with q held constant; backward ``g · (p − q)``, local to the shard."""

    @staticmethod
    def stats(z, s, tp_group):
        """Shifted log-weights ``l' = logσ(s) − max logσ(s)`` and the two log-normalisers.

        With the shift, ``Σ q l' − log Z'`` is also free of the cancellation of two large
        numbers when R is tiny everywhere (logits ≪ 0).
        """
        a = _acc(z)
        log_r, shift = _shifted_log_sigmoid(s, tp_group)
        lse_p = vocab_logsumexp(a, tp_group)
        lse_q = vocab_logsumexp(a + log_r, tp_group)
        return a, log_r, shift.squeeze(-1), lse_p, lse_q

    @staticmethod
    def forward(ctx, z, s, tp_group):  # noqa: D102
        a, log_r, shift, lse_p, lse_q = _ClosedFormKL.stats(z, s, tp_group)
        q = torch.exp(a + log_r - lse_q.unsqueeze(-1))
        # q · l' with the convention 0 · (−inf) = 0 (a token the NADO head rules out entirely).
        q_log_r = torch.where(q > 0, q * log_r, torch.zeros_like(q))
        log_z_shifted = lse_q - lse_p
        kl = (vocab_sum(q_log_r, tp_group) - log_z_shifted).clamp_min(0.0)
        log_z = log_z_shifted + shift
        ctx.tp_group = tp_group
        ctx.save_for_backward(z, s, lse_p, lse_q, shift)
        ctx.mark_non_differentiable(log_z)
        return kl, log_z

    @staticmethod
    def backward(ctx, grad_kl, _grad_log_z):  # noqa: D102
        z, s, lse_p, lse_q, shift = ctx.saved_tensors
        a = _acc(z)
        # Recomputed rather than saved: two [tokens, V_local] fp32 buffers less between passes.
        grad = torch.exp(a - lse_p.unsqueeze(-1))
        grad -= torch.exp(a + F.logsigmoid(_acc(s)) - shift.unsqueeze(-1) - lse_q.unsqueeze(-1))
        grad *= grad_kl.unsqueeze(-1)
        return grad.to(z.dtype), None, None


def closed_form_kl(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    tp_group: ProcessGroup = None,
    return_log_z: bool = False,
    ref_lm_logits: Optional[torch.Tensor] = None,
):
    """Exact ``KL(q_i || p_i)`` at every position, q a stop-gradient target.

    Without ``ref_lm_logits`` q is built from the model being trained, ``q ∝ p·σ(s)``, and
    ``KL = Σ_v q_i(v) logσ(s_i[v]) − log Z_i``. With them q is built from a *reference*
    (``model.acft.reference``: a frozen θ_(k−1) or θ_0 with the head on its hidden states),
    ``q_ref ∝ p_ref·σ(s)`` with ``p_ref = softmax(ref_lm_logits)`` and ``s`` the head's logits on
    the reference's hidden states; KL(q_ref ‖ p) is minimised at ``p = q_ref``.

    Either way the gradient w.r.t. the LM logits is exactly ``p − q`` (per unit upstream
    gradient) and no gradient flows into the NADO or the reference logits. No full-vocabulary
    gather; the backward is local to each vocabulary shard.

    Args:
        lm_logits: ``[..., V_local]``, vocab-parallel LM logits ``z`` (any float dtype).
        nado_logits: ``[..., V_local]``, vocab-parallel NADO logits ``s``.
        tp_group: tensor-parallel group; None = vocabulary not split.
        return_log_z: also return ``log Z_i`` (the NADO estimate of ``log R(x_<=i)`` under the
            distribution q is built from, no grad), used by the gates.
        ref_lm_logits: ``[..., V_local]`` the reference's LM logits; None = ``lm_logits``.
    Returns:
        ``kl``: ``[...]`` (fp32 or fp64), replicated over ``tp_group``; and ``log_z`` ``[...]`` if asked.
    """
    if ref_lm_logits is None:
        kl, log_z = _ClosedFormKL.apply(lm_logits, nado_logits, tp_group)
    else:
        if ref_lm_logits.shape != lm_logits.shape:
            raise ValueError(f"ref_lm_logits {tuple(ref_lm_logits.shape)} must have the shape of "
                             f"lm_logits {tuple(lm_logits.shape)}")
        with torch.no_grad():
            log_r = _shifted_log_sigmoid(nado_logits, tp_group)[0]
            log_p_ref = vocab_log_softmax(_acc(ref_lm_logits), tp_group)
            log_q = vocab_log_softmax(log_p_ref + log_r, tp_group)
            log_z = vocab_logsumexp(log_p_ref + F.logsigmoid(_acc(nado_logits)), tp_group)
            q = log_q.exp()
        # Σ q (log q − log p) under autograd: d/dz = p·Σq − q = p − q (q detached)
        log_p = vocab_log_softmax(_acc(lm_logits), tp_group)
        terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
        kl = vocab_sum(terms, tp_group).clamp_min(0.0)
    return (kl, log_z) if return_log_z else kl


def cross_entropy(lm_logits: torch.Tensor, targets: torch.Tensor,
                  tp_group: ProcessGroup = None) -> torch.Tensor:
    """Per-position LM cross-entropy ``logsumexp(z) − z[target]`` on vocab-parallel logits.

    Out of place: megatron's ``vocab_parallel_cross_entropy`` overwrites its input logits
    (max-subtraction and exp in place), which would corrupt a KL computed from the same logits.

    Args:
        lm_logits: ``[..., V_local]``. targets: ``[...]`` int64 ids of the full vocabulary.
    Returns:
        ``[...]`` in the accumulation dtype (at least fp32).
    """
    z = _acc(lm_logits)
    return vocab_logsumexp(z, tp_group) - vocab_select(z, targets, tp_group)


def nado_loss(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha: float = 1.0,
    tp_group: ProcessGroup = None,
    weights: Optional[torch.Tensor] = None,
    num_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """NADO training loss on labelled samples: per-prefix BCE + α · forward consistency.

    With ``y = tokens`` the realised next tokens and ``c`` the sequence label::

        CE_i   = −[c · logσ(s_i[y_i]) + (1 − c) · logσ(−s_i[y_i])]
        cons_i = KL_Bern( σ(s_i[y_i]) || r_{i+1} ),   r_j = Σ_v p_j(v) σ(s_j[v])

    ``log r_j`` and ``log(1 − r_j) = log Σ_v p_j(v) σ(−s_j[v])`` are each one vocab-parallel
    logsumexp: exact in log space, including where ``r`` is within rounding of 1 (where
    ``log1mexp`` of a rounded ``log r`` would not be).

    Args:
        lm_logits: ``[b, s, V_local]``, vocab-parallel logits of the frozen base model.
        nado_logits: ``[b, s, V_local]``, vocab-parallel NADO logits.
        tokens: ``[b, s]`` int64, ``tokens[:, i]`` is the token that follows position i
            (megatron's ``labels`` convention: the input shifted left by one).
        labels: ``[b]`` float oracle labels in [0, 1]; NaN marks a sample without a label
            (failed oracle call), which is masked out, never counted as 0 or 1.
        loss_mask: ``[b, s]``, 1 where ``tokens[:, i]`` is a generated token.
        alpha: weight of the consistency term. At ``alpha == 0`` (the GPT-2 prototype's
            CE-only loss) the term is not computed: its four passes over ``[b, s, V]`` and their
            backward were most of the step, for a zero contribution (and ``0 · inf`` would be
            NaN); ``parts["cons"]`` is then NaN, "not computed".
        tp_group: tensor-parallel group; None = vocabulary not split.
        weights: optional ``[b]`` importance weights (p / q' of a proposal q'), self-normalised
            over the labelled samples of the batch.
        num_tokens: the denominator of the per-token means, default this batch's labelled
            tokens. A micro-batch of a larger batch passes the whole batch's count, so that the
            micro-batches' losses and parts add up to the batch's.
    Returns:
        ``(loss, parts)``: the scalar (fp32 or fp64), and a dict with ``ce``, ``cons`` (per-token means)
        and ``num_tokens``.
    """
    if lm_logits.shape != nado_logits.shape:
        raise ValueError(f"lm_logits {tuple(lm_logits.shape)} and nado_logits "
                         f"{tuple(nado_logits.shape)} must have the same shape")
    if tokens.shape != lm_logits.shape[:-1] or loss_mask.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         f"must be {tuple(lm_logits.shape[:-1])}")
    z, s = _acc(lm_logits), _acc(nado_logits)
    c = labels.to(z.dtype)
    labelled = torch.isfinite(c)
    c = torch.where(labelled, c, torch.zeros_like(c)).unsqueeze(-1)
    w = labelled.to(z.dtype)
    if weights is not None:
        w = w * weights.to(z.dtype)
        w = w * labelled.sum().clamp_min(1) / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    mask = loss_mask.to(z.dtype) * labelled.to(z.dtype).unsqueeze(-1)
    token_w = mask * w.unsqueeze(-1)
    num_tokens = (mask.sum() if num_tokens is None else num_tokens.to(z.dtype)).clamp_min(1.0)

    s_next = vocab_select(s, tokens, tp_group)  # s_i[y_i], [b, s]
    ce = -(c * F.logsigmoid(s_next) + (1.0 - c) * F.logsigmoid(-s_next))

    ce_mean = (ce * token_w).sum() / num_tokens
    if alpha == 0:
        return ce_mean, {"ce": ce_mean.detach(), "cons": torch.full_like(ce_mean, math.nan),
                         "num_tokens": num_tokens}

    log_p = vocab_log_softmax(z, tp_group)
    log_r = vocab_logsumexp(log_p + F.logsigmoid(s), tp_group)
    log_1mr = vocab_logsumexp(log_p + F.logsigmoid(-s), tp_group)
    la, l1a = F.logsigmoid(s_next[:, :-1]), F.logsigmoid(-s_next[:, :-1])
    cons = la.exp() * (la - log_r[:, 1:]) + l1a.exp() * (l1a - log_1mr[:, 1:])
    # Consistency links two generated positions; the last generated token is CE's alone.
    cons_w = token_w[:, :-1] * mask[:, 1:]

    cons_mean = (cons * cons_w).sum() / num_tokens
    loss = ce_mean + alpha * cons_mean
    return loss, {"ce": ce_mean.detach(), "cons": cons_mean.detach(), "num_tokens": num_tokens}


def kl_penalty(
    kl: torch.Tensor,
    log_z: torch.Tensor,
    loss_mask: torch.Tensor,
    domain_ids: torch.Tensor,
    domain_lambdas: torch.Tensor,
    delta: Optional[float] = None,
    min_z: float = 0.0,
    domain_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The regularizer ``Σ_d λ_d · mean_{i ∈ tokens of domain d} gate_i · KL_i`` (METHOD.md).

    ``gate_i = 0`` where the NADO estimate ``Z_i = R(x_<=i)`` is already ``>= delta`` (inside the
    feasible set ``E_q[C] >= δ``), else 1; ``delta=None`` disables the gate.

    ``min_z`` (ε, this project's addition, 0 = off): ``gate_i = 0`` also where ``Z_i < ε``, a
    prefix that has already failed (inside an insult of a corpus sentence). There every likely
    continuation has R ≈ 0, so q is the normalised residue of R over tokens the oracle block
    never sampled, and pushing p toward it teaches noise. The mean of domain d
    is over all its masked tokens in the batch, gated or not, so gating removes push rather than
    re-weighting the remaining positions. One uniform λ is ``domain_lambdas`` filled with λ.

    Args:
        kl, log_z: ``[b, s]`` from :func:`closed_form_kl` (``return_log_z=True``).
        loss_mask: ``[b, s]`` 1 on positions that count.
        domain_ids: ``[b]`` int64 domain index of each sequence.
        domain_lambdas: ``[D]`` weight of each domain.
        delta: feasibility threshold in (0, 1], or None.
        min_z: infeasible-prefix threshold in [0, delta).
        domain_tokens: ``[D]`` the denominators of the per-domain means, default this batch's
            masked tokens per domain. A micro-batch of a larger batch passes the whole batch's
            counts: the micro-batches' penalties and parts then add up to the batch's.
    Returns:
        ``(penalty, parts)``; parts has ``kl`` (mean over all masked tokens, ungated),
        ``gated_share`` (share of masked tokens the gate switched off), ``mean_z`` (mean Z) and
        ``kl_by_domain`` (``[D]``, ungated mean KL of each domain).
    """
    if delta is not None and not 0.0 < delta <= 1.0:
        raise ValueError(f"delta={delta}: expected a value in (0, 1] or None")
    if not 0.0 <= min_z < (1.0 if delta is None else delta):
        raise ValueError(f"min_z={min_z}: expected a value in [0, delta)")
    kl = _acc(kl)
    mask = loss_mask.to(kl.dtype)
    gate = torch.ones_like(kl, dtype=torch.bool)
    if delta is not None:
        gate &= log_z < math.log(delta)
    if min_z > 0:
        gate &= log_z >= math.log(min_z)
    gate = gate.to(kl.dtype)
    num_domains = domain_lambdas.numel()
    onehot = F.one_hot(domain_ids, num_domains).to(kl.dtype)  # [b, D]
    per_domain_kl = onehot.t() @ (kl * gate * mask).sum(-1)  # [D]
    if domain_tokens is None:
        domain_tokens = onehot.t() @ mask.sum(-1)  # [D]
    domain_tokens = domain_tokens.to(kl.dtype)
    means = per_domain_kl / domain_tokens.clamp_min(1.0)
    penalty = (domain_lambdas.to(kl.dtype) * means).sum()
    n = domain_tokens.sum().clamp_min(1.0)
    parts = {
        "kl": ((kl * mask).sum() / n).detach(),
        "gated_share": (((1.0 - gate) * mask).sum() / n).detach(),
        "mean_z": ((_acc(log_z).exp() * mask).sum() / n).detach(),
        "kl_by_domain": ((onehot.t() @ (kl.detach() * mask).sum(-1))
                         / domain_tokens.clamp_min(1.0)),
    }
    return penalty, parts
