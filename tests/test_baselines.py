"""The paper's baselines: filtering against a direct check of the texts, the REINFORCE term and
NADO decoding's guided perplexity against brute-force float64 computations from the raw
logits, advantages by hand, and all of them end to end in acft-train
(``baselines=[filtering,rl,nado_decoding]``), with ``acft-eval`` on the NADO decoding store."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemo_acft.algorithms.baselines import leave_one_out_advantages
from tests.dist_utils import run_workers
from tests.run_utils import compose, drive


def test_leave_one_out_advantages_by_hand():
    a = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]))
    # baselines: (0+.5+.5)/3, (1+.5+.5)/3, (1+0+.5)/3, (1+0+.5)/3
    assert a.tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5])
    # an unscored sample (NaN) gets 0 and is left out of the others' baselines
    a = leave_one_out_advantages(torch.tensor([1.0, math.nan, 0.0]))
    assert a.tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert leave_one_out_advantages(torch.tensor([0.7, math.nan])).tolist() == [0.0, 0.0]


def _byte_tokenizer():
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    from nemo_acft.data import TextTokenizer

    return TextTokenizer(get_nmt_tokenizer(library="byte-level"))


def test_filter_by_oracle_drops_exactly_the_violating_records():
    import tests.dist_utils  # noqa: F401  (NeMo on the path)
    from nemo_acft.algorithms.baselines import filter_by_oracle
    from nemo_acft.data import encode_records
    from nemo_acft.oracles import LexiconOracle

    texts = ["you are an idiot", "the weather is nice", "stupid plan today", "lunch was good",
             "what an idiot move", "sports on tv"]
    domains = ["chat", "weather", "chat", "food", "chat", "sports"]
    records = [{"text": t, "domain": d} for t, d in zip(texts, domains)]
    tok = _byte_tokenizer()
    data = encode_records(records, tok, 32, sorted(set(domains)))
    kept, stats = filter_by_oracle(data, tok, LexiconOracle(["idiot", "stupid"]), 0.5)
    keep = [not any(w in t.split() for w in ("idiot", "stupid")) for t in texts]
    assert torch.equal(kept.tokens, data.tokens[torch.tensor(keep)])
    assert torch.equal(kept.domain_ids, data.domain_ids[torch.tensor(keep)])
    assert stats["kept"] == 3 and stats["dropped"] == 3
    assert stats["dropped_by_domain"] == {"chat": 3, "food": 0, "sports": 0, "weather": 0}
    with pytest.raises(ValueError, match="every one of the 6"):
        filter_by_oracle(data, tok, LexiconOracle(["the", "you", "stupid", "lunch", "what",
                                                   "sports"]), 0.5)


def _engine():
    from tests.engine_utils import build

    model = build(num_layers=1, hidden=32, heads=2, seq=16, head_layers=0,
                  make_vocab_size_divisible_by=96, seed=4)  # 512 ids padded to 576
    with torch.no_grad():
        for p in model.module.nado_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def _reinforce_worker(rank, world_size):
    from nemo_acft.algorithms.baselines import RLTerm
    from nemo_acft.data import batch_indices
    from nemo_acft.models.generate import SamplingParams
    from nemo_acft.sampling import generate_batched, texts

    class Parity:  # a deterministic oracle that splits random text: even length satisfies
        name = "parity"

        @staticmethod
        def score(items):
            return [float(len(t) % 2 == 0) for t in items]

    model = _engine()
    tok = _byte_tokenizer()
    prompts = ["you are", "the weather", "a", "nice", "you", "the"]
    oracle = Parity()
    run = SimpleNamespace(model=model, tokenizer=tok, seed=9, oracle=oracle,
                          data=SimpleNamespace(train_prompts=prompts),
                          cfg={"rl": {"coef": 2.0, "batch_size": 4, "max_new_tokens": 5},
                               "oracle": {"batch_size": 8}})
    model.configure_training("trunk", model.cfg.optim, max_steps=10)
    # by hand: the same draw, rewards, leave-one-out advantages, and log p(y) from one forward
    # per prefix in float64 over the tokenizer's vocabulary (the padding has probability 0);
    # the first iteration k whose draw has rewards that differ (so the term pushes)
    for k in range(3, 40):
        idx = batch_indices(len(prompts), 4, 9, "rl", k).tolist()
        s = generate_batched(model, tok, [prompts[i] for i in idx],
                             SamplingParams(max_new_tokens=5, eos_id=tok.eos_id,
                                            seed=(9 * 7919 + k) % (2 ** 62)), batch_size=4)
        r = [oracle.score([t])[0] for t in texts(s, tok)]
        if 0 < sum(r) < 4:
            break
    terms, metrics = RLTerm(run)(k)
    model._optimizer.zero_grad()
    (batch, objective), = terms
    out = model._fwd_bwd(batch, objective, micro_batch_size=2)
    grad = model.module.output_layer.weight.grad.detach().clone()
    adv = [r[i] - (sum(r) - r[i]) / 3 for i in range(4)]
    V = model.vocab_size
    w = model.module.output_layer.weight
    ref = torch.zeros((), dtype=torch.float64)
    hidden = {}
    handle = model.module.output_layer.register_forward_hook(
        lambda mod, inp, o: hidden.__setitem__("h", inp[0]))
    for i in range(4):
        seq = s.tokens[i, :s.lengths[i]].tolist()
        for j in range(int(s.prompt_lengths[i]), len(seq)):
            x = torch.tensor([seq[:j]])
            with torch.no_grad():
                model.module(x, torch.arange(j)[None], None)
            h = hidden["h"][-1, 0].detach().double()
            z = h @ w.detach().double().t()
            ref = ref - adv[i] * torch.log_softmax(z[:V], -1)[seq[j]] / (4 * 5)
    handle.remove()
    ref = 2.0 * ref
    return {"loss": out["rl_loss"] * 2.0, "ref": float(ref), "reward": metrics["reward"],
            "r": r, "grad_norm": float(grad.norm())}


def test_reinforce_term_matches_brute_force():
    (out,) = run_workers(_reinforce_worker, 1)
    assert out["loss"] == pytest.approx(out["ref"], rel=1e-5, abs=1e-7)
    assert out["reward"] == pytest.approx(sum(out["r"]) / 4)
    assert 0 < sum(out["r"]) < 4  # some rewards differ, so the term pushes
    assert out["grad_norm"] > 0


def _guided_ppl_worker(rank, world_size):
    from nemo_acft.data import encode_records
    from nemo_acft.eval import perplexity

    model = _engine()
    tok = _byte_tokenizer()
    texts = ["you are an idiot", "the weather", "nice lunch"]
    data = encode_records([{"text": t, "domain": "d"} for t in texts], tok, 16, ["d"])
    out = {}
    V = model.vocab_size
    for beta in (0.0, 1.0, 2.0):
        got = perplexity(model, data, guidance=beta)
        nll, n = 0.0, 0
        for t in texts:
            ids = (tok.encode(t) + [tok.eos_id])[:17]
            for j in range(1, len(ids)):
                with torch.no_grad():
                    z, s = model.module(torch.tensor([ids[:j]]), torch.arange(j)[None], None)
                z, s = z[0, -1, :V].double(), s[0, -1, :V].double()
                lq = torch.log_softmax(z + beta * F.logsigmoid(s), -1)
                nll -= float(lq[ids[j]])
                n += 1
        out[beta] = (got, math.exp(nll / n))
    out["plain"] = perplexity(model, data)
    return out


def test_guided_perplexity_matches_brute_force():
    (out,) = run_workers(_guided_ppl_worker, 1)
    for beta in (0.0, 1.0, 2.0):
        got, want = out[beta]
        assert got == pytest.approx(want, rel=1e-5)
    assert out[0.0][0] == pytest.approx(out["plain"], rel=1e-6)  # β = 0 is p itself
    assert out[2.0][0] != pytest.approx(out["plain"], rel=1e-3)


def test_guided_log_probs_scale_extreme_logits():
    from nemo_acft.nado import guided_log_probs

    torch.manual_seed(0)
    z = torch.randn(3, 50) * 1e3
    s = torch.cat([torch.full((3, 25), -1e4), torch.full((3, 25), 1e4)], -1)
    s = s[:, torch.randperm(50)]
    for beta in (0.0, 0.5, 3.0):
        want = torch.log_softmax(z.double() + beta * F.logsigmoid(s.double()), -1)
        got = guided_log_probs(z, s, None, beta)
        finite = torch.isfinite(want) & (want > -1e30)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="scale=-1"):
        guided_log_probs(z, s, None, -1.0)


BASELINES = ["baselines=[filtering,rl,nado_decoding]", "rl.batch_size=8", "rl.max_new_tokens=8",
             "nado_decoding.guidance=2.0", "model.acft.steps_per_iteration=10",
             "model.acft.save_every=0"]


def test_acft_train_runs_every_baseline(tmp_path):
    from nemo_acft.algorithms.baselines import record_texts
    from nemo_acft.data import TextTokenizer, build_data
    from nemo_acft.oracles import LexiconOracle

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose(run_dir, cache, *BASELINES)
    drive(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["baselines"]) == {"filtering", "rl", "nado_decoding"}
    for name, m in summary["baselines"].items():
        assert 0 <= m["violation_rate"] <= 1 and m["ppl"] > 1 and m["distinct_2"] > 0, name
        assert len(summary["iterations"][name]) == 3
    # filtering: the drop count equals the lexicon oracle on the decoded training records
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    tok = TextTokenizer(get_nmt_tokenizer(library="sentencepiece",
                                          tokenizer_model=str(run_dir / "model" /
                                                              "tokenizer.model")))
    data = build_data(cfg["data"], cfg["eval"], tok, 32, cfg["seed"])
    lex = LexiconOracle()
    flagged = sum(lex.score([t])[0] < 0.5 for t in record_texts(data.train, tok))
    stats = json.loads((run_dir / "filtering" / "filter.json").read_text())
    assert stats["dropped"] == flagged > 0
    # rl trained K blocks; NADO decoding trained φ_1..φ_K for the plain fine-tune's θ_K
    assert (run_dir / "rl" / "lm" / "iter_000002" / "manifest.json").is_file()
    nd = json.loads((run_dir / "nado_decoding" / "nado" / "iter_000002" /
                     "manifest.json").read_text())
    assert nd["based_on"] == {"lm": 2, "nado": 1} and nd["read"]["lm"]["path"].endswith(
        "baseline/lm/iter_000002")
    # NADO decoding at iteration 0 (the zero head) is the plain fine-tune's θ_K itself
    assert summary["iterations"]["nado_decoding"][0]["ppl"] == pytest.approx(
        summary["baseline"]["ppl"], rel=1e-6)
    # the rerun resumes: nothing is trained again
    mtime = (run_dir / "rl" / "lm" / "iter_000002" / "manifest.json").stat().st_mtime
    drive(cfg)
    assert (run_dir / "rl" / "lm" / "iter_000002" / "manifest.json").stat().st_mtime == mtime
    assert json.loads((run_dir / "summary.json").read_text())["baselines"] == summary["baselines"]
    # acft-eval on the NADO decoding baseline (guided, with its φ_K)
    from tests.test_eval import _acft_eval

    out = tmp_path / "eval_nado"
    assert _acft_eval("--run-dir", str(run_dir), "--store", "nado_decoding", "--guidance", "2.0",
                      "--out", str(out), "--method", "nado_decoding", "--num-prompts", "4",
                      "--samples-per-prompt", "2") is None
    m = json.loads((out / "metrics.json").read_text())
    assert m["guided"] and m["guidance"] == 2.0 and m["checkpoint"] == "nado_decoding/nado/iter_2"
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["method"] == "nado_decoding" for r in rows)


def test_bad_baseline_settings_name_the_key(tmp_path):
    for extra, msg in ((["baselines=[filtering,dpo]"], "config baselines=['filtering', 'dpo']"),
                       (["filtering.threshold=1.5"], "config filtering.threshold=1.5"),
                       (["rl.batch_size=1"], "config rl.batch_size=1: expected an integer >= 2"),
                       (["nado_decoding.guidance=-1"], "config nado_decoding.guidance=-1"),
                       (["baselines=[rl]", "schedule=parallel",
                         "model.pipeline_model_parallel_size=2", "trainer.devices=2"],
                        "the rl baseline samples from the model being trained")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            compose(tmp_path / "r", tmp_path / "c", *extra)
