"""The math layer against independent references: brute-force enumeration of a tiny LM,
probability-space loops, finite differences, and extreme inputs."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_acft.nado import closed_form_kl, guided_log_probs, nado_loss

F64 = torch.float64
V, L = 4, 3  # vocabulary and sequence length of the enumerable model


class TinyLM:
    """An enumerable autoregressive model: a table of random logits per prefix, and an oracle
    over full sequences. R(prefix) is computed exactly by enumerating every continuation."""

    def __init__(self, seed: int, soft_oracle: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.logits = {
            prefix: 2.0 * torch.randn(V, dtype=F64, generator=g)
            for k in range(L) for prefix in itertools.product(range(V), repeat=k)
        }
        seqs = list(itertools.product(range(V), repeat=L))
        if soft_oracle:
            vals = torch.rand(len(seqs), dtype=F64, generator=g) * 0.9 + 0.05
        else:
            vals = (torch.rand(len(seqs), generator=g) < 0.4).to(F64)
            vals[0] = 1.0  # Pr(C) > 0
        self.oracle = dict(zip(seqs, vals.tolist()))
        self._r = {}

    def p(self, prefix):
        return torch.softmax(self.logits[prefix], -1)

    def R(self, prefix):
        """Pr_{x ~ p}[C(x) = 1 | prefix], by enumeration."""
        if len(prefix) == L:
            return self.oracle[prefix]
        if prefix not in self._r:
            p = self.p(prefix)
            self._r[prefix] = sum(p[v].item() * self.R(prefix + (v,)) for v in range(V))
        return self._r[prefix]

    def prob(self, seq):
        return math.prod(self.p(seq[:k])[seq[k]].item() for k in range(L))

    def nado_logits(self, prefix):
        """Exact NADO logits: s[v] = logit R(prefix ∘ v) (±inf where R is 0 or 1)."""
        r = torch.tensor([self.R(prefix + (v,)) for v in range(V)], dtype=F64)
        return torch.logit(r)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guided_q_is_the_conditioned_distribution(seed):
    """Π_i q(x_i | x_<i) = p(x) C(x) / Pr_p(C) for every sequence, with exact R."""
    lm = TinyLM(seed)
    pr_c = lm.R(())
    for seq in itertools.product(range(V), repeat=L):
        log_q = 0.0
        for k in range(L):
            if log_q == -math.inf:  # an earlier step already had q = 0
                break
            prefix = seq[:k]
            lq = guided_log_probs(lm.logits[prefix], lm.nado_logits(prefix))
            log_q += lq[seq[k]].item()
        expected = lm.prob(seq) * lm.oracle[seq] / pr_c
        assert math.exp(log_q) == pytest.approx(expected, rel=1e-9, abs=1e-15), seq


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_kl_matches_direct_sum(seed):
    """KL at each reachable prefix equals Σ q log(q/p) with q = p·R(·∘v)/R(prefix) by
    enumeration, log Z equals log R(prefix), and d KL / d z = p − q."""
    lm = TinyLM(seed)
    checked = 0
    for prefix in lm.logits:
        if lm.R(prefix) == 0.0:
            continue
        p = lm.p(prefix)
        q = torch.tensor([p[v].item() * lm.R(prefix + (v,)) / lm.R(prefix) for v in range(V)],
                         dtype=F64)
        direct = sum(q[v] * math.log(q[v] / p[v]) for v in range(V) if q[v] > 0)
        z = lm.logits[prefix].clone().requires_grad_()
        kl, log_z = closed_form_kl(z, lm.nado_logits(prefix), return_log_z=True)
        assert kl.item() == pytest.approx(float(direct), rel=1e-9, abs=1e-12)
        assert log_z.item() == pytest.approx(math.log(lm.R(prefix)), rel=1e-9)
        kl.backward()
        torch.testing.assert_close(z.grad, p - q, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked > 5


def test_consistency_vanishes_for_exact_R():
    """With exact R (soft oracle, so every logit is finite) the forward-consistency part of the
    NADO loss is zero along every sampled path: R(x_<=i) = Σ_v p(v|x_<=i) R(x_<=i ∘ v)."""
    lm = TinyLM(3, soft_oracle=True)
    seqs = list(itertools.product(range(V), repeat=L))
    # Model input is [BOS=prefix ()] + x_1..x_{L-1}; position i predicts x_{i+1}.
    z = torch.stack([torch.stack([lm.logits[s[:k]] for k in range(L)]) for s in seqs])
    s_ = torch.stack([torch.stack([lm.nado_logits(s[:k]) for k in range(L)]) for s in seqs])
    tokens = torch.tensor(seqs)
    labels = torch.tensor([lm.oracle[s] for s in seqs], dtype=F64)
    _, parts = nado_loss(z, s_, tokens, labels, torch.ones_like(tokens), alpha=1.0)
    assert parts["cons"].item() == pytest.approx(0.0, abs=1e-12)
    assert parts["ce"].item() > 0.1  # the CE part is not trivially zero


def _nado_loss_reference(z, s, tokens, labels, mask, alpha, weights):
    """Probability-space loops: the formula of METHOD.md written out term by term."""
    b_size, s_len, _ = z.shape
    labelled = [not math.isnan(c) for c in labels.tolist()]
    w = [weights[b].item() if labelled[b] else 0.0 for b in range(b_size)]
    w_norm = sum(labelled) / sum(w)
    ce_sum = cons_sum = n_tok = 0.0
    for b in range(b_size):
        if not labelled[b]:
            continue
        c, wb = labels[b].item(), w[b] * w_norm
        for i in range(s_len):
            if not mask[b, i]:
                continue
            n_tok += 1
            a = torch.sigmoid(s[b, i, tokens[b, i]]).item()
            ce_sum += -wb * (c * math.log(a) + (1 - c) * math.log(1 - a))
            if i + 1 < s_len and mask[b, i + 1]:
                r = (torch.softmax(z[b, i + 1], -1) * torch.sigmoid(s[b, i + 1])).sum().item()
                cons_sum += wb * (a * math.log(a / r) + (1 - a) * math.log((1 - a) / (1 - r)))
    return (ce_sum + alpha * cons_sum) / n_tok, ce_sum / n_tok, cons_sum / n_tok


def _random_nado_batch(seed, b=3, s=5, v=7, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(b, s, v, dtype=dtype, generator=g)
    sl = 2.0 * torch.randn(b, s, v, dtype=dtype, generator=g)
    tokens = torch.randint(0, v, (b, s), generator=g)
    labels = torch.tensor([1.0, 0.3, float("nan")] + [0.0] * (b - 3), dtype=dtype)[:b]
    mask = torch.ones(b, s)
    mask[0, :2] = 0  # prompt positions
    mask[1, -1] = 0  # padding
    weights = torch.rand(b, dtype=dtype, generator=g) + 0.5
    return z, sl, tokens, labels, mask, weights


def test_nado_loss_matches_reference():
    z, s, tokens, labels, mask, weights = _random_nado_batch(0)
    loss, parts = nado_loss(z, s, tokens, labels, mask, alpha=0.7, weights=weights)
    ref_loss, ref_ce, ref_cons = _nado_loss_reference(z, s, tokens, labels, mask, 0.7, weights)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert parts["ce"].item() == pytest.approx(ref_ce, rel=1e-10)
    assert parts["cons"].item() == pytest.approx(ref_cons, rel=1e-10)
    assert parts["num_tokens"].item() == 3 + 4  # the unlabelled sample is masked


def test_nado_loss_without_consistency_is_the_reference_ce():
    """α = 0 (the GPT-2 prototype's loss) skips the consistency term: the loss and its gradient
    equal the brute-force CE's, ``cons`` says "not computed" (NaN), and LM logits that would
    make the consistency term non-finite (−inf, where 0 · inf would be NaN) do not reach it."""
    z, s, tokens, labels, mask, weights = _random_nado_batch(2)
    s.requires_grad_()
    loss, parts = nado_loss(z, s, tokens, labels, mask, alpha=0.0, weights=weights)
    _, ref_ce, _ = _nado_loss_reference(z, s.detach(), tokens, labels, mask, 0.0, weights)
    assert loss.item() == pytest.approx(ref_ce, rel=1e-10)
    assert math.isnan(parts["cons"].item())
    loss.backward()
    s2 = s.detach().clone().requires_grad_()
    # the full path with a vanishing consistency weight: the CE's gradient, computed the long way
    ce_only, _ = nado_loss(z, s2, tokens, labels, mask, alpha=1e-300, weights=weights)
    ce_only.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-9, atol=1e-12)
    z_bad = z.clone()
    z_bad[0, 3, :] = -math.inf  # no finite LM logit at one position
    loss_bad, _ = nado_loss(z_bad, s.detach(), tokens, labels, mask, alpha=0.0, weights=weights)
    assert loss_bad.item() == pytest.approx(ref_ce, rel=1e-10)
    assert not math.isfinite(nado_loss(z_bad, s.detach(), tokens, labels, mask, alpha=1.0,
                                       weights=weights)[0].item())


def test_nado_loss_gradcheck():
    z, s, tokens, labels, mask, weights = _random_nado_batch(1, b=3, s=4, v=5)
    z.requires_grad_()
    s.requires_grad_()

    def f(z, s):
        return nado_loss(z, s, tokens, labels, mask, alpha=0.5, weights=weights)[0]

    assert torch.autograd.gradcheck(f, (z, s))


def test_closed_form_kl_gradcheck():
    """Finite differences of the value against the custom backward. The KL treats q as a
    constant, so the check holds q fixed: s is chosen as a function of z with σ(s) ∝ q0 / e^z,
    which makes q ≡ q0 at every perturbed z and the value exactly KL(q0 || p(z))."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 6, dtype=F64, generator=g)
    q0 = torch.softmax(torch.randn(3, 6, dtype=F64, generator=g), -1)
    c = (z0 - q0.log()).amin(-1, keepdim=True) - 1.0  # keeps log σ(s) < 0 near z0

    def kl_at_fixed_q(z):
        log_sig = q0.log() - z + c
        s = log_sig - torch.log(-torch.expm1(log_sig))  # logit of exp(log_sig)
        return closed_form_kl(z, s)

    z = z0.clone().requires_grad_()
    assert torch.autograd.gradcheck(kl_at_fixed_q, (z,))
    expected = (q0 * (q0.log() - torch.log_softmax(z0, -1))).sum(-1)
    torch.testing.assert_close(kl_at_fixed_q(z0), expected, rtol=1e-10, atol=1e-12)


def test_closed_form_kl_gradient_is_p_minus_q_and_stops_at_nado():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 11, dtype=F64, generator=g, requires_grad=True)
    s = torch.randn(2, 3, 11, dtype=F64, generator=g, requires_grad=True)
    upstream = torch.rand(2, 3, dtype=F64, generator=g)
    (closed_form_kl(z, s) * upstream).sum().backward()
    p = torch.softmax(z.detach(), -1)
    q = torch.softmax(z.detach() + F.logsigmoid(s.detach()), -1)
    torch.testing.assert_close(z.grad, upstream.unsqueeze(-1) * (p - q), rtol=1e-12, atol=1e-14)
    assert s.grad is None or torch.count_nonzero(s.grad) == 0


