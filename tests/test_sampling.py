"""Sampling: KV cache vs full recompute, the sampled distribution vs the model's own logits,
filters by hand, EOS, seeds, TP=2 vs TP=1, and the batched sampler's independence of the
data-parallel size."""

import torch
import torch.nn.functional as F

from nemo_acft.models.generate import SamplingParams, filter_logits, sample_filtered
from tests.dist_utils import run_workers

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]


def _engine(tp=1, world=None):
    from tests.engine_utils import build

    return build(tp=tp, world=world or tp, hidden=32, override_vocab_size=64,
                 make_vocab_size_divisible_by=16, seed=0)


def _model(tp=1, rank=0):
    model = _engine(tp).module
    w = model.nado_head.output_layer.weight  # a non-zero head, identical across TP
    full = torch.randn(w.shape[0] * tp, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w.copy_(full[rank * w.shape[0]:(rank + 1) * w.shape[0]])
    return model


def _kv_worker(rank, world_size):
    from nemo_acft.models import tp_group
    from nemo_acft.models.generate import generate

    model = _model(world_size, rank)
    out = {}
    for guided in (False, True):
        params = SamplingParams(max_new_tokens=8, seed=3, top_k=20, top_p=0.9)
        for kv in (True, False):
            s = generate(model, PROMPTS, params, vocab_size=50, guided=guided, tp_group=tp_group(),
                         use_kv_cache=kv)
            out[(guided, kv)] = s
    return out


def test_kv_cache_equals_full_recompute_and_tp2_equals_tp1():
    (ref,) = run_workers(_kv_worker, 1)
    for guided in (False, True):
        a, b = ref[(guided, True)], ref[(guided, False)]
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        assert torch.equal(a.lengths, torch.tensor([11, 13, 9]))
        for i, p in enumerate(PROMPTS):  # prompts kept, padding after each budget
            assert a.tokens[i, :len(p)].tolist() == p
            assert (a.tokens[i, a.lengths[i]:] == 0).all()
            assert (a.logprobs[i, :len(p)] == 0).all() and (a.logprobs[i, len(p):a.lengths[i]] < 0).all()
    assert not torch.equal(ref[(True, True)].tokens, ref[(False, True)].tokens)
    tp = run_workers(_kv_worker, 2)
    for r in range(2):
        for key, s in ref.items():
            assert torch.equal(tp[r][key].tokens, s.tokens), key
            torch.testing.assert_close(tp[r][key].logprobs, s.logprobs, rtol=0, atol=1e-5)


def _distribution_worker(rank, world_size):
    from nemo_acft.models.generate import generate

    model = _model()
    prompt = [3, 1, 4]
    ids = torch.tensor([prompt])
    lm, nado = model(ids, torch.arange(3).unsqueeze(0), None)
    z, s = lm[0, -1, :50].double(), nado[0, -1, :50].double()
    expected = {False: torch.softmax(z, -1), True: torch.softmax(z + F.logsigmoid(s), -1)}
    counts = {}
    for guided in (False, True):
        out = generate(model, [prompt] * 4000, SamplingParams(max_new_tokens=1, seed=7),
                       vocab_size=50, guided=guided)
        counts[guided] = torch.bincount(out.tokens[:, 3], minlength=50).double()
        lp = out.logprobs[:, 3].double()
        counts[(guided, "lp")] = (lp - expected[guided][out.tokens[:, 3]].log()).abs().max()
    return {"counts": counts, "expected": expected}


def test_sampled_frequencies_match_model_distribution():
    """p from the model's own full-sequence logits (no cache), q = softmax(z + logσ(s)) written
    out by hand: the first sampled token's frequencies and stored log-probs match them."""
    (out,) = run_workers(_distribution_worker, 1)
    for guided in (False, True):
        exp = out["expected"][guided] * 4000
        obs = out["counts"][guided]
        chi2 = ((obs - exp) ** 2 / exp.clamp_min(1e-9))[exp > 5].sum().item()
        assert chi2 < 100, (guided, chi2)  # 49 dof: p(chi2 > 100) < 1e-4
        assert out["counts"][(guided, "lp")] < 1e-4
    # guided and unguided distributions differ enough to tell apart
    assert (out["expected"][True] - out["expected"][False]).abs().sum() > 0.1


def _eos_worker(rank, world_size):
    from nemo_acft.models.generate import generate

    model = _model()
    params = SamplingParams(max_new_tokens=8, seed=5)
    free = generate(model, PROMPTS, params, vocab_size=50)
    eos = int(free.tokens[0, 3 + 2])  # the 3rd generated token of sample 0
    stopped = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, seed=5, eos_id=eos),
                       vocab_size=50)
    again = generate(model, PROMPTS, params, vocab_size=50)
    other = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, seed=6), vocab_size=50)
    return {"free": free, "stopped": stopped, "eos": eos, "again": again, "other": other}


