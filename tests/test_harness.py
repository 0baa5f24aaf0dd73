"""The lm-evaluation-harness adapter, offline: its three request types against brute-force
computations (one full forward per prefix, float64 log-softmax), and the harness's own evaluator
on a multiple-choice task defined from a local file. Hub tasks (piqa, toxigen, ...) need a
download and are not run here."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from tests.dist_utils import run_workers  # noqa: E402

TEXTS = ["the cat sat on the mat .", "a dog ran in the park today .",
         "question : what is hot ? answer : the sun", "the moon is cold and far away ."]


def _setup():
    """The engine (NeMo's byte-level tokenizer, a context of 32, the vocabulary padded beyond
    the tokenizer's) with a non-trivial head (it starts at zero: q = p); and its module."""
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    from nemo_acft.data import TextTokenizer
    from tests.engine_utils import build

    engine = build(num_layers=1, hidden=32, heads=2, seq=32, head_layers=0,
                   make_vocab_size_divisible_by=96, seed=5)
    with torch.no_grad():
        for p in engine.module.nado_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.module.eval()
    return TextTokenizer(get_nmt_tokenizer(library="byte-level")), engine


def _next_logp(model, prefix, vocab, guided=False, beta=1.0):
    """log p(· | prefix) (or log q_β) from one forward of the prefix alone, in float64."""
    x = torch.tensor([prefix])
    with torch.no_grad():
        z, s = model(x, torch.arange(len(prefix))[None], None)
    z, s = z[0, -1, :vocab].double(), s[0, -1, :vocab].double()
    if guided:
        z = z + beta * torch.nn.functional.logsigmoid(s)
    return torch.log_softmax(z, -1)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _adapter_worker(rank, world_size, task_dir):
    from nemo_acft.eval.lm_harness import ACFTHarnessLM

    tok, engine = _setup()
    model = engine.module
    V, L = engine.vocab_size, 32  # bytes: the longest pair is cut to the context
    out = {}
    pairs = [("the cat sat", " on the mat ."), ("a dog", " ran in the park today ."),
             ("", "the sun"), ("question : what is hot ? answer :", " the sun")]
    for guided, beta in ((False, 1.0), (True, 1.0), (True, 2.5)):
        lm = ACFTHarnessLM(engine, tok, L, batch_size=3, guided=guided, guidance=beta)
        got = lm.loglikelihood(_requests("loglikelihood", pairs))
        want = []
        for ctx, cont in pairs:
            c, w = tok.encode(ctx) or [tok.eos_id], tok.encode(cont)
            seq = (c + w)[-(L + 1):]
            total, greedy = 0.0, True
            for j in range(len(seq) - len(w), len(seq)):
                lp = _next_logp(model, seq[max(0, j - L):j], V, guided, beta)
                total += float(lp[seq[j]])
                greedy &= int(lp.argmax()) == seq[j]
            want.append((total, greedy))
        out[f"ll_{guided}_{beta}"] = (got, want)

    # rolling: disjoint windows of L tokens; token j of a later window [a, e) is predicted from
    # tokens[e-L-1:j] (a full window: from tokens[a-1:j]; the last, shorter one reaches back so
    # that its last token sees L tokens), of the first window from [eos] + tokens[:j]
    lm = ACFTHarnessLM(engine, tok, L, batch_size=2)
    texts = ["the cat sat", " ".join(TEXTS)]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    want = []
    for t in texts:
        ids = tok.encode(t)
        total = 0.0
        for j in range(len(ids)):
            a = (j // L) * L
            e = min(a + L, len(ids))
            prefix = [tok.eos_id] + ids[:j] if a == 0 else ids[e - L - 1:j]
            total += float(_next_logp(model, prefix, V)[ids[j]])
        want.append(total)
    out["rolling"] = (got, want)

    # greedy generation with an until string, against argmax decoding by full recompute
    got = lm.generate_until(_requests("generate_until", [
        ("the cat", {"until": ["park"], "max_gen_toks": 5}), ("a dog", {"max_gen_toks": 4})]))
    want = []
    for ctx, n, until in (("the cat", 5, "park"), ("a dog", 4, None)):
        ids = tok.encode(ctx)
        gen = []
        for _ in range(n):
            nxt = int(_next_logp(model, ids + gen, V).argmax())
            gen.append(nxt)
            if nxt == tok.eos_id:
                break
        text = tok.decode(gen)
        want.append(text[:text.find(until)] if until and until in text else text)
    out["generate"] = (got, want)

    # the harness's own evaluator on a local multiple-choice task
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=lm, tasks=["acft_local_mc"], log_samples=False,
                                  task_manager=TaskManager(include_path=task_dir))
    out["mc_acc"] = res["results"]["acft_local_mc"]["acc,none"]
    docs = [json.loads(x) for x in open(f"{task_dir}/mc.jsonl")]
    right = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ids = tok.encode(d["question"] + " answer :")
            cont = tok.encode(" " + choice)
            seq = (ids + cont)[-(L + 1):]  # the model's context, as in loglikelihood
            scores.append(sum(float(_next_logp(model, seq[:j], V)[seq[j]])
                              for j in range(len(seq) - len(cont), len(seq))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    out["mc_by_hand"] = right / len(docs)
    return out


def test_harness_adapter_matches_brute_force(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "what is hot ?", "choices": ["the sun", "the moon"], "answer": 0},
            {"question": "what sat on the mat ?", "choices": ["the dog", "the cat"], "answer": 1},
            {"question": "where did the dog run ?", "choices": ["in the park", "on the mat"],
             "answer": 0},
            {"question": "what is cold ?", "choices": ["the moon", "the sun", "a cat"],
             "answer": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "acft_local_mc.yaml").write_text(f"""task: acft_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
""")
    (out,) = run_workers(_adapter_worker, 1, str(tmp_path))
    for key in ("ll_False_1.0", "ll_True_1.0", "ll_True_2.5"):
        got, want = out[key]
        for (g, gg), (w, wg) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-5), key
            assert gg == wg, key
    # guidance changes the scores (the head is not zero)
    assert out["ll_True_2.5"][0][0][0] != pytest.approx(out["ll_False_1.0"][0][0][0])
    got, want = out["rolling"]
    assert got == pytest.approx(want, rel=1e-5)
    got, want = out["generate"]
    assert got == want
    assert out["mc_acc"] == pytest.approx(out["mc_by_hand"])
    assert not math.isnan(out["mc_acc"])
