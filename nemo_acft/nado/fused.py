"""LM cross-entropy and the closed-form KL in one chunked pass over vocab-parallel logits.

The unfused path (:func:`~nemo_acft.nado.losses.cross_entropy` then
:func:`~nemo_acft.nado.losses.closed_form_kl`) computes ``logsumexp(z)`` twice and lets autograd
keep its intermediates and build two ``[tokens, V/TP]`` gradients that are then summed.
:func:`fused_ce_kl` computes, per chunk of tokens, the shared ``lse_p = logsumexp(z)``, the
target logit, ``lse_q = logsumexp(z + logσ(s) − shift)`` and ``Σ q logσ(s)``. It keeps only
per-token statistics for the backward. The backward recomputes p and q chunk by chunk and writes

    ∂/∂z = g_ce · (p − onehot(y)) + g_kl · (p − q)

straight into one ``[tokens, V/TP]`` gradient, the buffer plain SFT also has. With a reference
(``model.acft.reference: frozen | base``) q is ``softmax(z_ref + logσ(s))`` from the reference's
logits instead, projected chunk by chunk from its hidden states like ``s``. Beyond that, the
work buffers are ``[chunk, V/TP]`` fp32: two held through a chunk and a third for moments (an
fp32 copy of a bf16/fp16 chunk, an ``exp`` before its sum). No gradient flows into the NADO logits (q is a stop-gradient target,
as in ``closed_form_kl``), and the backward needs no communication: p and q use the replicated
normalisers.

The model's training path goes one step further (:func:`fused_ce_kl_from_hidden`): it passes
the NADO head's final hidden states and output weight instead of its logits, and each chunk's
``s`` is projected inside the pass (and again in the backward), so the ``[tokens, V/TP]`` NADO
logits never exist at once either.

Library choice: megatron-core's ``fused_vocab_parallel_cross_entropy`` (jit-fused, CE only) and
Liger-style fused linear-CE kernels compute the CE alone. Sharing the normaliser with the KL needs
``lse_p`` inside the same pass, so this is written on our own vocab-parallel reductions. It uses
the same collectives as megatron's vocab-parallel CE: a MAX and a SUM all-reduce per normaliser.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from nemo_acft.nado.vocab_parallel import (ProcessGroup, all_reduce_max_, tp_rank,
                                           tp_world_size)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _all_reduce_sum_(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    if tp_world_size(tp_group) > 1:
        torch.distributed.all_reduce(x, group=tp_group)
    return x


def _row_max(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """Max over the split vocabulary ``[c, 1]`` in the accumulation dtype (a max is exact in
    ``x``'s own); non-finite maxima (a row of -inf) become 0."""
    m = x.amax(dim=-1, keepdim=True).to(_acc_dtype(x.dtype))
    all_reduce_max_(m, tp_group)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _finite_max(x):
    """Row max ``[c, 1]`` of ``x``, 0 where it is not finite (a row of −inf)."""
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _p_and_ce_tp1(z, s, y):
    """What both compiled forwards start with: the shifted ``logσ(s)`` and its shift, ``a' = z
    − m``, ``c_p`` and the target's ``a'``."""
    acc = _acc_dtype(z.dtype)
    log_r = F.logsigmoid(s.to(acc))
    m_r = _finite_max(log_r)
    log_r = log_r - m_r
    m = _finite_max(z).to(acc)
    a = z.to(acc) - m
    c_p = torch.exp(a).sum(dim=-1).log()
    v = z.shape[-1]
    in_shard = (y >= 0) & (y < v)
    picked = a.gather(-1, y.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1)
    a_y = torch.where(in_shard, picked, torch.zeros_like(picked))
    return log_r, m_r.squeeze(-1), m.squeeze(-1), a, c_p, a_y


def _grad_tp1(z, y, p, q, g_ce, g_kl):
    """What both compiled backwards end with: ``g_ce (p − onehot(y)) + g_kl (p − q)`` in z's
    dtype."""
    g = (g_ce + g_kl).unsqueeze(-1) * p - g_kl.unsqueeze(-1) * q
    v = z.shape[-1]
    in_shard = (y >= 0) & (y < v)
    src = torch.where(in_shard, -g_ce, torch.zeros_like(g_ce)).unsqueeze(-1)
    return g.scatter_add(-1, y.clamp(0, v - 1).unsqueeze(-1), src).to(z.dtype)


def _fwd_chunk_tp1(z, s, y):
    """One chunk of the forward at TP = 1 without a reference, the same formulas as the eager
    loop of :class:`_FusedCEKL` in one function, for ``torch.compile`` to fuse its elementwise
    passes (no collectives in between at TP = 1). Returns ce, kl, log_z, m, c_p, c_q, shift."""
    log_r, shift, m, a, c_p, a_y = _p_and_ce_tp1(z, s, y)
    b = a + log_r
    m_q = _finite_max(b)
    e = torch.exp(b - m_q)
    sum_q = e.sum(dim=-1)
    c_q = m_q.squeeze(-1) + sum_q.log()
    q_log_r = torch.nan_to_num(log_r * e, nan=0.0, neginf=0.0).sum(dim=-1) / sum_q
    kl = (q_log_r - (c_q - c_p)).clamp_min(0.0)
    log_z = c_q - c_p + shift
    return c_p - a_y, kl, log_z, m, c_p, c_q, shift


def _bwd_chunk_tp1(z, s, y, m, c_p, c_q, shift, g_ce, g_kl):
    """One chunk of the backward at TP = 1 without a reference (see :func:`_fwd_chunk_tp1`),
    the shifts subtracted one at a time as in the eager loop."""
    acc = _acc_dtype(z.dtype)
    a = z.to(acc) - m.unsqueeze(-1)
    q = torch.exp(F.logsigmoid(s.to(acc)) - shift.unsqueeze(-1) + a - c_q.unsqueeze(-1))
    return _grad_tp1(z, y, torch.exp(a - c_p.unsqueeze(-1)), q, g_ce, g_kl)


def _fwd_chunk_tp1_ref(z, s, b, y):
    """One chunk of the forward at TP = 1 with a reference (``b``: its LM logits), the formulas
    of the eager loop and :func:`_ref_kl_chunk` in one function for ``torch.compile``. Returns
    ce, kl, log_z, m, c_p, c_q, shift, m_ref."""
    log_r, shift, m, a, c_p, a_y = _p_and_ce_tp1(z, s, y)
    b = b.to(a.dtype)
    m_ref = _finite_max(b)
    b = b - m_ref
    c_pref = torch.exp(b).sum(dim=-1).log()
    t = b + log_r
    m_q = _finite_max(t)
    c_q = m_q.squeeze(-1) + torch.exp(t - m_q).sum(dim=-1).log()
    log_q = t - c_q.unsqueeze(-1)
    d = (log_q - (a - c_p.unsqueeze(-1))) * log_q.exp()
    kl = torch.nan_to_num(d, nan=0.0, neginf=0.0).sum(dim=-1).clamp_min(0.0)
    log_z = c_q - c_pref + shift
    return c_p - a_y, kl, log_z, m, c_p, c_q, shift, m_ref.squeeze(-1)


def _bwd_chunk_tp1_ref(z, s, b, y, m, c_p, c_q, shift, m_ref, g_ce, g_kl):
    """One chunk of the backward at TP = 1 with a reference (see :func:`_fwd_chunk_tp1_ref`):
    q_ref in place of q, each shift subtracted from its own term."""
    acc = _acc_dtype(z.dtype)
    a = z.to(acc) - m.unsqueeze(-1)
    log_r = F.logsigmoid(s.to(acc)) - shift.unsqueeze(-1)
    q = torch.exp(log_r + (b.to(acc) - m_ref.unsqueeze(-1)) - c_q.unsqueeze(-1))
    return _grad_tp1(z, y, torch.exp(a - c_p.unsqueeze(-1)), q, g_ce, g_kl)


_COMPILED = {}


def _compiled(fn):
    """``torch.compile(fn)``, once per process (static shapes: a run has at most two chunk
    lengths, the full one and the remainder)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


class _FusedCEKL(torch.autograd.Function):
    """Per chunk, everything relative to the row max m of z: ``a' = z − m`` is exact for the
    likely tokens, so p, q, the CE and the KL keep full precision at logits of 1e4 (computing
    ``exp(z − lse)`` would round ``lse`` to the precision of m). Saved per token: m and the two
    log-normalisers ``c_p = log Σ exp(a')``, ``c_q = log Σ exp(a' + logσ(s)')`` and the shift."""

    @staticmethod
    def forward(ctx, z, s, targets, tp_group, chunk, s_hidden=None, s_weight=None,
                ref=None, ref_hidden=None, ref_weight=None, compile=False):  # noqa: D102
        n, v_local = z.shape
        s_chunk = _s_chunks(s, s_hidden, s_weight)
        ref_chunk = None if ref is None and ref_hidden is None else _s_chunks(ref, ref_hidden,
                                                                              ref_weight)
        acc = _acc_dtype(z.dtype)
        ce = torch.empty(n, dtype=acc, device=z.device)
        kl, log_z, m_all, c_p, c_q, shift, m_ref = (torch.empty_like(ce) for _ in range(7))
        start = tp_rank(tp_group) * v_local
        compiled = bool(compile) and tp_world_size(tp_group) == 1
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            if compiled:
                if ref_chunk is None:
                    outs = _compiled(_fwd_chunk_tp1)(z[i:j], s_chunk(i, j), targets[i:j])
                else:
                    outs = _compiled(_fwd_chunk_tp1_ref)(z[i:j], s_chunk(i, j),
                                                         ref_chunk(i, j), targets[i:j])
                for buf, x in zip((ce, kl, log_z, m_all, c_p, c_q, shift, m_ref), outs):
                    buf[i:j] = x
                continue
            # logσ(s) shifted so that its max is 0 (see losses._shifted_log_sigmoid)
            log_r = F.logsigmoid(s_chunk(i, j).to(acc))
            m_r = _row_max(log_r, tp_group)
            log_r -= m_r
            m = _row_max(z[i:j], tp_group)
            a = z[i:j] - m  # a' in fp32 (type promotion: one pass, z itself never written)
            c_p_c = _all_reduce_sum_(torch.exp(a).sum(dim=-1), tp_group).log()
            # target logit: the rank whose shard holds it contributes, then a sum
            local = targets[i:j] - start
            in_shard = (local >= 0) & (local < v_local)
            picked = a.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
            a_y = _all_reduce_sum_(torch.where(in_shard, picked, torch.zeros_like(picked)),
                                   tp_group)
            ce[i:j] = c_p_c - a_y
            m_all[i:j], c_p[i:j], shift[i:j] = m.squeeze(-1), c_p_c, m_r.squeeze(-1)
            if ref_chunk is not None:
                _ref_kl_chunk(a, c_p_c, log_r, m_r, ref_chunk(i, j).to(acc), tp_group,
                              kl[i:j], log_z[i:j], c_q[i:j], m_ref[i:j])
                continue
            # q ∝ exp(a' + logσ(s)' − m_q), unnormalised, built in a's buffer (the division by
            # its sum is applied to the per-token sum below: one [c, V] pass fewer)
            a.add_(log_r)
            m_q = _row_max(a, tp_group)
            a.sub_(m_q).exp_()
            sum_q = _all_reduce_sum_(a.sum(dim=-1), tp_group)
            c_q_c = m_q.squeeze(-1) + sum_q.log()
            # Σ q logσ(s)' with 0 · (−inf) = 0 where the head rules a token out entirely
            log_r.mul_(a).nan_to_num_(nan=0.0, neginf=0.0)
            q_log_r = _all_reduce_sum_(log_r.sum(dim=-1), tp_group) / sum_q
            kl[i:j] = (q_log_r - (c_q_c - c_p_c)).clamp_min(0.0)
            log_z[i:j] = c_q_c - c_p_c + m_r.squeeze(-1)
            c_q[i:j] = c_q_c
        ctx.save_for_backward(z, s, targets, m_all, c_p, c_q, shift, s_hidden, s_weight,
                              ref, ref_hidden, ref_weight, m_ref)
        ctx.tp_group, ctx.chunk, ctx.has_ref = tp_group, chunk, ref_chunk is not None
        ctx.compiled = compiled
        ctx.mark_non_differentiable(log_z)
        return ce, kl, log_z

    @staticmethod
    def backward(ctx, g_ce, g_kl, _g_log_z):  # noqa: D102
        (z, s, targets, m_all, c_p, c_q, shift, s_hidden, s_weight, ref, ref_hidden, ref_weight,
         m_ref) = ctx.saved_tensors
        s_chunk = _s_chunks(s, s_hidden, s_weight)
        ref_chunk = _s_chunks(ref, ref_hidden, ref_weight) if ctx.has_ref else None
        n, v_local = z.shape
        acc = _acc_dtype(z.dtype)
        start = tp_rank(ctx.tp_group) * v_local
        g_ce = torch.zeros(n, dtype=acc, device=z.device) if g_ce is None else g_ce.to(acc)
        g_kl = torch.zeros(n, dtype=acc, device=z.device) if g_kl is None else g_kl.to(acc)
        grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        direct = grad.dtype == acc
        rows = torch.arange(min(ctx.chunk, n), device=z.device)
        for i in range(0, n, ctx.chunk):
            j = min(i + ctx.chunk, n)
            if ctx.compiled and ref_chunk is None:
                grad[i:j] = _compiled(_bwd_chunk_tp1)(z[i:j], s_chunk(i, j), targets[i:j],
                                                      m_all[i:j], c_p[i:j], c_q[i:j],
                                                      shift[i:j], g_ce[i:j], g_kl[i:j])
                continue
            if ctx.compiled:
                grad[i:j] = _compiled(_bwd_chunk_tp1_ref)(
                    z[i:j], s_chunk(i, j), ref_chunk(i, j), targets[i:j], m_all[i:j], c_p[i:j],
                    c_q[i:j], shift[i:j], m_ref[i:j], g_ce[i:j], g_kl[i:j])
                continue
            gc, gk = g_ce[i:j].unsqueeze(-1), g_kl[i:j].unsqueeze(-1)
            # a' = z − m, in the gradient's own rows where that is fp32 (no copy at the end)
            a = torch.sub(z[i:j], m_all[i:j].unsqueeze(-1), out=grad[i:j]) if direct else (
                z[i:j] - m_all[i:j].unsqueeze(-1))
            # the shifts one at a time: each can be ~1e4 (logσ(s) at s = −1e4, a reference's
            # row max), and summed first they would round the O(1) remainder
            q = F.logsigmoid(s_chunk(i, j).to(acc)).sub_(shift[i:j].unsqueeze(-1))  # exact, then O(1)
            if ref_chunk is None:  # q from the model being trained
                q.add_(a)
            else:  # q from the reference: its logits relative to their row max
                q.add_(ref_chunk(i, j).to(acc)).sub_(m_ref[i:j].unsqueeze(-1))
            q.sub_(c_q[i:j].unsqueeze(-1)).exp_()
            p = a.sub_(c_p[i:j].unsqueeze(-1)).exp_().mul_(gc + gk)
            p.addcmul_(q, gk, value=-1.0)  # (g_ce + g_kl) p − g_kl q
            local = targets[i:j] - start
            in_shard = (local >= 0) & (local < v_local)
            r = rows[: j - i][in_shard]
            p[r, local[in_shard]] -= g_ce[i:j][in_shard]
            if not direct:
                grad[i:j] = p
        return grad, None, None, None, None, None, None, None, None, None, None


def _ref_kl_chunk(a, c_p, log_r, m_r, b, tp_group, kl, log_z, c_q, m_ref):
    """KL(q_ref ‖ p) of one chunk, q_ref = softmax(b + logσ(s)) from the reference's logits
    ``b`` (never written: it may be the saved input), written into the output slices. ``a`` = z − m and ``c_p`` its
    log-normaliser (log p = a − c_p); ``log_r`` the shifted logσ(s), ``m_r`` its shift.

    Saved for the backward: ``m_ref`` (b's row max) and ``c_q`` (the log-normaliser of
    ``b − m_ref + log_r``). ``log_z = log Σ p_ref σ(s)``, the reference's Z."""
    mb = _row_max(b, tp_group)
    b = b - mb  # b' (a new buffer)
    c_pref = _all_reduce_sum_(torch.exp(b).sum(dim=-1), tp_group).log()
    b.add_(log_r)
    m_q = _row_max(b, tp_group)
    sum_q = _all_reduce_sum_(torch.exp(b - m_q).sum(dim=-1), tp_group)
    c = m_q.squeeze(-1) + sum_q.log()
    b.sub_(c.unsqueeze(-1))  # log q_ref
    # Σ q (log q − log p), term by term (exact where q ≈ p); 0 · (−inf) = 0 where q = 0
    d = b - (a - c_p.unsqueeze(-1))
    d.mul_(b.exp()).nan_to_num_(nan=0.0, neginf=0.0)
    kl.copy_(_all_reduce_sum_(d.sum(dim=-1), tp_group).clamp_min(0.0))
    log_z.copy_(c - c_pref + m_r.squeeze(-1))
    c_q.copy_(c)
    m_ref.copy_(mb.squeeze(-1))


def _s_chunks(s, s_hidden, s_weight):
    """Rows i:j of the NADO logits: a slice of ``s``, or ``s_hidden[i:j] @ s_weight.T``
    computed on the spot (the head's output projection, never materialised for all tokens)."""
    if s is not None:
        return lambda i, j: s[i:j]

    def chunk(i, j):
        with torch.no_grad():
            return s_hidden[i:j] @ s_weight.t()
    return chunk


def fused_ce_kl(
    lm_logits: torch.Tensor,
    nado_logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup = None,
    chunk_tokens: int = 2048,
    ref_lm_logits: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(ce, kl, log_z)``: the values of ``cross_entropy(z, y)`` and
    ``closed_form_kl(z, s, return_log_z=True)`` in one chunked pass, with the hand-written backward
    of the module docstring.

    Args:
        lm_logits: ``[..., V_local]`` vocab-parallel LM logits z (any float dtype).
        nado_logits: ``[..., V_local]`` vocab-parallel NADO logits s (no gradient flows to them).
        targets: ``[...]`` int64 ids of the full vocabulary.
        tp_group: tensor-parallel group; None = vocabulary not split.
        chunk_tokens: tokens per chunk: the work buffers are ``[chunk_tokens, V_local]`` fp32.
        ref_lm_logits: ``[..., V_local]`` a reference's LM logits: q ∝ p_ref·σ(s) instead of
            p·σ(s) (``closed_form_kl``'s ``ref_lm_logits``; ``s`` is then the head on the
            reference's hidden states). No gradient flows to them.
        compile: at TP = 1, each chunk's forward and backward as one ``torch.compile``-d
            function (:func:`_fwd_chunk_tp1`, :func:`_bwd_chunk_tp1`; with a reference
            :func:`_fwd_chunk_tp1_ref`, :func:`_bwd_chunk_tp1_ref`): its elementwise passes
            fused (``benchmarks/fused_pass.py``), at a one-off compile of tens of seconds.
            At TP > 1 the eager loop (the collectives sit between the passes).
    Returns:
        ``ce``, ``kl`` (differentiable w.r.t. z) and ``log_z`` (no grad), each ``[...]`` in fp32
        (fp64 for fp64 logits), replicated over ``tp_group``.
    """
    if lm_logits.shape != nado_logits.shape:
        raise ValueError(f"lm_logits {tuple(lm_logits.shape)} and nado_logits "
                         f"{tuple(nado_logits.shape)} must have the same shape")
    v = lm_logits.shape[-1]
    ref = None
    if ref_lm_logits is not None:
        if ref_lm_logits.shape != lm_logits.shape:
            raise ValueError(f"ref_lm_logits {tuple(ref_lm_logits.shape)} must have the shape of "
                             f"lm_logits {tuple(lm_logits.shape)}")
        ref = ref_lm_logits.detach().reshape(-1, v)
    return _apply(lm_logits, targets, tp_group, chunk_tokens, nado_logits.reshape(-1, v),
                  ref=ref, compile=compile)


def fused_ce_kl_from_hidden(
    lm_logits: torch.Tensor,
    nado_hidden: torch.Tensor,
    nado_weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup = None,
    chunk_tokens: int = 256,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_ce_kl` with the NADO logits computed chunk by chunk from the head's final
    hidden states and its (vocab-parallel, bias-free) output weight: ``s = nado_hidden @
    nado_weight.T``. The ``[tokens, V/TP]`` NADO logits never exist at once (the projection is
    recomputed in the backward; the head gets no gradient, as in the LM block).

    Args:
        nado_hidden: ``[..., h]``, replicated over ``tp_group`` (no sequence parallelism).
        nado_weight: ``[V_local, h]``, this rank's rows of the head's output layer.
        ref_hidden, ref_weight: a reference's final hidden states ``[..., h]`` and its LM output
            weight ``[V_local, h]``: q ∝ p_ref·σ(s) with ``p_ref = softmax(ref_hidden @
            ref_weight.T)`` projected chunk by chunk too (``nado_hidden`` is then the head on
            the reference's hidden states).
    """
    if nado_hidden.shape[:-1] != lm_logits.shape[:-1]:
        raise ValueError(f"nado_hidden {tuple(nado_hidden.shape)} does not match lm_logits "
                         f"{tuple(lm_logits.shape)}")
    if nado_weight.shape != (lm_logits.shape[-1], nado_hidden.shape[-1]):
        raise ValueError(f"nado_weight {tuple(nado_weight.shape)}: expected "
                         f"{(lm_logits.shape[-1], nado_hidden.shape[-1])}")
    h = nado_hidden.shape[-1]
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None:
        if ref_hidden.shape[:-1] != lm_logits.shape[:-1] or ref_weight.shape != (
                lm_logits.shape[-1], ref_hidden.shape[-1]):
            raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight "
                             f"{tuple(ref_weight.shape)} do not match lm_logits "
                             f"{tuple(lm_logits.shape)}")
        ref_hidden = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
        ref_weight = ref_weight.detach()
    return _apply(lm_logits, targets, tp_group, chunk_tokens, None,
                  nado_hidden.detach().reshape(-1, h), nado_weight.detach(),
                  ref_hidden=ref_hidden, ref_weight=ref_weight, compile=compile)


def _apply(lm_logits, targets, tp_group, chunk_tokens, s=None, s_hidden=None, s_weight=None,
           ref=None, ref_hidden=None, ref_weight=None, compile=False):
    """The checks both entry points share, then :class:`_FusedCEKL` on ``[tokens, V_local]``
    rows; results back in ``targets``' shape."""
    if targets.shape != lm_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be {tuple(lm_logits.shape[:-1])}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected >= 1")
    lead = targets.shape
    ce, kl, log_z = _FusedCEKL.apply(lm_logits.reshape(-1, lm_logits.shape[-1]), s,
                                     targets.reshape(-1), tp_group, int(chunk_tokens),
                                     s_hidden, s_weight, ref, ref_hidden, ref_weight,
                                     bool(compile))
    return ce.view(lead), kl.view(lead), log_z.view(lead)
