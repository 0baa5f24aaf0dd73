"""The reference's q shipped as its top-k entries plus one tail bucket, and the LM step's loss
against it (``model.acft.reference_on: oracle``).

With a frozen reference (``model.acft.reference: frozen | base``) the target of LM block k,
``q = softmax(z_ref + logσ(s))``, depends only on the reference trunk and φ, which the oracle
group already holds while the block runs (METHOD.md: "targets precomputed where that model is
already loaded"). :func:`sparse_reference_q` computes it there and keeps, per position, the
``k`` ids ranked highest by ``max(p_ref, q)`` (where the reference puts mass, so a token the
head pushes down is named with its small q, and where q puts mass), their ``log q``, the log of
q's mass outside them, ``log q_rest``, and the reference's ``log Z``: about ``8k + 8`` bytes per
token instead of the reference's ``[tokens, V]`` logits.

The LM step then minimises the KL between q and p *coarsened* to those ``k`` tokens and one
bucket for the rest (:func:`fused_ce_sparse_kl`):

    KL_k = Σ_{v∈S} q_v (log q_v − log p_v) + q_rest (log q_rest − log p_rest),

``p_rest = Σ_{v∉S} p_v``. It equals the full KL(q ‖ p) when S holds every id, and is at most
the full KL otherwise (coarsening never increases a KL). Its gradient in z is ``p − q`` on S
and ``p_v (1 − q_rest / p_rest)`` on the tail: the tail moves as one bucket toward q's tail
mass, its shape left to the LM loss. The pass is the LM cross-entropy's (one ``exp`` of the
logits, its sum, the target's logit) plus a gather and a scatter of ``k`` entries per token,
with a hand-written backward ``(g_ce + g_kl (1 − q_rest/p_rest)) p`` corrected at S and the
label, so the step costs about plain SFT's.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from nemo_acft.nado.fused import _acc_dtype, _all_reduce_sum_, _row_max
from nemo_acft.nado.vocab_parallel import (ProcessGroup, shard_ids, tp_rank, tp_world_size,
                                           vocab_gather, vocab_top_k)


class SparseQ(NamedTuple):
    """A reference's q at each position, top-k and a tail bucket (:func:`sparse_reference_q`).

    ``ids`` ``[..., k]`` int64 ids of the full vocabulary; ``log_q`` ``[..., k]`` their log q;
    ``log_rest`` ``[...]`` the log of q's mass outside ``ids`` (−inf: none); ``log_z`` ``[...]``
    the reference's ``log Σ_v p_ref(v) σ(s[v])`` (the gates read it). Float tensors fp32."""

    ids: torch.Tensor
    log_q: torch.Tensor
    log_rest: torch.Tensor
    log_z: torch.Tensor

    def transpose(self, dim0: int, dim1: int) -> "SparseQ":
        """Every field with two leading dimensions swapped (``[b, s] ↔ [s, b]``)."""
        return SparseQ(*(x.transpose(dim0, dim1) for x in self))


