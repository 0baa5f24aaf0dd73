"""The fused chunked CE + KL against the unfused path (cross_entropy + closed_form_kl), and
against float64 formulas written out directly: values and the gradient w.r.t. the LM logits, at
TP=1 and TP=2, for chunk sizes that do and do not divide the tokens, and at extreme logits."""

import pytest
import torch
import torch.nn.functional as F

from nemo_acft.nado import closed_form_kl, cross_entropy
from nemo_acft.nado.fused import fused_ce_kl
from tests.dist_utils import run_workers


def _inputs(n=37, v=50, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    g_ce = torch.rand(n, generator=g, dtype=torch.float64)
    g_kl = torch.rand(n, generator=g, dtype=torch.float64) * 4
    return z, s, y, g_ce, g_kl


def _reference(z, s, y):
    z, s = z.double(), s.double()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(z + F.logsigmoid(s), -1)
    ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)  # 0 log 0 = 0
    log_z = torch.logsumexp(log_p + F.logsigmoid(s), -1)
    return ce, kl, log_z, log_p.exp(), log_q.exp()


def _fused_grad(z, s, y, g_ce, g_kl, chunk, tp_group=None, compile=False):
    z = z.clone().requires_grad_(True)
    ce, kl, log_z = fused_ce_kl(z, s, y, tp_group, chunk_tokens=chunk, compile=compile)
    ((ce * g_ce.to(ce.dtype)).sum() + (kl * g_kl.to(kl.dtype)).sum()).backward()
    return ce.detach(), kl.detach(), log_z, z.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 4096])
def test_fused_equals_float64_formulas_and_unfused(chunk):
    z, s, y, g_ce, g_kl = _inputs()
    ce, kl, log_z, grad = _fused_grad(z, s, y, g_ce, g_kl, chunk)
    r_ce, r_kl, r_log_z, p, q = _reference(z, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_z.double(), r_log_z, rtol=1e-5, atol=1e-5)
    onehot = F.one_hot(y, z.shape[-1]).double()
    expected = g_ce[:, None] * (p - onehot) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)
    # the unfused path of the model (autograd through cross_entropy and closed_form_kl)
    zu = z.clone().requires_grad_(True)
    u_kl, u_log_z = closed_form_kl(zu, s, return_log_z=True)
    u_ce = cross_entropy(zu, y)
    ((u_ce * g_ce.float()).sum() + (u_kl * g_kl.float()).sum()).backward()
    torch.testing.assert_close(ce, u_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, u_kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, zu.grad, rtol=1e-5, atol=1e-5)


def test_fused_at_extreme_logits():
    """Logits of ±1e4, R ≈ 0 everywhere (s = −1e4), R ≈ 1, and a token ruled out (s = −inf)."""
    z, s, y, g_ce, g_kl = _inputs(n=6, v=40, scale=1.0, seed=3)
    z[0] *= 1e4
    s[1] = -1e4 + s[1]
    s[2] = 1e4 + s[2]
    s[3, 5] = float("-inf")
    z[4, y[4]] = -1e4  # the target is very unlikely: CE ≈ 1e4
    ce, kl, log_z, grad = _fused_grad(z, s, y, g_ce, g_kl, chunk=4)
    assert torch.isfinite(ce).all() and torch.isfinite(kl).all() and torch.isfinite(grad).all()
    r_ce, r_kl, r_log_z, p, q = _reference(z, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-4, atol=1e-5)
    onehot = F.one_hot(y, z.shape[-1]).double()
    expected = g_ce[:, None] * (p - onehot) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)
    assert (kl >= 0).all()


def test_fused_bf16_logits_accumulate_in_fp32():
    z, s, y, g_ce, g_kl = _inputs(dtype=torch.bfloat16)
    ce, kl, _, grad = _fused_grad(z, s, y, g_ce, g_kl, chunk=5)
    assert ce.dtype == kl.dtype == torch.float32 and grad.dtype == torch.bfloat16
    r_ce, r_kl, *_ = _reference(z, s, y)  # the same bf16 values, in float64
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-5, atol=1e-6)


