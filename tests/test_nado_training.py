"""NADO training against the exact R of an enumerable model, the regularizer against brute
force, and the model's per-token losses against a computation from its raw logits."""

import itertools
import math

import torch
import torch.nn.functional as F

from nemo_acft.nado import kl_penalty
from tests.dist_utils import run_workers

V, L = 4, 4  # 4 tokens, 4 generated positions: 256 continuations, all enumerated
BAD = 3  # the oracle: a continuation satisfies the constraint iff token 3 never appears


def _exact_r(model, prompt):
    """R(prefix ∘ v) for every prefix of the continuation and every v, by enumeration.

    Returns a dict prefix-tuple -> tensor [V] and the probability of each prefix under p.
    """
    seqs = torch.tensor([prompt + list(c) for c in itertools.product(range(V), repeat=L)])
    with torch.no_grad():
        z, _ = model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), None)
    log_p = torch.log_softmax(z[..., :V].double(), -1)  # the padded vocab is exactly V here
    n0 = len(prompt)
    r = {}
    # leaves: a full continuation has R = C
    for seq in seqs.tolist():
        r[tuple(seq)] = float(BAD not in seq[n0:])
    for depth in range(L - 1, -1, -1):
        for seq, lp in zip(seqs.tolist(), log_p):
            prefix = tuple(seq[: n0 + depth])
            if prefix in r:
                continue
            probs = lp[n0 + depth - 1].exp()
            r[prefix] = float(sum(probs[v] * r[prefix + (v,)] for v in range(V)))
    # prefix probabilities under p, for a weighted error
    prob = {tuple(prompt): 1.0}
    for depth in range(L):
        for seq, lp in zip(seqs.tolist(), log_p):
            prefix = tuple(seq[: n0 + depth + 1])
            if prefix not in prob:
                prob[prefix] = prob[prefix[:-1]] * float(lp[n0 + depth - 1, seq[n0 + depth]].exp())
    return r, prob


def _nado_worker(rank, world_size):
    """The engine's oracle-block pieces on a model of V = 4 tokens: sample 6000 continuations,
    label them, 600 ``nado_step``s with NeMo's optimizer, then the head against exact R."""
    from nemo_acft.data import batch_indices
    from nemo_acft.models.generate import SamplingParams
    from nemo_acft.sampling import nado_batch
    from tests.engine_utils import build

    # learned positions: R depends on how many tokens are left, and with rope alone a prefix of
    # repeated tokens looks the same at every position (attention over equal values)
    engine = build(num_layers=1, hidden=32, heads=2, seq=8, head_layers=1,
                   override_vocab_size=V, make_vocab_size_divisible_by=V, init_method_std=0.3,
                   position_embedding_type="learned_absolute", seed=0)
    model = engine.module
    prompt = [0]
    r, prob = _exact_r(model, prompt)
    n = 6000
    samples = engine.generate([prompt] * n, SamplingParams(max_new_tokens=L, seed=1))
    labels = torch.tensor([float(BAD not in samples.continuation(i)) for i in range(n)])
    engine.configure_training("head", {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0,
                                       "betas": [0.9, 0.95],
                                       "sched": {"name": "CosineAnnealing", "warmup_steps": 20,
                                                 "min_lr": 1e-3}}, max_steps=600)
    for step in range(600):
        metrics = engine.nado_step(nado_batch(samples, labels,
                                              batch_indices(n, 256, 0, "t", step)),
                                   alpha=1.0, micro_batch_size=256)
    # compare σ(s_i[v]) with R(prefix ∘ v) at every prefix of length 1..L (prompt included)
    errs, weights, zero_head = [], [], []
    prefixes = [p for p in prob if len(p) < len(prompt) + L]
    x = torch.tensor([list(p) + [0] * (len(prompt) + L - len(p)) for p in prefixes])
    with torch.no_grad():
        z, s = model(x, torch.arange(x.shape[1]).expand_as(x), None)
    for row, p in enumerate(prefixes):
        est = torch.sigmoid(s[row, len(p) - 1, :V].double())
        pv = torch.softmax(z[row, len(p) - 1, :V].double(), -1)
        for v in range(V):
            exact = r[p + (v,)]
            w = prob[p] * float(pv[v])
            errs.append(abs(float(est[v]) - exact))
            zero_head.append(abs(0.5 - exact))
            weights.append(w)
    w = torch.tensor(weights) / sum(weights)
    return {"mae": float((torch.tensor(errs) * w).sum()),
            "mae_zero_head": float((torch.tensor(zero_head) * w).sum()),
            "max_err_likely": max(e for e, wt in zip(errs, weights) if wt > 1e-2),
            "loss": metrics["nado_loss"]}


def test_nado_head_approaches_exact_r_of_an_enumerable_model():
    (out,) = run_workers(_nado_worker, 1)
    print(f"NADO vs exact R: weighted MAE {out['mae']:.4f} (zero head {out['mae_zero_head']:.4f}), "
          f"max error where p(prefix ∘ v) > 1e-2: {out['max_err_likely']:.4f}")
    assert out["mae"] < 0.03, out
    assert out["mae"] < 0.1 * out["mae_zero_head"], out
    assert out["max_err_likely"] < 0.15, out


