"""Reductions over a vocabulary that may be split across a tensor-parallel group.

Every loss of the method is built from three per-position reductions over the vocabulary:
a max, a sum and the selection of one entry (the target token). Under tensor parallelism each
rank holds a contiguous shard ``[rank * V_local, (rank + 1) * V_local)`` of the last dimension,
and these reductions become all-reduces of per-position scalars, as in megatron-core's
``vocab_parallel_cross_entropy``. The full vocabulary is never gathered.

Gradient convention (megatron's ``reduce_from_`` / ``copy_to_tensor_model_parallel_region``
pair): the loss is replicated on every tensor-parallel rank. A reduction (shards → replicated
value) is an all-reduce forward and the identity backward. A replicated value that enters
vocab-sharded arithmetic again (e.g. ``z − logsumexp(z)``) goes through :func:`to_shards`:
the identity forward and an all-reduce backward, because each rank's autograd sees only its own
shard's share of that value's gradient. Following both rules, plain autograd through these
functions gives exact gradients. This is the only place in the package that talks to the
process group.

``tp_group=None`` means "no tensor parallelism": the last dimension is the whole vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def tp_world_size(tp_group: ProcessGroup) -> int:
    """Number of ranks the vocabulary is split over (1 when ``tp_group`` is None)."""
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def tp_rank(tp_group: ProcessGroup) -> int:
    """This rank's index in ``tp_group`` (0 when ``tp_group`` is None)."""
    return 0 if tp_group is None else dist.get_rank(tp_group)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce SUM over ``tp_group`` whose backward is the identity (replicated-loss rule)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp_group) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=tp_group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def all_reduce_sum(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """Sum of per-rank partial results; differentiable (identity backward).

    Args:
        x: any shape, this rank's partial sum.
    """
    if tp_world_size(tp_group) == 1:
        return x
    return _AllReduceSum.apply(x, tp_group)


class _ToShards(torch.autograd.Function):
    """Identity forward; all-reduce SUM backward (megatron's copy_to_..._region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp_group) -> torch.Tensor:  # noqa: D102
        ctx.tp_group = tp_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return grad, None


def to_shards(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """Mark a replicated per-position value that is about to be combined with vocab shards.

    Args:
        x: any shape, replicated across ``tp_group``.
    """
    if tp_world_size(tp_group) == 1:
        return x
    return _ToShards.apply(x, tp_group)


def all_reduce_max_(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """In-place all-reduce MAX of a detached tensor (a stabiliser, never differentiated)."""
    if tp_world_size(tp_group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=tp_group)
    return x


def vocab_max(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """Max over the (split) vocabulary, detached, with non-finite maxima replaced by 0.

    Args:
        x: ``[..., V_local]``, vocab-parallel.
    Returns:
        ``[..., 1]``, replicated.
    """
    m = x.detach().amax(dim=-1, keepdim=True)
    all_reduce_max_(m, tp_group)
    # A row that is -inf everywhere would give inf - inf = nan below; 0 keeps it at -inf.
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def vocab_logsumexp(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``log Σ_v exp(x[..., v])`` over the whole (split) vocabulary, differentiable.

    Args:
        x: ``[..., V_local]``, vocab-parallel; computed in ``x``'s dtype (pass fp32).
    Returns:
        ``[...]``, replicated across ``tp_group``.
    """
    m = vocab_max(x, tp_group)
    s = all_reduce_sum(torch.exp(x - m).sum(dim=-1), tp_group)
    return m.squeeze(-1) + torch.log(s)


def vocab_log_softmax(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``x − logsumexp(x)`` over the whole (split) vocabulary, differentiable.

    Computed as ``(x − max) − log Σ exp(x − max)``, like ``torch.log_softmax``: for the
    likely tokens ``x − max`` is exact, and the normaliser is O(log V). The form
    ``x − (max + log Σ ...)`` would round the normaliser to the precision of ``max`` (1e-3 at
    logits of 1e4 in fp32) and every probability with it.

    Args:
        x: ``[..., V_local]``, vocab-parallel.
    Returns:
        ``[..., V_local]``, this rank's shard of the log-softmax.
    """
    shifted = x - vocab_max(x, tp_group)
    log_s = torch.log(all_reduce_sum(torch.exp(shifted).sum(dim=-1), tp_group))
    return shifted - to_shards(log_s, tp_group).unsqueeze(-1)


def mask_padded_vocab(x: torch.Tensor, vocab_size: int, tp_group: ProcessGroup) -> torch.Tensor:
    """``x`` with the entries of ids ``>= vocab_size`` at −inf: the padding Megatron adds to
    make the vocabulary divisible (no token of the tokenizer; never sampled).

    Args:
        x: ``[..., V_local]``, vocab-parallel.
        vocab_size: the tokenizer's vocabulary, ``<= V_local * tp``.
    """
    v_local = x.shape[-1]
    start = tp_rank(tp_group) * v_local
    if start + v_local <= vocab_size:
        return x
    ids = torch.arange(start, start + v_local, device=x.device)
    return x.masked_fill(ids >= vocab_size, float("-inf"))


def vocab_sum(x: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``Σ_v x[..., v]`` over the whole (split) vocabulary, differentiable.

    Args:
        x: ``[..., V_local]``, vocab-parallel.
    Returns:
        ``[...]``, replicated.
    """
    return all_reduce_sum(x.sum(dim=-1), tp_group)


def shard_ids(ids: torch.Tensor, start: int, v_local: int, split: bool = True):
    """``(local, in_shard)`` for ids of the full vocabulary and the shard ``[start, start +
    v_local)``: the ids relative to the shard, clamped into it (a gather or scatter of every id
    stays in bounds), and where they really are the shard's (the others must contribute 0).
    ``split`` False (the vocabulary is not split: the shard is all of it): the ids themselves
    and ``None``, no mask to apply."""
    if not split:
        return ids, None
    local = ids - start
    return local.clamp(0, v_local - 1), (local >= 0) & (local < v_local)


def vocab_gather(x: torch.Tensor, ids: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``x[..., ids]`` for ``ids`` ``[..., k]`` of the full vocabulary, differentiable.

    Each rank picks the entries whose id falls in its shard, zero elsewhere, then a sum
    all-reduce completes the selection (megatron's ``calculate_predicted_logits`` stage).

    Args:
        x: ``[..., V_local]``, vocab-parallel.
        ids: ``[..., k]`` int64, ids in ``[0, V_local * tp)``.
    Returns:
        ``[..., k]``, replicated.
    """
    v_local = x.shape[-1]
    local, in_shard = shard_ids(ids, tp_rank(tp_group) * v_local, v_local,
                                tp_world_size(tp_group) > 1)
    picked = x.gather(-1, local)
    if in_shard is not None:
        picked = torch.where(in_shard, picked, torch.zeros_like(picked))
    return all_reduce_sum(picked, tp_group)


def vocab_select(x: torch.Tensor, target: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``x[..., target]`` where ``target`` ``[...]`` indexes the full vocabulary, differentiable
    (:func:`vocab_gather` of one id per position).

    Args:
        x: ``[..., V_local]``, vocab-parallel.
        target: ``[...]`` int64, ids in ``[0, V_local * tp)``.
    Returns:
        ``[...]``, replicated.
    """
    return vocab_gather(x, target.unsqueeze(-1), tp_group).squeeze(-1)


@torch.no_grad()
def vocab_top_k(x: torch.Tensor, k: int, tp_group: ProcessGroup, sorted: bool = True):
    """The ``k`` largest entries of each row over the whole (split) vocabulary, not
    differentiable: each rank's own top ``min(k, V_local)``, all-gathered (``k`` values and ids
    per rank and position, never the vocabulary), then the top ``k`` of those.

    Args:
        x: ``[..., V_local]``, vocab-parallel.
        k: entries per row, ``<= V_local * tp``.
        sorted: in descending order of value (False: any order, faster on CPU).
    Returns:
        ``(values, ids)``, each ``[..., k]``, ids of the full vocabulary, replicated.
    """
    v_local = x.shape[-1]
    tp = tp_world_size(tp_group)
    if not 1 <= k <= v_local * tp:
        raise ValueError(f"top k={k}: expected 1 <= k <= the vocabulary ({v_local * tp})")
    values, ids = x.topk(min(k, v_local), dim=-1, sorted=sorted)
    ids = ids + tp_rank(tp_group) * v_local
    if tp == 1:
        return values, ids
    all_values = [torch.empty_like(values) for _ in range(tp)]
    all_ids = [torch.empty_like(ids) for _ in range(tp)]
    dist.all_gather(all_values, values.contiguous(), group=tp_group)
    dist.all_gather(all_ids, ids.contiguous(), group=tp_group)
    values, pick = torch.cat(all_values, dim=-1).topk(k, dim=-1, sorted=sorted)
    return values, torch.cat(all_ids, dim=-1).gather(-1, pick)