def test_eos_and_seeds():
    (out,) = run_workers(_eos_worker, 1)
    free, stopped, eos = out["free"], out["stopped"], out["eos"]
    first = [i for i, t in enumerate(free.continuation(0)) if t == eos][0]
    assert stopped.lengths[0] == 3 + first + 1
    assert stopped.continuation(0) == free.continuation(0)[:first + 1]
    assert (stopped.tokens[0, stopped.lengths[0]:] == 0).all()
    assert torch.equal(out["again"].tokens, free.tokens)  # same seed, same samples
    assert not torch.equal(out["other"].tokens, free.tokens)


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[False, False, True, True, True]]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is kept too; then 0.85 >= 0.8 stops
    kept = ~filter_logits(logits, top_p=0.8).isinf()
    assert kept.tolist() == [[True, True, True, False, False]]
    assert (~filter_logits(logits, top_p=0.5).isinf()).tolist() == [[True, False, False, False, False]]
    assert filter_logits(logits, top_k=0, top_p=1.0).eq(logits).all()
    assert inf not in filter_logits(logits, top_k=5).tolist()[0]


def test_sample_filtered_draws_the_nucleus_by_hand():
    """top-k / top-p draws: frequencies and returned log-probs against the filtered
    distribution written out by hand (kept set by cumulative mass, renormalised), ties at the
    k-th kept."""
    p = torch.tensor([0.30, 0.05, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05])
    logits = p.log().expand(20000, 8).contiguous()
    cases = {  # (top_k, top_p) -> the filtered distribution by hand
        (0, 0.6): {0: 0.30, 2: 0.20, 3: 0.15},  # 0.30 + 0.20 < 0.6, then 0.65 stops
        (0, 1.0): dict(enumerate(p.tolist())),
        (5, 1.0): {0: 0.30, 2: 0.20, 3: 0.15, 4: 0.10, 5: 0.10},
        (4, 0.9): {0: 0.30, 2: 0.20, 3: 0.15, 4: 0.10, 5: 0.10},  # the 4th ties the 5th
        (2, 0.7): {0: 0.30, 2: 0.20},  # renormalised 0.6 + 0.4: the nucleus keeps both
        (2, 0.6): {0: 0.30},  # … but not at 0.6: the mass before the 2nd already reaches it
    }
    for (k, top_p), kept in cases.items():
        want = torch.zeros(8, dtype=torch.float64)
        for i, x in kept.items():
            want[i] = x
        want /= want.sum()
        ids, lp = sample_filtered(logits, k, top_p, torch.Generator().manual_seed(3))
        freq = torch.bincount(ids, minlength=8).double() / len(ids)
        assert set(ids.unique().tolist()) == set(kept), (k, top_p)
        assert (freq - want).abs().max() < 0.015, (k, top_p, freq, want)
        torch.testing.assert_close(lp.double(), want[ids].log(), rtol=0, atol=1e-5)


def test_draw_never_picks_a_masked_entry():
    """The Gumbel-max draw at the edges: only the first / only the last / one interior entry
    kept, masks at both ends, and probabilities spanning 1e-30..1 (fp32 log-probs)."""
    from nemo_acft.models.generate import draw

    inf = float("-inf")
    rows = torch.full((4, 6), inf)
    rows[0, 0] = rows[1, 5] = rows[2, 3] = 0.0
    rows[3, 1:5] = torch.log(torch.tensor([1e-30, 0.5, 0.5 - 2e-30, 1e-30]))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = draw(rows, g)
        assert ids[:3].tolist() == [0, 5, 3]
        assert 1 <= ids[3] <= 4 and torch.isfinite(rows[3, ids[3]])
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 50, generator=gen) * 4
    logits[:, :5] = inf
    lp = torch.log_softmax(logits, -1)
    ids = draw(lp.repeat(20, 1), torch.Generator().manual_seed(2)).view(20, 3000)
    freq = F.one_hot(ids, 50).double().mean(0)  # [3000, 50] over 20 draws per row
    assert torch.isfinite(lp.gather(1, ids.T)).all()
    want = lp.double().exp()
    # mean over rows of (empirical − p): zero in expectation, sd ≈ sqrt(p/60000)
    assert ((freq - want).mean(0).abs() < 5 * (want.mean(0) / 60000).sqrt() + 1e-9).all()


def test_sampling_params_validation():
    import pytest

    for bad in (dict(max_new_tokens=0), dict(temperature=0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            SamplingParams(**bad)


def _batched_worker(rank, world_size):
    from nemo_acft.data import TextTokenizer
    from nemo_acft.sampling import generate_batched

    from tests.engine_utils import build

    engine = build(world=world_size, hidden=32, seed=0)  # tp=1: data parallel = world size
    tok = TextTokenizer(engine.tokenizer)
    prompts = ["ab", "c", "hello", "x y", "", "z"]
    s = generate_batched(engine, tok, prompts, SamplingParams(max_new_tokens=5, seed=4),
                         batch_size=2)
    return s.tokens, s.lengths, tok.encode("ab")


def test_batched_sampling_is_the_same_at_any_data_parallel_size():
    """Batch b goes to data-parallel rank b mod dp with seed + b: 1 and 2 ranks sample the same;
    an empty prompt starts from EOS."""
    (one,) = run_workers(_batched_worker, 1)
    two = run_workers(_batched_worker, 2)
    for r in two:
        assert torch.equal(r[0], one[0]) and torch.equal(r[1], one[1])
    assert one[0][0, :len(one[2])].tolist() == one[2]
