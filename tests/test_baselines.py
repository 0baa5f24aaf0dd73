"""The paper's baselines: filtering against a direct check of the texts, the REINFORCE term and
NADO decoding's guided perplexity against brute-force float64 computations, advantages by hand,
and all of them end to end in acft-train (``baselines: [filtering, rl, nado_decoding]``)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_acft.training.baselines import RLConfig, leave_one_out_advantages
from tests.dist_utils import run_workers


def test_leave_one_out_advantages_by_hand():
    a = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]))
    # baselines: (0+.5+.5)/3, (1+.5+.5)/3, (1+0+.5)/3, (1+0+.5)/3
    assert a.tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5])
    # an unscored sample (NaN) gets 0 and is left out of the others' baselines
    a = leave_one_out_advantages(torch.tensor([1.0, math.nan, 0.0]))
    assert a.tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert leave_one_out_advantages(torch.tensor([0.7, math.nan])).tolist() == [0.0, 0.0]


def test_rl_config_errors_name_the_key():
    with pytest.raises(ValueError, match="rl.batch_size=1"):
        RLConfig(batch_size=1)
    with pytest.raises(ValueError, match="rl.coef=-1"):
        RLConfig(coef=-1)


def test_filter_by_oracle_drops_exactly_the_violating_records():
    from nemo_acft.data import WordTokenizer, encode_records
    from nemo_acft.oracles import LexiconOracle
    from nemo_acft.training.baselines import filter_by_oracle

    texts = ["you are an idiot", "the weather is nice", "stupid plan today", "lunch was good",
             "what an idiot move", "sports on tv"]
    domains = ["chat", "weather", "chat", "food", "chat", "sports"]
    records = [{"text": t, "domain": d} for t, d in zip(texts, domains)]
    tok = WordTokenizer.build(texts)
    data = encode_records(records, tok, 8, sorted(set(domains)))
    kept, stats = filter_by_oracle(data, tok, LexiconOracle(["idiot", "stupid"]), 0.5)
    keep = [not any(w in t.split() for w in ("idiot", "stupid")) for t in texts]
    assert torch.equal(kept.tokens, data.tokens[torch.tensor(keep)])
    assert torch.equal(kept.domain_ids, data.domain_ids[torch.tensor(keep)])
    assert stats["kept"] == 3 and stats["dropped"] == 3
    assert stats["dropped_by_domain"] == {"chat": 3, "food": 0, "sports": 0, "weather": 0}
    with pytest.raises(ValueError, match="every one of the 6"):
        filter_by_oracle(data, tok, LexiconOracle(["the", "you", "stupid", "lunch", "what",
                                                   "sports"]), 0.5)


def _tiny(with_head):
    from nemo_acft.data import WordTokenizer
    from nemo_acft.models import GPTConfig, build_gpt_nado, init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    texts = ["you are an idiot", "the weather is nice today", "a stupid plan", "nice lunch"]
    tok = WordTokenizer.build(texts)
    torch.manual_seed(4)
    model = build_gpt_nado(GPTConfig(vocab_size=len(tok), seq_length=16, num_layers=1,
                                     hidden_size=32, num_attention_heads=2,
                                     make_vocab_size_divisible_by=16), with_head=with_head)
    if with_head:
        with torch.no_grad():
            for p in model.nado_head.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    return tok, model


def _reinforce_worker(rank, world_size):
    from nemo_acft.oracles import LexiconOracle
    from nemo_acft.sampling import SamplingParams, generate_batched
    from nemo_acft.training.baselines import Reinforce

    tok, model = _tiny(with_head=False)
    V = len(tok)
    prompts = ["you are", "the weather", "a", "nice", "you", "the"]
    oracle = LexiconOracle(["idiot", "stupid", "plan"])
    cfg = RLConfig(coef=2.0, batch_size=4, max_new_tokens=5)
    rl = Reinforce(cfg, tok, prompts, oracle, vocab_size=V, seed=9)
    model.train()
    loss, m = rl(model, step=3)
    loss.backward()
    grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # by hand: the same draw, rewards, leave-one-out advantages, and log p(y) from one forward
    # per prefix in float64
    from nemo_acft.data import batch_indices

    idx = batch_indices(len(prompts), 4, 9, "rl", 3).tolist()
    s = generate_batched(model, tok, [prompts[i] for i in idx],
                         SamplingParams(max_new_tokens=5, eos_id=tok.eos_id,
                                        seed=(9 * 7919 + 3) % (2 ** 62)),
                         vocab_size=V, batch_size=4)
    texts = [tok.decode(s.tokens[i, :s.lengths[i]].tolist()) for i in range(4)]
    r = [oracle.score([t])[0] for t in texts]
    mean_others = [(sum(r) - r[i]) / 3 for i in range(4)]
    adv = [r[i] - mean_others[i] for i in range(4)]
    model.eval()
    ref = 0.0
    for i in range(4):
        seq = s.tokens[i, :s.lengths[i]].tolist()
        for j in range(int(s.prompt_lengths[i]), len(seq)):
            x = torch.tensor([seq[:j]])
            z = model(x, torch.arange(j)[None], None)[0, -1, :V].double()
            ref += -adv[i] * torch.log_softmax(z, -1)[seq[j]] / (4 * 5)
    ref = 2.0 * ref
    ref.backward()
    ref_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": float(loss), "ref": float(ref), "reward": m["reward"], "r": r,
            "grad": grad, "ref_grad": ref_grad}


def test_reinforce_term_matches_brute_force():
    (out,) = run_workers(_reinforce_worker, 1)
    assert out["loss"] == pytest.approx(out["ref"], rel=1e-5, abs=1e-7)
    assert out["reward"] == pytest.approx(sum(out["r"]) / 4)
    assert out["grad"].keys() == out["ref_grad"].keys()
    for k in out["grad"]:
        torch.testing.assert_close(out["grad"][k], out["ref_grad"][k].float(), rtol=1e-4,
                                   atol=1e-6)


def _guided_ppl_worker(rank, world_size):
    from nemo_acft.data import encode_records
    from nemo_acft.eval import perplexity

    tok, model = _tiny(with_head=True)
    texts = ["you are an idiot", "the weather is nice today", "nice lunch today"]
    data = encode_records([{"text": t, "domain": "d"} for t in texts], tok, 16, ["d"])
    out = {}
    model.eval()
    for beta in (0.0, 1.0, 2.0):
        got = perplexity(model, data, guidance=beta)
        nll, n = 0.0, 0
        for t in texts:
            ids = tok.encode(t) + [tok.eos_id]
            for j in range(1, len(ids)):
                with torch.no_grad():
                    z, s = model(torch.tensor([ids[:j]]), torch.arange(j)[None], None)
                # the padded vocabulary entries take part, as in the LM's own perplexity
                z, s = z[0, -1].double(), s[0, -1].double()
                lq = torch.log_softmax(z + beta * torch.nn.functional.logsigmoid(s), -1)
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
        want = torch.log_softmax(z.double() + beta * torch.nn.functional.logsigmoid(s.double()), -1)
        got = guided_log_probs(z, s, None, beta)
        finite = torch.isfinite(want) & (want > -1e30)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="scale=-1"):
        guided_log_probs(z, s, None, -1.0)


FAST = [
    "acft.iterations=2", "finetune.steps_per_iteration=10", "finetune.save_every=0",
    "finetune.batch_size=16", "pretrain.steps=30", "acft.nado.steps=10", "acft.nado.prompts=64",
    "acft.nado.batch_size=32", "sampling.max_new_tokens=12", "sampling.batch_size=64",
    "eval.prompts=32", "eval.samples_per_prompt=1", "eval.ppl_records=64",
    "data.builtin.pretrain_records=600", "data.builtin.train_records=300",
    "data.builtin.heldout_records=100", "model.hidden_size=32", "progress=false",
    "baselines=[filtering,rl,nado_decoding]", "rl.batch_size=8", "rl.max_new_tokens=8",
    "nado_decoding.guidance=2.0",
]


def test_acft_train_runs_every_baseline(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}", f"cache_dir={cache}",
           *FAST]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["baselines"]) == {"filtering", "rl", "nado_decoding"}
    for name, m in summary["baselines"].items():
        assert 0 <= m["violation_rate"] <= 1 and m["ppl"] > 1, name
        assert len(summary["iterations"][name]) == 3
    # filtering: the drop count equals the lexicon oracle on the decoded training records
    from nemo_acft.training.setup import build_data
    import yaml

    from nemo_acft.oracles import LexiconOracle
    from nemo_acft.training.baselines import record_texts

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = build_data(cfg)
    texts = record_texts(data.train, data.tokenizer)
    lex = LexiconOracle()
    flagged = sum(lex.score([t])[0] < 0.5 for t in texts)
    stats = json.loads((run_dir / "filtering" / "filter.json").read_text())
    assert stats["dropped"] == flagged > 0
    # rl trained K blocks; NADO decoding kept the baseline's θ_K and trained φ_1..φ_K for it
    assert (run_dir / "rl" / "lm" / "iter_000002").is_dir()
    nd = run_dir / "nado_decoding"
    a = torch.load(nd / "lm" / "iter_000000" / "model.pt", weights_only=False)
    b = torch.load(run_dir / "baseline" / "lm" / "iter_000002" / "model.pt", weights_only=False)
    assert all(torch.equal(a[k], b[k]) for k in b if b[k] is not None)
    assert (nd / "nado" / "iter_000002").is_dir()
    # NADO decoding at iteration 0 (the zero head) is the baseline's θ_K itself
    assert summary["iterations"]["nado_decoding"][0]["ppl"] == pytest.approx(
        summary["baseline"]["ppl"], rel=1e-6)
    # the rerun resumes: nothing is trained again
    mtime = (run_dir / "rl" / "lm" / "iter_000002").stat().st_mtime
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (run_dir / "rl" / "lm" / "iter_000002").stat().st_mtime == mtime
    assert json.loads((run_dir / "summary.json").read_text())["baselines"] == summary["baselines"]
    # acft-eval on the NADO decoding baseline (guided, with its φ_K)
    out = tmp_path / "eval_nado"
    p = subprocess.run([sys.executable, "-m", "nemo_acft.eval.cli", "--run-dir", str(run_dir),
                        "--store", "nado_decoding", "--guidance", "2.0", "--out", str(out),
                        "--method", "nado_decoding", "--num-prompts", "4",
                        "--samples-per-prompt", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["guided"] and m["guidance"] == 2.0 and m["checkpoint"] == "nado_decoding/nado/iter_2"
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["method"] == "nado_decoding" for r in rows)


def test_bad_baseline_settings_name_the_key():
    import copy

    from omegaconf import OmegaConf

    from nemo_acft.training.setup import validate

    base = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent.parent / "conf" /
                                                 "tiny_cpu.yaml"), resolve=False)
    base.pop("hydra")
    validate(base)
    for path, value, msg in ((("baselines",), ["filtering", "dpo"], "config baselines="),
                             (("filtering", "threshold"), 1.5, "config filtering.threshold=1.5"),
                             (("rl", "batch_size"), 1, "config rl: rl.batch_size=1"),
                             (("nado_decoding", "guidance"), -1,
                              "config nado_decoding.guidance=-1")):
        cfg = copy.deepcopy(base)
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            validate(cfg)