def _tp_worker(rank, world_size, chunk):
    from nemo_acft.models import init_distributed, tp_group

    init_distributed(tp=world_size, pp=1, seed=0)
    z, s, y, g_ce, g_kl = _inputs(n=21, v=48)
    v_local = 48 // world_size
    sl = slice(rank * v_local, (rank + 1) * v_local)
    ce, kl, log_z, grad = _fused_grad(z[:, sl].contiguous(), s[:, sl].contiguous(), y, g_ce,
                                      g_kl, chunk, tp_group())
    return {"ce": ce, "kl": kl, "log_z": log_z, "grad": grad}


def test_fused_tp2_equals_tp1():
    (one,) = run_workers(_tp_worker, 1, 8)
    two = run_workers(_tp_worker, 2, 8)
    for r in range(2):
        for key in ("ce", "kl", "log_z"):
            torch.testing.assert_close(two[r][key], one[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([two[0]["grad"], two[1]["grad"]], -1), one["grad"],
                               rtol=1e-5, atol=1e-6)


def test_fused_input_errors():
    z, s, y, *_ = _inputs(n=4, v=6)
    with pytest.raises(ValueError, match="same shape"):
        fused_ce_kl(z, s[:, :5], y)
    with pytest.raises(ValueError, match="targets"):
        fused_ce_kl(z, s, y[:3])
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        fused_ce_kl(z, s, y, chunk_tokens=0)


def test_projection_inside_the_loss_equals_materialised_logits():
    """fused_ce_kl_from_hidden (s = hidden @ W.T per chunk, never whole) against the float64
    formulas on the materialised s; no gradient reaches the hidden states or the weight."""
    from nemo_acft.nado.fused import fused_ce_kl_from_hidden

    z, _, y, g_ce, g_kl = _inputs(n=29, v=40)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(29, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    zz = z.clone().requires_grad_(True)
    ce, kl, log_z = fused_ce_kl_from_hidden(zz, hidden, weight, y, chunk_tokens=6)
    ((ce * g_ce.float()).sum() + (kl * g_kl.float()).sum()).backward()
    s = (hidden.double() @ weight.double().t()).detach()
    r_ce, r_kl, r_log_z, p, q = _reference(z, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_z.double(), r_log_z, rtol=1e-5, atol=1e-5)
    expected = g_ce[:, None] * (p - F.one_hot(y, 40).double()) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(zz.grad.double(), expected, rtol=1e-4, atol=1e-5)
    assert hidden.grad is None and weight.grad is None


# --- q from a reference (model.acft.reference: frozen | base) ------------------------------


def _ref_formulas(z, zr, s, y):
    """float64 brute force of KL(q_ref ‖ p), q_ref = softmax(zr + logσ(s)), and Z_ref."""
    z, zr, s = z.double(), zr.double(), s.double()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(zr + F.logsigmoid(s), -1)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    log_z = torch.logsumexp(torch.log_softmax(zr, -1) + F.logsigmoid(s), -1)
    ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return ce, kl, log_z, log_p.exp(), q


@pytest.mark.parametrize("path", ["unfused", "fused", "hidden"])
def test_reference_kl_equals_brute_force(path):
    """KL(q_ref ‖ p) with q_ref from a reference's logits: values, Z_ref and the gradient
    p − q_ref, by the unfused autograd path, the fused pass and the projection inside it."""
    from nemo_acft.nado import closed_form_kl
    from nemo_acft.nado.fused import fused_ce_kl_from_hidden

    z, s, y, g_ce, g_kl = _inputs(n=29, v=40, seed=5)
    g = torch.Generator().manual_seed(11)
    h_ref, w_ref = torch.randn(29, 16, generator=g), torch.randn(40, 16, generator=g)
    h_s, w_s = torch.randn(29, 16, generator=g), torch.randn(40, 16, generator=g)
    zr = (h_ref.double() @ w_ref.double().t()).float()
    if path == "hidden":
        s = (h_s.double() @ w_s.double().t()).float()
    zz = z.clone().requires_grad_(True)
    if path == "unfused":
        kl, log_z = closed_form_kl(zz, s, return_log_z=True, ref_lm_logits=zr)
        ce = cross_entropy(zz, y)
    elif path == "fused":
        ce, kl, log_z = fused_ce_kl(zz, s, y, chunk_tokens=6, ref_lm_logits=zr)
    else:
        ce, kl, log_z = fused_ce_kl_from_hidden(zz, h_s, w_s, y, chunk_tokens=6,
                                                ref_hidden=h_ref, ref_weight=w_ref)
    ((ce * g_ce.float()).sum() + (kl * g_kl.float()).sum()).backward()
    r_ce, r_kl, r_log_z, p, q = _ref_formulas(z, zr, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_z.double(), r_log_z, rtol=1e-5, atol=1e-5)
    expected = g_ce[:, None] * (p - F.one_hot(y, 40).double()) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(zz.grad.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["unfused", "fused"])
def test_reference_kl_is_minimised_at_p_equal_q_ref(path):
    """At z = log q_ref (up to a constant per row) KL(q_ref ‖ p) = 0 with zero gradient; any
    perturbation of z that changes p increases it (KL ≥ 0, Gibbs)."""
    from nemo_acft.nado import closed_form_kl

    _, s, y, *_ = _inputs(n=16, v=30, seed=8)
    g = torch.Generator().manual_seed(3)
    zr = torch.randn(16, 30, generator=g) * 2
    log_q = torch.log_softmax(zr.double() + F.logsigmoid(s.double()), -1)

    def kl_grad(z):
        z = z.clone().requires_grad_(True)
        if path == "unfused":
            kl = closed_form_kl(z, s, ref_lm_logits=zr)
        else:
            kl = fused_ce_kl(z, s, y, chunk_tokens=5, ref_lm_logits=zr)[1]
        kl.sum().backward()
        return kl.detach(), z.grad

    at_q = (log_q + torch.randn(16, 1, generator=g, dtype=torch.float64) * 5).float()
    kl, grad = kl_grad(at_q)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-5
    for scale in (0.01, 0.3, 3.0):
        kl2, _ = kl_grad(at_q + scale * torch.randn(16, 30, generator=g))
        assert (kl2 > kl + 1e-7).all()


def _tp_ref_worker(rank, world_size):
    from nemo_acft.models import init_distributed, tp_group

    init_distributed(tp=world_size, pp=1, seed=0)
    z, s, y, g_ce, g_kl = _inputs(n=21, v=48, seed=2)
    zr = _inputs(n=21, v=48, seed=4)[0]
    v_local = 48 // world_size
    sl = slice(rank * v_local, (rank + 1) * v_local)
    out = {}
    for path in ("unfused", "fused"):
        zz = z[:, sl].contiguous().requires_grad_(True)
        if path == "fused":
            ce, kl, log_z = fused_ce_kl(zz, s[:, sl].contiguous(), y, tp_group(), 8,
                                        ref_lm_logits=zr[:, sl].contiguous())
        else:
            from nemo_acft.nado import closed_form_kl
            kl, log_z = closed_form_kl(zz, s[:, sl].contiguous(), tp_group(), True,
                                       ref_lm_logits=zr[:, sl].contiguous())
            ce = cross_entropy(zz, y, tp_group())
        ((ce * g_ce.float()).sum() + (kl * g_kl.float()).sum()).backward()
        out[path] = {"kl": kl.detach(), "log_z": log_z, "grad": zz.grad}
    return out


def test_reference_kl_tp2_equals_brute_force():
    two = run_workers(_tp_ref_worker, 2)
    z, s, y, g_ce, g_kl = _inputs(n=21, v=48, seed=2)
    zr = _inputs(n=21, v=48, seed=4)[0]
    r_ce, r_kl, r_log_z, p, q = _ref_formulas(z, zr, s, y)
    expected = g_ce[:, None] * (p - F.one_hot(y, 48).double()) + g_kl[:, None] * (p - q)
    for path in ("unfused", "fused"):
        for r in range(2):
            torch.testing.assert_close(two[r][path]["kl"].double(), r_kl, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(two[r][path]["log_z"].double(), r_log_z, rtol=1e-5,
                                       atol=1e-5)
        grad = torch.cat([two[0][path]["grad"], two[1][path]["grad"]], -1)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_compiled_chunks_equal_float64_formulas_at_ordinary_and_extreme_logits():
    """``compile=True`` (the chunk's forward and backward as torch.compile-d functions) against
    the float64 formulas: ordinary logits, then the extremes of the eager test (±1e4 logits,
    R ≈ 0 and ≈ 1, a token ruled out), a remainder chunk included (8 tokens in chunks of 6)."""
    z, s, y, g_ce, g_kl = _inputs(n=8, v=40, scale=1.0, seed=3)
    z[0] *= 1e4
    s[1] = -1e4 + s[1]
    s[2] = 1e4 + s[2]
    s[3, 5] = float("-inf")
    z[4, y[4]] = -1e4
    z[6:] *= 3.0  # two ordinary rows
    ce, kl, log_z, grad = _fused_grad(z, s, y, g_ce, g_kl, chunk=6, compile=True)
    assert torch.isfinite(ce).all() and torch.isfinite(kl).all() and torch.isfinite(grad).all()
    r_ce, r_kl, r_log_z, p, q = _reference(z, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_z.double(), r_log_z, rtol=1e-5, atol=1e-4)
    onehot = F.one_hot(y, z.shape[-1]).double()
    expected = g_ce[:, None] * (p - onehot) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)
    from nemo_acft.nado.fused import _COMPILED, _bwd_chunk_tp1, _fwd_chunk_tp1
    assert {_fwd_chunk_tp1, _bwd_chunk_tp1} <= set(_COMPILED)  # the compiled path ran


def test_compiled_reference_chunks_equal_float64_formulas_at_ordinary_and_extreme_logits():
    """``compile=True`` with a reference (q_ref from its logits, the default ``reference:
    frozen``) against the float64 formulas: ordinary rows, logits of ±1e4 in the model and in
    the reference, a reference row offset by 3e4, R ≈ 0 and ≈ 1, a token the head rules out, a
    remainder chunk."""
    from nemo_acft.nado.fused import _COMPILED, _bwd_chunk_tp1_ref, _fwd_chunk_tp1_ref

    z, s, y, g_ce, g_kl = _inputs(n=8, v=40, scale=1.0, seed=6)
    zr = _inputs(n=8, v=40, scale=2.0, seed=7)[0]
    z[0] *= 1e4
    zr[1] *= 1e4  # q_ref one-hot
    zr[6] += 3e4  # a large offset: q_ref ordinary, its O(1) part kept only shift by shift
    s[2] = -1e4 + s[2]
    s[3] = 1e4 + s[3]
    s[4, 5] = float("-inf")
    zr[5, y[5]] = -1e4
    zz = z.clone().requires_grad_(True)
    ce, kl, log_z = fused_ce_kl(zz, s, y, chunk_tokens=6, ref_lm_logits=zr, compile=True)
    ((ce * g_ce.float()).sum() + (kl * g_kl.float()).sum()).backward()
    assert {_fwd_chunk_tp1_ref, _bwd_chunk_tp1_ref} <= set(_COMPILED)  # the compiled path ran
    assert torch.isfinite(kl).all() and torch.isfinite(zz.grad).all()
    r_ce, r_kl, r_log_z, p, q = _ref_formulas(z, zr, s, y)
    torch.testing.assert_close(ce.double(), r_ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double(), r_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_z.double(), r_log_z, rtol=1e-5, atol=1e-4)
    expected = g_ce[:, None] * (p - F.one_hot(y, 40).double()) + g_kl[:, None] * (p - q)
    torch.testing.assert_close(zz.grad.double(), expected, rtol=1e-4, atol=1e-5)