def _mine(ins, x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x`` where the ids are this shard's (``ins``, None: all), 0 elsewhere."""
    return x if ins is None else torch.where(ins, x, zero)


def _zero_kept_(e: torch.Tensor, loc: torch.Tensor, ins) -> torch.Tensor:
    """``e`` (≥ 0, ``[c, V_local]``) with this shard's kept ids set to 0 in place: a min with 0
    there and with +inf at the ids of other shards (clamped into this one by
    :func:`~nemo_acft.nado.vocab_parallel.shard_ids`), so colliding clamped ids are a no-op.
    ``ins`` None: every id is this shard's."""
    src = (torch.zeros(loc.shape, dtype=e.dtype, device=e.device) if ins is None else
           torch.where(ins, 0.0, float("inf")).to(e.dtype))
    return e.scatter_reduce_(-1, loc, src, reduce="amin")


@torch.no_grad()
def sparse_reference_q(ref_logits: torch.Tensor, nado_logits: torch.Tensor, top_k: int,
                       tp_group: ProcessGroup = None) -> SparseQ:
    """The reference's ``q = softmax(z_ref + logσ(s))`` as :class:`SparseQ`: the ``top_k`` ids
    of the largest ``max(log p_ref, log q)``, their log q, the tail's log mass and ``log Z``.
    Vocab-parallel: all-reduces of per-position scalars and an all-gather of ``top_k``
    candidates per rank.

    Every log-probability is relative to its row max first (``a = z − m``, as in
    :mod:`.fused`), so it keeps full precision at logits of 1e4. The tail's mass is a sum of its
    own terms (q's unnormalised terms with the kept ids zeroed), never ``1 − Σ_kept``.

    Args:
        ref_logits: ``[..., V_local]`` the reference's LM logits.
        nado_logits: ``[..., V_local]`` the head's logits on the reference's hidden states.
        top_k: ids kept per position (at most the vocabulary).
    """
    lead, v_local = ref_logits.shape[:-1], ref_logits.shape[-1]
    ref_logits, nado_logits = ref_logits.reshape(-1, v_local), nado_logits.reshape(-1, v_local)
    acc = _acc_dtype(ref_logits.dtype)
    a = ref_logits.to(acc) - _row_max(ref_logits, tp_group)  # a = z − m
    c_p = _all_reduce_sum_(torch.exp(a).sum(dim=-1), tp_group).log_()
    # logσ(s) = −softplus(−s), the same values as F.logsigmoid in half its time on CPU
    log_r = F.softplus(nado_logits.to(acc).neg()).neg_()
    shift = _row_max(log_r, tp_group)
    b = log_r.sub_(shift).add_(a)  # a + logσ(s)': log q up to its normaliser
    m_q = _row_max(b, tp_group)
    e = torch.exp(b - m_q)  # q's unnormalised terms
    sum_q = _all_reduce_sum_(e.sum(dim=-1), tp_group)
    c_q = m_q.squeeze(-1) + sum_q.log()
    log_p = a.sub_(c_p.unsqueeze(-1))
    log_q = b.sub_(c_q.unsqueeze(-1))
    _, ids = vocab_top_k(torch.maximum(log_p, log_q, out=log_p), top_k, tp_group, sorted=False)
    kept = vocab_gather(log_q, ids, tp_group)
    _zero_kept_(e, *shard_ids(ids, tp_rank(tp_group) * v_local, v_local,
                              tp_world_size(tp_group) > 1))
    rest = _all_reduce_sum_(e.sum(dim=-1), tp_group).div_(sum_q).log_()  # −inf: no tail
    f32 = torch.float32
    log_z = c_q - c_p + shift.squeeze(-1)  # log Σ p_ref σ(s)
    k = ids.shape[-1]
    return SparseQ(ids.view(*lead, k), kept.to(f32).view(*lead, k), rest.to(f32).view(lead),
                   log_z.to(f32).view(lead))


class _FusedCESparseKL(torch.autograd.Function):
    """Per chunk of tokens: the row max m of z, ``a = z − m``, ``e = exp(a)``; the kept ids'
    ``a`` gathered (their ``e`` is its exp) and their ``e`` zeroed, so one sum gives the tail
    and the total (no ``1 − Σ`` cancellation); one all-reduce of [total, tail, target logit,
    kept ids' Σ q (log q − a), Σ q] per chunk beside the max. Saved per token: m,
    ``c_p = log Σ e``, ``q_rest/p_rest``, the shipped q's mass and the kept ids' ``a`` (the
    backward's p there, without a second gather). Gathers and scatters only (no
    ``nonzero``): where the vocabulary is split, an id of another shard is clamped into this
    one and contributes 0 (its zeroing is a min with +inf, a no-op); where it is not, the
    masks are skipped."""

    @staticmethod
    def forward(ctx, z, y, ids, log_q, log_rest, tp_group, chunk):  # noqa: D102
        n, v_local = z.shape
        acc = _acc_dtype(z.dtype)
        ce = torch.empty(n, dtype=acc, device=z.device)
        kl, m_all, c_p, ratio, mass = (torch.empty_like(ce) for _ in range(5))
        a_kept_all = torch.empty(ids.shape, dtype=acc, device=z.device)
        split = tp_world_size(tp_group) > 1
        start = tp_rank(tp_group) * v_local
        zero = torch.zeros((), dtype=acc, device=z.device)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            m = _row_max(z[i:j], tp_group)
            a = z[i:j] - m  # fp32 (type promotion); z is never written
            e = torch.exp(a)
            loc, ins = shard_ids(ids[i:j], start, v_local, split)
            a_kept = torch.gather(a, -1, loc, out=a_kept_all[i:j])
            e_kept = _mine(ins, a_kept.exp(), zero)
            tail_local = _zero_kept_(e, loc, ins).sum(dim=-1)
            loc_y, y_in = shard_ids(y[i:j].unsqueeze(-1), start, v_local, split)
            a_y = _mine(y_in, a.gather(-1, loc_y), zero).squeeze(-1)
            # Σ_{kept, this shard} q (log q − (a − c_p)) = Σ q (log q − a) + c_p Σ q: both
            # parts reduced here, c_p added after the all-reduce
            lq = log_q[i:j].to(acc)
            q = _mine(ins, lq.exp(), zero)
            term = torch.where(q > 0, q * (lq - a_kept), zero).sum(dim=-1)
            sums = torch.stack([tail_local + e_kept.sum(dim=-1), tail_local, a_y, term,
                                q.sum(dim=-1)])
            total, tail, a_y, term, q_kept = _all_reduce_sum_(sums, tp_group)
            c = total.log()
            log_p_rest = tail.log() - c  # −inf where every id is kept
            lr = log_rest[i:j].to(acc)
            q_rest = lr.exp()
            rest_term = torch.where(q_rest > 0, q_rest * (lr - log_p_rest), zero)
            ce[i:j] = c - a_y
            kl[i:j] = (term + c * q_kept + rest_term).clamp_min(0.0)
            m_all[i:j], c_p[i:j] = m.squeeze(-1), c
            ratio[i:j] = torch.where(q_rest > 0, (lr - log_p_rest).exp(), zero)
            mass[i:j] = q_kept + q_rest  # 1 up to the rounding of the shipped q
        ctx.save_for_backward(z, y, ids, log_q, a_kept_all, m_all, c_p, ratio, mass)
        ctx.chunk, ctx.start, ctx.split = chunk, start, split
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):  # noqa: D102
        z, y, ids, log_q, a_kept_all, m_all, c_p, ratio, mass = ctx.saved_tensors
        n, v_local = z.shape
        acc = _acc_dtype(z.dtype)
        g_ce = torch.zeros(n, dtype=acc, device=z.device) if g_ce is None else g_ce.to(acc)
        g_kl = torch.zeros(n, dtype=acc, device=z.device) if g_kl is None else g_kl.to(acc)
        grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        direct = grad.dtype == acc
        zero = torch.zeros((), dtype=acc, device=z.device)
        for i in range(0, n, ctx.chunk):
            j = min(i + ctx.chunk, n)
            m = m_all[i:j].unsqueeze(-1)
            c = c_p[i:j].unsqueeze(-1)
            # p, in the gradient's own rows where that is fp32; the two shifts one at a time
            # (m can be ~1e4: summed first, it would round the O(1) normaliser)
            a = torch.sub(z[i:j], m, out=grad[i:j]) if direct else z[i:j].to(acc) - m
            p = a.sub_(c).exp_()
            gk = g_kl[i:j].unsqueeze(-1)
            r = ratio[i:j].unsqueeze(-1)
            loc, ins = shard_ids(ids[i:j], ctx.start, v_local, ctx.split)
            # (g_ce + g_kl (Σq − q_rest/p_rest)) p everywhere, then on the kept ids
            # g_kl (p q_rest/p_rest − q): their total g_kl (p − q). Σq, the shipped q's mass,
            # is 1 up to its rounding: the gradient of the value the forward computed. The
            # kept ids' p comes from the forward's a (the same p as a gather of it).
            p.mul_(g_ce[i:j].unsqueeze(-1) + gk * (mass[i:j].unsqueeze(-1) - r))
            fix = gk * ((a_kept_all[i:j] - c).exp_().mul_(r) - log_q[i:j].to(acc).exp())
            p.scatter_add_(-1, loc, _mine(ins, fix, zero))
            loc_y, y_in = shard_ids(y[i:j].unsqueeze(-1), ctx.start, v_local, ctx.split)
            p.scatter_add_(-1, loc_y, _mine(y_in, -g_ce[i:j].unsqueeze(-1), zero))
            if not direct:
                grad[i:j] = p
        return grad, None, None, None, None, None, None