def test_kl_penalty_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    b, s = 5, 7
    kl = torch.rand(b, s, generator=g, dtype=torch.float64)
    log_z = torch.log(torch.rand(b, s, generator=g, dtype=torch.float64))
    mask = (torch.rand(b, s, generator=g) > 0.2).double()
    dom = torch.tensor([0, 2, 2, 1, 0])
    lam = torch.tensor([0.5, 0.0, 3.0], dtype=torch.float64)
    for delta, min_z in ((None, 0.0), (0.7, 0.0), (0.7, 0.2)):
        pen, parts = kl_penalty(kl, log_z, mask, dom, lam, delta, min_z)
        # two micro-batches with the whole batch's denominators add up to the same
        counts = torch.stack([mask[dom == d].sum() for d in range(3)])
        halves = [kl_penalty(kl[rows], log_z[rows], mask[rows], dom[rows], lam, delta, min_z,
                             domain_tokens=counts) for rows in (slice(0, 2), slice(2, 5))]
        assert math.isclose(float(sum(h[0] for h in halves)), float(pen), rel_tol=1e-12)
        for key in ("kl", "gated_share", "mean_z"):
            assert math.isclose(float(sum(h[1][key] for h in halves)), float(parts[key]),
                                rel_tol=1e-12), key
        expected, gated, tokens = 0.0, 0, 0
        for d in range(3):
            num, den = 0.0, 0.0
            for i in range(b):
                for j in range(s):
                    if dom[i] != d or not mask[i, j]:
                        continue
                    zz = math.exp(float(log_z[i, j]))
                    on = (delta is None or zz < delta) and zz >= min_z
                    num += float(kl[i, j]) * on
                    den += 1
                    gated += not on
                    tokens += 1
            expected += float(lam[d]) * (num / den if den else 0.0)
            ungated = sum(float(kl[i, j]) for i in range(b) for j in range(s)
                          if dom[i] == d and mask[i, j])
            assert math.isclose(float(parts["kl_by_domain"][d]), ungated / den, rel_tol=1e-12)
        assert math.isclose(float(pen), expected, rel_tol=1e-12), (delta, min_z)
        assert math.isclose(float(parts["gated_share"]), gated / tokens, rel_tol=1e-12)


def _token_losses_worker(rank, world_size):
    from nemo_acft.models import tp_group
    from tests.engine_utils import build

    # 48 = the padded size at TP=1 and TP=2 alike, so both build the same weights
    model = build(tp=world_size, num_layers=1, hidden=32, heads=2, seq=8, head_layers=0,
                  override_vocab_size=48, make_vocab_size_divisible_by=8, seed=0).module
    w = model.nado_head.output_layer.weight
    full = torch.randn(w.shape[0] * world_size, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w.copy_(full[rank * w.shape[0]:(rank + 1) * w.shape[0]])
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 48, (3, 8), generator=g)
    y = torch.randint(0, 48, (3, 8), generator=g)
    pos = torch.arange(8).expand_as(x)
    with torch.no_grad():
        z, s = model(x, pos, None)
    out = model(x, pos, None, labels=y)
    grads = torch.autograd.grad((out.lm_loss.sum() + out.kl.sum()), [model.output_layer.weight])
    return {"z": z, "s": s, "lm": out.lm_loss.detach(), "kl": out.kl.detach(),
            "log_z": out.log_z, "y": y, "grad": grads[0], "tp": tp_group() is not None}


def _reference(z, s, y):
    """CE and KL(q‖p) from full-vocabulary logits, written out directly in float64."""
    z, s = z.double(), s.double()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(z + F.logsigmoid(s), -1)
    ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    log_z = torch.logsumexp(log_p + F.logsigmoid(s), -1)
    return ce, kl, log_z


def test_token_losses_equal_a_reference_from_the_raw_logits():
    """Regression: megatron's cross-entropy overwrote the logits in place, so a KL computed after
    it from the same logits was garbage (found by the first end-to-end run)."""
    (one,) = run_workers(_token_losses_worker, 1)
    ce, kl, log_z = _reference(one["z"], one["s"], one["y"])
    torch.testing.assert_close(one["lm"].double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one["kl"].double(), kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one["log_z"].double(), log_z, rtol=1e-5, atol=1e-5)
    two = run_workers(_token_losses_worker, 2)
    for r in range(2):
        torch.testing.assert_close(two[r]["lm"], one["lm"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two[r]["kl"], one["kl"], rtol=1e-4, atol=1e-6)
    # the output layer's gradient, split by vocabulary rows over the two ranks
    torch.testing.assert_close(torch.cat([two[0]["grad"], two[1]["grad"]]), one["grad"],
                               rtol=1e-4, atol=1e-6)