def test_low_precision_inputs_accumulate_in_fp32():
    g = torch.Generator().manual_seed(2)
    z = (3 * torch.randn(4, 1000, generator=g)).bfloat16()
    s = (3 * torch.randn(4, 1000, generator=g)).bfloat16()
    kl = closed_form_kl(z, s)
    assert kl.dtype == torch.float32
    ref = closed_form_kl(z.double(), s.double())
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)


_scales = st.sampled_from([1.0, 30.0, 1e3, 1e4])


@settings(max_examples=40, deadline=None)
@given(z_scale=_scales, s_scale=_scales, s_shift=st.sampled_from([-1e4, -40.0, 0.0, 40.0, 1e4]),
       seed=st.integers(0, 10_000))
def test_extreme_logits_stay_finite(z_scale, s_scale, s_shift, seed):
    """Logits up to ±1e4 and R near 0 or 1 (s_shift): finite, correctly-signed values and
    finite gradients, in fp32."""
    g = torch.Generator().manual_seed(seed)
    z = (z_scale * torch.randn(2, 4, 16, generator=g)).requires_grad_()
    s = (s_shift + s_scale * torch.randn(2, 4, 16, generator=g)).requires_grad_()
    kl, log_z = closed_form_kl(z, s, return_log_z=True)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert torch.isfinite(log_z).all() and (log_z <= 1e-6).all()
    kl.sum().backward()
    assert torch.isfinite(z.grad).all()
    z.grad = None
    tokens = torch.randint(0, 16, (2, 4), generator=g)
    loss, parts = nado_loss(z, s, tokens, torch.tensor([1.0, 0.0]), torch.ones(2, 4))
    assert torch.isfinite(loss) and parts["cons"] >= -1e-4
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(s.grad).all()
    lq = guided_log_probs(z, s)
    assert torch.isfinite(lq).all()
    torch.testing.assert_close(lq.exp().sum(-1), torch.ones(2, 4), rtol=0, atol=1e-4)


def test_large_vocabulary():
    """A 50k vocabulary with ±1e4 logits: finite, and KL / log Z match an fp64 computation."""
    g = torch.Generator().manual_seed(7)
    z = (1e4 * torch.randn(2, 3, 50_000, generator=g)).requires_grad_()
    s = 1e4 * torch.randn(2, 3, 50_000, generator=g)
    kl, log_z = closed_form_kl(z, s, return_log_z=True)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(z.grad).all()
    ref_kl, ref_log_z = closed_form_kl(z.detach().double(), s.double(), return_log_z=True)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(log_z.double(), ref_log_z, rtol=1e-4, atol=1e-3)
    tokens = torch.randint(0, 50_000, (2, 3), generator=g)
    loss, _ = nado_loss(z.detach(), s.requires_grad_(), tokens, torch.tensor([1.0, 0.0]),
                        torch.ones(2, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_shape_errors_name_the_tensors():
    z = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="nado_logits"):
        nado_loss(z, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                  torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        nado_loss(z, z, torch.zeros(2, 3, dtype=torch.long), torch.ones(2), torch.ones(2, 4))