def fused_ce_sparse_kl(lm_logits: torch.Tensor, targets: torch.Tensor, q: SparseQ,
                       tp_group: ProcessGroup = None, chunk_tokens: int = 256
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(ce, kl)``: the LM cross-entropy of ``targets`` and the coarsened
    ``KL_k(q ‖ p)`` of the module docstring, in one chunked pass with a hand-written backward
    (gradients into the logits only; q is a constant target).

    Args:
        lm_logits: ``[..., V_local]`` vocab-parallel LM logits z (any float dtype).
        targets: ``[...]`` int64 ids of the full vocabulary.
        q: the reference's :class:`SparseQ`, fields ``[..., k]`` and ``[...]``.
        tp_group: tensor-parallel group; None = vocabulary not split.
        chunk_tokens: tokens per chunk (the work buffers are ``[chunk, V_local]`` fp32).
    Returns:
        ``ce`` and ``kl``, each ``[...]`` in fp32 (fp64 for fp64 logits), replicated.
    """
    lead = targets.shape
    if lm_logits.shape[:-1] != lead:
        raise ValueError(f"targets {tuple(lead)} must be {tuple(lm_logits.shape[:-1])}")
    if q.ids.shape[:-1] != lead or q.log_q.shape != q.ids.shape or q.log_rest.shape != lead:
        raise ValueError(f"sparse q ids {tuple(q.ids.shape)}, log_q {tuple(q.log_q.shape)}, "
                         f"log_rest {tuple(q.log_rest.shape)} do not match the tokens "
                         f"{tuple(lead)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected >= 1")
    k = q.ids.shape[-1]
    ce, kl = _FusedCESparseKL.apply(
        lm_logits.reshape(-1, lm_logits.shape[-1]), targets.reshape(-1),
        q.ids.reshape(-1, k).long(),
        q.log_q.detach().reshape(-1, k), q.log_rest.detach().reshape(-1), tp_group,
        int(chunk_tokens))
    return ce.view(lead), kl.view(lead)


__all__ = ["SparseQ", "sparse_reference_q", "fused_ce_sparse_kl"]
