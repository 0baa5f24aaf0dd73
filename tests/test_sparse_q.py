"""The reference's q as top-k + a tail bucket, and the LM loss against it (nado/sparse.py),
against float64 brute force of the formulas in the module docstring, at TP 1 and over a real
2-process gloo group."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_acft.nado import closed_form_kl
from nemo_acft.nado.sparse import SparseQ, fused_ce_sparse_kl, sparse_reference_q
from nemo_acft.nado.vocab_parallel import vocab_top_k
from tests.dist_utils import run_workers

N, V = 14, 12


def _inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    zr = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (N,), generator=g)
    return z, zr, s, y


def _brute_q(zr, s, k):
    """Dense log q, log Z and the ids of the k largest max(log p_ref, log q) (float64)."""
    log_p = torch.log_softmax(zr, -1)
    log_q = torch.log_softmax(log_p + F.logsigmoid(s), -1)
    log_z = torch.logsumexp(log_p + F.logsigmoid(s), -1)
    return log_q, log_z, torch.maximum(log_p, log_q).topk(k, -1).indices


def _brute_loss(z, y, q: SparseQ):
    """CE and the coarsened KL from log_softmax and a masked logsumexp (float64)."""
    log_p = torch.log_softmax(z, -1)
    ids = q.ids.long()
    kept = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, ids, True)
    log_p_rest = torch.logsumexp(log_p.masked_fill(kept, float("-inf")), -1)
    lq, lr = q.log_q.double(), q.log_rest.double()
    kl = (lq.exp() * (lq - log_p.gather(-1, ids))).sum(-1)
    kl = kl + torch.where(lr > float("-inf"), lr.exp() * (lr - log_p_rest), torch.zeros_like(lr))
    return -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1), kl


@pytest.mark.parametrize("k", [V, 5, 1])
def test_sparse_q_and_loss_equal_float64_brute_force(k):
    z, zr, s, y = _inputs()
    q = sparse_reference_q(zr, s, k)
    log_q, log_z, ids = _brute_q(zr, s, k)
    assert torch.equal(q.ids.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(q.log_q.double(), log_q.gather(-1, q.ids), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.log_z.double(), log_z, rtol=1e-6, atol=1e-6)
    rest = 1 - log_q.gather(-1, q.ids).exp().sum(-1)
    if k == V:
        assert torch.isinf(q.log_rest).all()
    else:
        torch.testing.assert_close(q.log_rest.double().exp(), rest, rtol=1e-5, atol=1e-9)
    w = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    got_z = z.clone().requires_grad_()
    ce, kl = fused_ce_sparse_kl(got_z, y, q, chunk_tokens=5)  # chunks of 5, 5, 4
    (ce * w + 0.7 * kl * w.flip(0)).sum().backward()
    ref_z = z.clone().requires_grad_()
    ce_b, kl_b = _brute_loss(ref_z, y, q)
    (ce_b * w + 0.7 * kl_b * w.flip(0)).sum().backward()
    torch.testing.assert_close(ce, ce_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl, kl_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_z.grad, ref_z.grad, rtol=1e-10, atol=1e-12)
    full = closed_form_kl(z, s, None, ref_lm_logits=zr)
    if k == V:  # the whole vocabulary: the full KL(q_ref ‖ p)
        torch.testing.assert_close(kl, full, rtol=1e-5, atol=1e-6)
    else:  # coarsening never raises a KL
        assert (kl <= full + 1e-9).all()


def test_sparse_loss_at_extreme_logits_and_fp32():
    """Logits of ±1e4 and a head that rules tokens out (s = −1e4): finite CE and KL, the
    gradient's rows sum to g_ce·0 + g_kl·0 (p − q sums to 0), and the fp32 pass equals the
    float64 brute force to fp32 precision."""
    z, zr, s, y = _inputs(seed=3)
    z[0, 3], z[1] = 1e4, z[1] * 1e3
    zr[2, 5], s[3, :6] = 1e4, -1e4
    for k in (V, 4):
        q = sparse_reference_q(zr.float(), s.float(), k)
        got = z.float().clone().requires_grad_()
        ce, kl = fused_ce_sparse_kl(got, y, q, chunk_tokens=4)
        (ce + kl).sum().backward()
        assert torch.isfinite(ce).all() and torch.isfinite(kl).all()
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double().sum(-1), torch.zeros(N, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        ref = z.clone().requires_grad_()
        ce_b, kl_b = _brute_loss(ref, y, q)
        (ce_b + kl_b).sum().backward()
        torch.testing.assert_close(ce.double(), ce_b, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kl.double(), kl_b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_sparse_input_errors():
    z, zr, s, y = _inputs()
    q = sparse_reference_q(zr, s, 3)
    with pytest.raises(ValueError, match=r"sparse q ids \(14, 3\).*do not match the tokens \(13,\)"):
        fused_ce_sparse_kl(z[:13], y[:13], q)
    with pytest.raises(ValueError, match=r"top k=13: expected 1 <= k <= the vocabulary \(12\)"):
        sparse_reference_q(zr, s, V + 1)


def _tp_worker(rank, world_size, k):
    dist.init_process_group("gloo")
    z, zr, s, y = _inputs(seed=5)
    shard = slice(rank * V // world_size, (rank + 1) * V // world_size)
    g = dist.group.WORLD
    values, ids = vocab_top_k(zr[:, shard], k, g)
    q = sparse_reference_q(zr[:, shard], s[:, shard], k, g)
    zl = z[:, shard].clone().requires_grad_()
    ce, kl = fused_ce_sparse_kl(zl, y, q, g, chunk_tokens=4)
    (ce + 0.5 * kl).sum().backward()
    dist.destroy_process_group()
    return {"values": values, "ids": ids, "q": q, "ce": ce.detach(), "kl": kl.detach(),
            "grad": zl.grad}


def _by_id(q: SparseQ) -> SparseQ:
    order = q.ids.argsort(-1)
    return SparseQ(q.ids.gather(-1, order), q.log_q.gather(-1, order), q.log_rest, q.log_z)


@pytest.mark.parametrize("k", [3, V // 2 + 1])
def test_tp2_equals_single_process(k):
    """k below and above a shard's size (6): the candidates' all-gather and merge."""
    z, zr, s, y = _inputs(seed=5)
    values, ids = zr.topk(k, -1)
    q = sparse_reference_q(zr, s, k)
    zz = z.clone().requires_grad_()
    ce, kl = fused_ce_sparse_kl(zz, y, q, chunk_tokens=4)
    (ce + 0.5 * kl).sum().backward()
    shards = run_workers(_tp_worker, 2, k)
    for r in shards:
        torch.testing.assert_close(r["values"], values)
        assert torch.equal(r["ids"], ids)
        for a, b in zip(_by_id(r["q"]), _by_id(q)):  # the kept ids in any order
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["ce"], ce, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["kl"], kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["grad"] for r in shards], -1), zz.grad, rtol=1e-10,
                               atol=1e-12)
