"""The paper's main table and its Figure 3 (toxicity against utility), in miniature, on real data.

    python benchmarks/paper_table.py --data-dir ../shared/data --out paper_out           # ~5 h
    python benchmarks/paper_table.py --data-dir ../shared/data --out paper_out --quick   # ~5 min

(2 cores: an ACFT point of the full mode takes 35–40 min with its NADO budget of 1,024 prompts
and 300 NADO steps per oracle block.) ``--ablations`` adds ours w/ adaptive with one choice of
``ABLATIONS`` changed (reference, kl_on, gates, the NADO's kind, labels, α and samples per prompt),
and NADO decoding with each of ``NADO_ABLATIONS``, as ``ablation/<variant>/`` and a second table.

``--data-dir`` (default: the environment variable ``ACFT_DATA_DIR``) holds ``wikitext-2/``,
``toxigen_seeds/`` and ``davidson_hate_offensive/`` (see that folder's README); nothing of it is
copied into the repository, only into ``--out``. The set-up:

- corpus: an equal mix (by records) of WikiText-2 ``valid.txt`` sentences (domain ``wiki``) and
  the ToxiGen seed statements of both labels (domain ``toxigen``), 80% of each (label, group)
  file; the statements are repeated to match the sentence count. The small GPT is pre-trained on
  this mix (so that it continues a group mention with a hateful statement), then every method
  fine-tunes it on the same mix with the same batches and steps;
- prompts: group-mention openings of the held-out 20% of the statements (the words up to and
  including the first mention of the group, at least two words);
- oracle (the training signal): ``sklearn_text`` (TF-IDF + logistic regression) on the Davidson
  tweets (hate and offensive violate) plus the training statements (hate violates), the latter
  repeated 10x so that 578 statements are not drowned by 24,783 tweets;
- evaluator: a different classifier, ``sklearn_text`` on all ToxiGen seed statements (hate
  violates) plus 2,000 other ``valid.txt`` sentences (not in the corpus) as non-toxic general
  text, and no tweets; it scores the continuation alone (toxicity = 1 − its score);
- utility: perplexity on WikiText-2 ``test.txt`` sentences (NADO decoding: q's perplexity);
- protocol: METHOD.md's, 25 samples of up to 20 new tokens per prompt, nucleus p = 0.9.

Methods (``results.json`` names): ``baseline`` (LM loss), ``filtering`` (records the oracle
scores < 0.5 dropped), ``rl`` (REINFORCE + LM loss), ``nado_decoding`` (the baseline's θ decoded
from q ∝ p·R^β), ``acft`` (one λ on both domains), ``acft_adaptive`` (λ on ``toxigen`` only, none on
``wiki``); both without the δ and ``min_z`` gates (the ``gates=on`` ablation has them: they
switched off 93–97% of the positions and left the toxic share at 0.98×). The sweep varies each method's knob (filtering threshold, RL
coefficient, guidance β, λ) for the trade-off plot. Runs go two at a time (one core each).

Writes to ``--out``: ``results.json`` (method → toxic_share, emt, tox_prob, ppl, …),
``table.md``, ``sweep.json``, ``tradeoff.png`` (Figure 3), ``<method>/samples.jsonl`` and
``<method>/metrics.json`` for the table's rows, ``sweep/<point>/`` for the others, ``runs/``
(the training runs, resumable) and ``data/`` (the files built from ``--data-dir``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_acft.io_utils import atomic_write, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("baseline", "filtering", "rl", "nado_decoding", "acft", "acft_adaptive")
LABELS = {"baseline": "Baseline (fine-tune)", "filtering": "Filtering", "rl": "RL",
          "nado_decoding": "NADO decoding", "acft": "Ours w/o adaptive",
          "acft_adaptive": "Ours w/ adaptive"}

#: words that mention each ToxiGen target group (lower case, whole words)
GROUP_WORDS = {
    "asian": r"asians?|asia",
    "bisexual": r"bisexuals?|bi",
    "black": r"blacks?|african|africans|african-americans?",
    "chinese": r"chinese|china",
    "immigrant": r"immigrants?|immigration|refugees?|migrants?|foreigners?",
    "jewish": r"jews?|jewish|judaism|israel",
    "latino": r"latinos?|latinas?|latinx|hispanics?",
    "lgbtq": r"gays?|lesbians?|lgbtq?|queer|homosexuals?|homosexuality",
    "mental_disability": r"mental(ly)?|autis(m|tic)|disabled|disabilit(y|ies)|down",
    "mexican": r"mexicans?|mexico",
    "middle_east": r"arabs?|arabic|middle|muslims?|islam|iran|iraq|syria",
    "muslim": r"muslims?|islam|islamic|mosques?",
    "native_american": r"natives?|indians?|tribes?|tribal|reservations?",
    "physical_disability": r"disabled|disabilit(y|ies)|wheelchairs?|blind|deaf",
    "trans": r"trans|transgender|transgenders|transsexuals?",
    "women": r"wom[ae]n|girls?|females?|wives|wife|ladies|lady",
}

# --- the configurations --------------------------------------------------------------------

FULL = {
    "wiki_sentences": 4000, "ppl_sentences": 2000, "max_prompts": 0, "vocab": 8192,
    "model": {"encoder_seq_length": 48, "num_layers": 3, "hidden_size": 128,
              "ffn_hidden_size": 512, "num_attention_heads": 4,
              "make_vocab_size_divisible_by": 128},
    "head_layers": 1,
    "pretrain": {"steps": 1500, "global_batch_size": 32},
    "finetune": {"steps_per_iteration": 150, "global_batch_size": 32, "save_every": 50},
    "acft": {"iterations": 3, "prompts": 1024, "steps": 300, "global_batch_size": 64,
             "calibration_prompts": 32},
    "rl": {"batch_size": 32, "max_new_tokens": 20},
    "samples_per_prompt": 25,
    "sweep": {"filtering": [0.3, 0.5, 0.7], "rl": [0.3, 1.0, 3.0],
              "nado_decoding": [0.5, 1.0, 2.0], "acft": [1.0, 4.0, 16.0],
              "acft_adaptive": [1.0, 4.0, 16.0]},
}
QUICK = {
    "wiki_sentences": 600, "ppl_sentences": 200, "max_prompts": 24, "vocab": 2048,
    "model": {"encoder_seq_length": 40, "num_layers": 2, "hidden_size": 64,
              "ffn_hidden_size": 256, "num_attention_heads": 4,
              "make_vocab_size_divisible_by": 64},
    "head_layers": 1,
    "pretrain": {"steps": 300, "global_batch_size": 32},
    "finetune": {"steps_per_iteration": 30, "global_batch_size": 16, "save_every": 0},
    "acft": {"iterations": 2, "prompts": 512, "steps": 150, "global_batch_size": 32,
             "calibration_prompts": 16},
    "rl": {"batch_size": 8, "max_new_tokens": 12},
    "samples_per_prompt": 25,
    "sweep": {"filtering": [0.5], "rl": [1.0], "nado_decoding": [1.0], "acft": [4.0],
              "acft_adaptive": [4.0]},
}
#: the knob value of each method's row in the table
MAIN = {"filtering": 0.5, "rl": 1.0, "nado_decoding": 1.0, "acft": 4.0, "acft_adaptive": 4.0}
KNOB = {"filtering": "threshold", "rl": "coef", "nado_decoding": "β", "acft": "λ",
        "acft_adaptive": "λ_toxigen"}
#: ``--ablations``: ours w/ adaptive at its main λ with one choice changed (model.acft keys)
ABLATIONS = {
    "kl_on=both": {"kl_on": "both"},
    "kl_on=samples": {"kl_on": "samples"},
    "gates=on": {"delta": 0.95, "min_z": 0.1},
    "reference=current": {"reference": "current"},
    "reference=base": {"reference": "base"},
    # the prototypes' NADO: a model of its own over the tokens, as deep as the trunk, warm-started
    # from θ_0 (also with NADO decoding: ``--only nado_decoding@1+nado=separate``)
    "nado=separate": {"nado_head": {"kind": "separate", "num_layers": "trunk"}},
    # R's data and loss (issue 14's NADO-quality knobs; with NADO decoding, the direct test of R):
    # soft labels (the oracle's score, as the prototype's 1 − toxicity), the consistency term
    # (NADO 2022's loss; the default is the GPT-2 prototype's CE alone, α 0), four continuations
    # per prompt (4× the samples, same NADO steps)
    "labels=soft": {"+oracle": {"threshold": None}},
    "alpha=1": {"alpha": 1.0},
    "samples=4": {"oracle_block": {"samples_per_prompt": 4}},
}
#: ``--ablations``: the variants also run with NADO decoding (they change R, not the LM update)
NADO_ABLATIONS = ("nado=separate", "labels=soft", "alpha=1", "samples=4")


def _merge(into: Dict[str, Any], change: Dict[str, Any]) -> None:
    """Nested update of ``into`` by ``change`` (dicts merge, other values replace)."""
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


# --- data ------------------------------------------------------------------------------------


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SystemExit(f"--data-dir: {path} does not exist ({what}); expected the layout of "
                         "../shared/data (see its README)")
    return path


def wiki_sentences(path: Path, limit: int, min_words: int = 5) -> List[str]:
    """Sentences of a WikiText-2 file: headings and blank lines skipped, paragraphs split after
    " . "; the first ``limit`` (0 = all) with at least ``min_words`` words."""
    out = []
    for line in _need(path, "a WikiText-2 split").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for piece in re.split(r"(?<= \.) ", line):
            if len(piece.split()) >= min_words:
                out.append(piece.strip())
                if limit and len(out) >= limit:
                    return out
    return out


def toxigen_split(folder: Path, seed: int, heldout: float = 0.2):
    """``(train, heldout)`` lists of ``(text, group, toxic)``: each (label, group) file shuffled
    with ``seed`` and split."""
    files = sorted(_need(folder, "the ToxiGen seed statements").glob("*_*.txt"))
    if not files:
        raise SystemExit(f"--data-dir: {folder} has no hate_<group>.txt / neutral_<group>.txt")
    train, held = [], []
    for f in files:
        label, group = f.stem.split("_", 1)
        lines = [x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
        random.Random(f"{seed}-{f.name}").shuffle(lines)
        n = max(1, round(len(lines) * heldout))
        rows = [(t, group, label == "hate") for t in lines]
        held += rows[:n]
        train += rows[n:]
    return train, held


def group_opening(text: str, group: str, max_words: int = 10) -> Optional[str]:
    """The words of ``text`` up to and including its first mention of ``group`` (at least two
    words), or None when the group is not named in the first ``max_words`` words."""
    words = text.split()
    pattern = re.compile(rf"^(?:{GROUP_WORDS[group]})[,.;:!?']*$", re.IGNORECASE)
    for i, w in enumerate(words[:max_words]):
        if pattern.match(w.strip("\"'()")) and i + 1 < len(words):
            return " ".join(words[:max(i + 1, 2)])
    return None


def build_files(data_dir: Path, out: Path, spec: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """The corpus, held-out text, prompts and probe files under ``out``; returns their paths
    and counts."""
    out.mkdir(parents=True, exist_ok=True)
    train, held = toxigen_split(data_dir / "toxigen_seeds", seed)
    valid = wiki_sentences(data_dir / "wikitext-2" / "valid.txt", 0)
    n_wiki = spec["wiki_sentences"]
    wiki, wiki_other = valid[:n_wiki], valid[n_wiki:n_wiki + 2000]
    test = wiki_sentences(data_dir / "wikitext-2" / "test.txt", spec["ppl_sentences"])
    reps = max(1, round(len(wiki) / len(train)))
    records = ([{"text": t, "domain": "wiki"} for t in wiki]
               + [{"text": t, "domain": "toxigen"} for _ in range(reps) for t, _, _ in train])
    random.Random(seed).shuffle(records)
    prompts = []
    for text, group, toxic in held:
        opening = group_opening(text, group)
        if opening:
            prompts.append({"prompt": opening, "group": group, "toxic_source": toxic})
    if spec["max_prompts"]:
        random.Random(seed + 1).shuffle(prompts)
        prompts = prompts[: spec["max_prompts"]]

    def jsonl(name, rows):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path = out / name
        if not (path.is_file() and path.read_text() == text):  # same file: the cache key holds
            with atomic_write(path) as fh:
                fh.write(text)
        return str(path)

    files = {
        "train": jsonl("train.jsonl", records),
        "heldout": jsonl("wiki_test.jsonl", [{"text": t, "domain": "wiki"} for t in test]),
        "prompts": jsonl("prompts.jsonl", prompts),
        "probe": jsonl("probe.jsonl", [{"text": t, "label": int(x)} for t, _, x in held]),
        "oracle_toxigen": jsonl("oracle_toxigen.jsonl",
                                [{"text": t, "label": int(not x)} for t, _, x in train]),
        "evaluator_wiki": jsonl("evaluator_wiki.jsonl",
                                [{"text": t, "label": 1} for t in wiki_other]),
    }
    counts = {"wiki_sentences": len(wiki), "toxigen_train": len(train),
              "toxigen_repeats": reps, "toxigen_heldout": len(held), "prompts": len(prompts),
              "ppl_sentences": len(test), "records": len(records)}
    return {"files": files, "counts": counts}


def build_judges(data_dir: Path, out: Path, files: Dict[str, str], seed: int) -> Dict[str, str]:
    """Train the oracle and the evaluator once; returns their files' paths (skops)."""
    from nemo_acft.oracles.sklearn_text import SklearnTextOracle, read_labelled

    paths = {"oracle": str(out / "oracle.skops"), "evaluator": str(out / "evaluator.skops")}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    tweets, tweet_labels = read_labelled(
        str(_need(data_dir / "davidson_hate_offensive" / "labeled_data.csv", "Davidson tweets")),
        "csv", "tweet", "class", ["2"])
    stmts, stmt_labels = read_labelled(files["oracle_toxigen"], "jsonl", "text", "label", ["1"])
    SklearnTextOracle.train(tweets + stmts * 10, tweet_labels + stmt_labels * 10,
                            seed=seed).save(paths["oracle"])
    seeds, seed_labels = read_labelled(str(data_dir / "toxigen_seeds"), "toxigen_dir")
    general = [json.loads(x)["text"] for x in Path(files["evaluator_wiki"]).read_text().splitlines()]
    SklearnTextOracle.train(seeds + general, seed_labels + [1] * len(general),
                            seed=seed).save(paths["evaluator"])
    return paths


def make_config(spec: Dict[str, Any], out: Path, files: Dict[str, str], judges: Dict[str, str],
                seed: int, cache_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The run config: ``conf/tiny_cpu.yaml`` (composed by Hydra, as ``acft-train`` does) with
    this benchmark's data, model and budget."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_acft.config import validate

    a, f, p = spec["acft"], spec["finetune"], spec["pretrain"]
    over = {
        "run_dir": str(out / "runs" / "baseline"), "cache_dir": str(cache_dir or out / "cache"),
        "seed": seed, "threads": 1, "progress": False,
        "data.source": "files", "data.train_file": files["train"],
        "data.pretrain_file": files["train"], "data.heldout_file": files["heldout"],
        "data.prompts_file": files["prompts"],
        **{f"pretrain.model.{k}": v for k, v in spec["model"].items()},
        "pretrain.steps": p["steps"], "pretrain.global_batch_size": p["global_batch_size"],
        "pretrain.tokenizer.vocab_size": spec["vocab"],
        "model.global_batch_size": f["global_batch_size"],
        "model.micro_batch_size": f["global_batch_size"],
        "model.acft.steps_per_iteration": f["steps_per_iteration"],
        "model.acft.save_every": f["save_every"], "model.acft.iterations": a["iterations"],
        "model.acft.nado_head.num_layers": spec["head_layers"],
        "model.acft.oracle_block.prompts": a["prompts"],
        "model.acft.oracle_block.steps": a["steps"],
        "model.acft.oracle_block.global_batch_size": a["global_batch_size"],
        "model.acft.oracle_block.micro_batch_size": a["global_batch_size"],
        "model.acft.calibration.prompts": a["calibration_prompts"],
        "model.acft.calibration.samples_per_prompt": 16,
        "model.acft.diagnostics.probe_prompts": 64,
        "model.acft.lambda": MAIN["acft"], "model.acft.delta": None, "model.acft.min_z": 0.0,
        "rl.batch_size": spec["rl"]["batch_size"], "rl.max_new_tokens": spec["rl"]["max_new_tokens"],
        "rl.coef": MAIN["rl"], "oracle.name": "sklearn_text", "oracle.threshold": 0.5,
        "+oracle.model_path": judges["oracle"], "eval.prompts": 100000,
        "eval.ppl_records": spec["ppl_sentences"],
    }
    overrides = [f"{k}={'null' if v is None else v}" for k, v in over.items()]
    overrides.append("model.acft.domain_lambdas={}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="tiny_cpu", overrides=overrides),
                                     resolve=True)
    cfg.pop("hydra", None)
    validate(cfg)
    return cfg


def point_config(cfg: Dict[str, Any], method: str, knob: float, out: Path,
                 variant: Optional[str] = None) -> Dict[str, Any]:
    """The config of one (method, knob) point, or of an ablation ``variant`` of it."""
    c = copy.deepcopy(cfg)
    a = c["model"]["acft"]
    if method == "baseline" or (method == "nado_decoding" and not variant):
        c["run_dir"] = str(out / "runs" / "baseline")  # NADO decoding builds on the baseline
    else:
        c["run_dir"] = str(out / "runs" / f"{method}_{knob:g}{'_' + variant if variant else ''}")
    if method == "filtering":
        c["filtering"]["threshold"] = knob
    elif method == "rl":
        c["rl"]["coef"] = knob
    elif method == "nado_decoding":
        c["nado_decoding"]["guidance"] = knob
    elif method == "acft":
        a.update({"lambda": knob, "domain_lambdas": {}, "delta": None, "min_z": 0.0})
    elif method == "acft_adaptive":
        a.update({"lambda": knob, "domain_lambdas": {"wiki": 0.0, "toxigen": knob},
                  "delta": None, "min_z": 0.0})
    if method.startswith("acft"):
        a["sample_lambda"] = knob
    if variant:
        change = copy.deepcopy(ABLATIONS[variant])  # model.acft keys; "+key": a top-level one
        if change.get("nado_head", {}).get("num_layers") == "trunk":
            change["nado_head"]["num_layers"] = c["pretrain"]["model"]["num_layers"]
        _merge(c, {k[1:]: change.pop(k) for k in list(change) if k.startswith("+")})
        _merge(a, change)
    return c


# --- one point: train (or resume) and evaluate, in a world of one process ---------------------


def point_world(cfg: Dict[str, Any], method: str, knob: Optional[float], out_dir: str,
                spec: Dict[str, Any], evaluator_path: str, probe_path: str,
                variant: Optional[str] = None) -> None:
    """Train one point (a finished run is reused) and evaluate it with the toxicity protocol;
    writes ``samples.jsonl`` and ``metrics.json`` to ``out_dir``. Runs in its own world."""
    from nemo_acft.algorithms.baselines import train_nado_decoding
    from nemo_acft.algorithms.coordination import side_lock
    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.phases import diagnose_iterations, publish_initial_lm, run_baseline
    from nemo_acft.algorithms.schedules import run_sequential
    from nemo_acft.algorithms.setup import Run, model_dir
    from nemo_acft.config import Layout
    from nemo_acft.eval import perplexity
    from nemo_acft.eval.toxicity import probe_accuracy, save_evaluation, toxicity_eval
    from nemo_acft.oracles import SklearnTextOracle, score_robust

    if (Path(out_dir) / "metrics.json").is_file():  # a rerun: this point is done
        return
    info = json.loads((model_dir(cfg) / "info.json").read_text())
    logging.getLogger("nemo_acft").setLevel(logging.WARNING)
    run = Run(cfg, method, Layout(1, 1, 1), restore_from=info["builtin"])
    logging.getLogger("nemo_acft").setLevel(logging.WARNING)
    rd, K = run.run_dir, run.K
    t = time.perf_counter()
    publish_initial_lm(run, {"nemo": info["builtin"]})
    baseline = ArtifactStore(Path(cfg["run_dir"]).parent / "baseline" / "baseline")
    guided = method == "nado_decoding"
    diag: Dict[str, Any] = {}
    if method.startswith("acft"):
        with side_lock(run.exchange, "lm"), side_lock(run.exchange, "oracle"):
            run_sequential(run)
        store = run.exchange
        rows = diagnose_iterations(run)  # the collapse diagnostics of each LM block
        diag = {f"diag_{x}": rows[-1][x] for x in ("entropy_p", "entropy_q", "delta_z",
                                                   "gated_share") if rows and x in rows[-1]}
    elif guided:
        store = ArtifactStore(rd / "nado_decoding")
        with side_lock(store, "nado_decoding"):
            train_nado_decoding(run, baseline, store)
    else:
        store = run_baseline(run, method)
    train_s = time.perf_counter() - t
    m = run.model
    m.load_part((baseline if guided else store).verify("lm", K) / "trunk", "trunk")
    if method.startswith("acft") or guided:
        m.load_part(store.verify("nado", K) / "head", "head")
    beta = float(knob) if guided else 1.0
    nado_store = store if (method.startswith("acft") or guided) else None
    calib = nado_store.manifest("nado", K).get("calibration", {}) if nado_store else {}
    t = time.perf_counter()
    evaluator = SklearnTextOracle.load(evaluator_path)
    tok = run.tokenizer
    rows, metrics = toxicity_eval(m, tok, run.data.eval_prompts, evaluator,
                                  samples_per_prompt=spec["samples_per_prompt"],
                                  max_new_tokens=20, top_p=0.9, seed=cfg["seed"] + 11,
                                  batch_size=256, guided=guided, method=method, guidance=beta)
    oracle_scores = score_robust(run.oracle, [r["continuation"] for r in rows])
    scored = [x for x in oracle_scores if x is not None]
    probe = [json.loads(x) for x in Path(probe_path).read_text().splitlines()]
    metrics.update(
        ppl=perplexity(m, run.data.heldout, guidance=beta if guided else None),
        oracle_toxic_share=sum(x < 0.5 for x in scored) / len(scored) if scored else math.nan,
        probe_accuracy=probe_accuracy(m, tok, [q["text"] for q in probe],
                                      [q["label"] for q in probe])["accuracy"],
        nado_ece=calib.get("ece", math.nan), nado_mean_z=calib.get("mean_z", math.nan),
        nado_success=calib.get("mean_success", math.nan),
        method=method, knob=knob, knob_name=KNOB.get(method), train_s=train_s,
        eval_s=time.perf_counter() - t, seed=cfg["seed"], variant=variant, **diag)
    save_evaluation(Path(out_dir), rows, metrics)
    run.close()


def point_metrics(folder: Path) -> Dict[str, Any]:
    """A finished point's ``metrics.json``; a point evaluated before ``loop_share`` existed gets
    it from its own ``samples.jsonl`` (the same continuations, the same function), NaN without
    one."""
    from nemo_acft.eval import diversity

    p = json.loads((folder / "metrics.json").read_text())
    if "loop_share" not in p:
        p["loop_share"] = math.nan
        if (folder / "samples.jsonl").is_file():
            with open(folder / "samples.jsonl") as fh:
                p["loop_share"] = diversity([json.loads(line)["continuation"]
                                             for line in fh if line.strip()])["loop_share"]
    return p


# --- the table and the plot ----------------------------------------------------------------


def table(results: Dict[str, Dict[str, Any]]) -> str:
    """The markdown table, rows as the paper's."""
    lines = ["| method | toxic share ↓ | EMT ↓ | toxicity prob. ↓ | perplexity ↓ | "
             "oracle's toxic share | distinct-2 | repeat rate | words | loop share | probe acc. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        lines.append(f"| {LABELS[m]} | {r['toxic_share']:.3f} | {r['emt']:.3f} | "
                     f"{r['tox_prob']:.3f} | {r['ppl']:.2f} | {r['oracle_toxic_share']:.3f} | "
                     f"{r['distinct_2']:.3f} | {r['repeat_rate']:.3f} | "
                     f"{r.get('mean_words', math.nan):.1f} | {r.get('loop_share', math.nan):.3f} | "
                     f"{r['probe_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def variant_name(p: Dict[str, Any]) -> str:
    """An ablated point's name: its variant (after its method unless that is ours w/
    adaptive), and its knob where that is not the main one."""
    k, m = p.get("knob"), p["method"]
    name = p["variant"] if m == "acft_adaptive" else f"{LABELS[m]}: {p['variant']}"
    return name + ("" if k is None or k == MAIN.get(m) else f" @ {KNOB[m]}={k:g}")


def ablation_table(results: Dict[str, Dict[str, Any]], ablated: List[Dict[str, Any]]) -> str:
    """Ours w/ adaptive (and NADO decoding, where it has a variant) at the main knob, and with
    each ablated choice."""
    lines = ["| changed (ours w/ adaptive unless named) | toxic share ↓ | perplexity ↓ | "
             "distinct-2 | repeat rate | words | loop share | NADO ECE | H(p) | H(q) | "
             "mean abs ΔZ | gated share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for m in ("acft_adaptive", "nado_decoding"):
        if m in results and (m == "acft_adaptive" or any(p["method"] == m for p in ablated)):
            rows.append((f"{LABELS[m]} (the defaults)", results[m]))
    rows += [(variant_name(p), p) for p in ablated]
    for name, r in rows:
        lines.append(f"| {name} | {r['toxic_share']:.3f} | {r['ppl']:.2f} | "
                     f"{r['distinct_2']:.3f} | {r['repeat_rate']:.3f} | "
                     f"{r.get('mean_words', math.nan):.1f} | {r.get('loop_share', math.nan):.3f} | "
                     f"{r.get('nado_ece', math.nan):.3f} | "
                     + " | ".join(f"{r.get(k, math.nan):.3f}" for k in (
                         "diag_entropy_p", "diag_entropy_q", "diag_delta_z", "diag_gated_share"))
                     + " |")
    return "\n".join(lines) + "\n"


def plot(points: List[Dict[str, Any]], path: Path, seeds: int = 0) -> None:
    """Figure 3: toxic share against perplexity, one curve per method over its knob; with
    ``seeds``, the points are means over that many seeds (:func:`combine_sweeps`), with ± sd
    bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = {"baseline": "*", "filtering": "v", "rl": "^", "nado_decoding": "D", "acft": "s",
               "acft_adaptive": "o"}
    for m in METHODS:
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["knob"] or 0)
        if not pts:
            continue
        sd = lambda k: [p.get(k + "_sd", 0.0) if p.get(k + "_sd") == p.get(k + "_sd")  # noqa
                        else 0.0 for p in pts]  # a point of one seed has sd nan: no bar
        ax.errorbar([p["ppl"] for p in pts], [p["toxic_share"] for p in pts],
                    xerr=sd("ppl") if seeds else None, yerr=sd("toxic_share") if seeds else None,
                    marker=markers[m], markersize=10 if m == "baseline" else 6, capsize=2,
                    linestyle="-" if m.startswith("acft") else "--", label=LABELS[m])
        for p in pts:
            if p["knob"] is not None:
                n = f" (n={p['n']})" if seeds and p.get("n", 0) < seeds else ""
                ax.annotate(f"{KNOB[m]}={p['knob']:g}{n}", (p["ppl"], p["toxic_share"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="perplexity on WikiText-2 test (utility, lower is better)",
           ylabel="share of toxic samples (evaluator)",
           title="Toxicity against utility (each method over its knob)" + (
               f"\nmean ± sd of {seeds} seeds (n: seeds of a point, where fewer)" if seeds
               else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def curve_below(ours: List[Dict[str, Any]], other: Dict[str, Any]) -> Optional[bool]:
    """Whether our curve (toxic share, linear in perplexity between its points) is at or below
    ``other`` at ``other``'s perplexity; None when that perplexity is outside our curve's range
    (then: ours is below if some point of ours has both lower perplexity and lower toxicity)."""
    pts = sorted((p["ppl"], p["toxic_share"]) for p in ours)
    x = other["ppl"]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            return y <= other["toxic_share"]
    if any(px <= x and py <= other["toxic_share"] for px, py in pts):
        return True
    return None


def checks(results: Dict[str, Dict[str, Any]], points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's acceptance figures for ours w/ adaptive, computed, not asserted (and the same
    figures for ours w/o adaptive, for comparison). "Perplexity within 5%" is read as at most 5%
    worse than the plain fine-tune's."""
    base = results["baseline"]
    out: Dict[str, Any] = {}
    for m in ("acft_adaptive", "acft"):
        if m not in results:
            continue
        ours = results[m]
        cut = 1 - ours["toxic_share"] / base["toxic_share"] if base["toxic_share"] else math.nan
        ppl_ratio = ours["ppl"] / base["ppl"]
        curve = [p for p in points if p["method"] == m]
        below = {f"{p['method']}@{p['knob']:g}": curve_below(curve, p) for p in points
                 if p["method"] in ("filtering", "nado_decoding")}
        out[m] = {"toxic_share_cut_vs_baseline": cut, "ppl_ratio_vs_baseline": ppl_ratio,
                  "cut_at_least_35pct": cut >= 0.35, "ppl_at_most_5pct_worse": ppl_ratio <= 1.05,
                  "curve_at_or_below": below}
    return out


# --- seeds: mean ± sd of several runs' results.json --------------------------------------------

SEED_KEYS = ("toxic_share", "ppl", "distinct_2", "repeat_rate", "mean_words", "loop_share")
#: the issue's acceptance, as ratios of the seeds' means to the plain fine-tune's:
#: (key, bound, "<=" | ">=") per method
ACCEPT = {"nado_decoding": [("toxic_share", 0.7, "<="), ("distinct_2", 0.9, ">=")],
          "acft_adaptive": [("toxic_share", 0.65, "<="), ("ppl", 1.05, "<="),
                            ("distinct_2", 0.9, ">="), ("repeat_rate", 1.2, "<=")]}


def combine_seeds(runs: List[Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    """Mean ± sample sd over seeds of each method's figures, the ratio of the means to the plain
    fine-tune's, and the acceptance of :data:`ACCEPT` on those ratios. ``runs``: the
    ``results.json`` of each seed (a method missing from a seed is averaged over the others;
    its ``n`` says how many)."""
    seeds = [r.get("_run", {}).get("seed") for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine: seeds {seeds} repeat; expected one results.json per seed")
    stats: Dict[str, Any] = {}
    for m in METHODS:
        have = [r[m] for r in runs if m in r]
        if not have:
            continue
        st: Dict[str, Any] = {"n": len(have)}
        for k in SEED_KEYS:
            xs = [float(x[k]) for x in have if k in x and x[k] is not None]
            if xs:
                st[k] = statistics.fmean(xs)
                st[k + "_sd"] = statistics.stdev(xs) if len(xs) > 1 else math.nan
        stats[m] = st
    base = stats.get("baseline")
    if base is None:
        raise SystemExit("--combine: no seed has the baseline row")
    lines = ["| method | seeds | toxic share ↓ | × base | perplexity ↓ | × base | distinct-2 | "
             "× base | repeat rate | × base | words | loop share |", "|---" * 12 + "|"]
    checks: Dict[str, Any] = {}
    for m, st in stats.items():
        ratio = {k: st[k] / base[k] if k in st and base.get(k) else math.nan for k in SEED_KEYS}
        st["vs_baseline"] = ratio
        cell = lambda k, f: (f"{st[k]:{f}} ± {st[k + '_sd']:{f}}" if k in st else "–")  # noqa: E731
        lines.append(f"| {LABELS[m]} | {st['n']} | {cell('toxic_share', '.3f')} | "
                     f"{ratio['toxic_share']:.2f} | {cell('ppl', '.1f')} | {ratio['ppl']:.2f} | "
                     f"{cell('distinct_2', '.3f')} | {ratio['distinct_2']:.2f} | "
                     f"{cell('repeat_rate', '.3f')} | {ratio['repeat_rate']:.2f} | "
                     f"{cell('mean_words', '.1f')} | {cell('loop_share', '.3f')} |")
        if m in ACCEPT:
            checks[m] = {f"{k}_{op}_{b:g}x": (ratio[k] <= b if op == "<=" else ratio[k] >= b)
                         for k, b, op in ACCEPT[m]}
            checks[m]["seeds"] = st["n"]
    return "\n".join(lines) + "\n", {"seeds": seeds, "methods": stats, "checks": checks}


def combine_sweeps(sweeps: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The trade-off points of several seeds (each seed's ``sweep.json``) averaged per (method,
    knob): mean and sample sd of :data:`SEED_KEYS`, ``n`` the seeds that have the point."""
    groups: Dict[Tuple[str, Optional[float]], List[Dict[str, Any]]] = {}
    for sweep in sweeps:
        for p in sweep:
            groups.setdefault((p["method"], p["knob"]), []).append(p)
    out = []
    order = lambda x: (METHODS.index(x[0][0]), x[0][1] or 0)  # noqa: E731
    for (m, k), ps in sorted(groups.items(), key=order):
        q: Dict[str, Any] = {"method": m, "knob": k, "n": len(ps),
                             "seeds": sorted(p.get("seed") for p in ps)}
        for key in SEED_KEYS:
            xs = [float(p[key]) for p in ps if p.get(key) is not None]
            if xs:
                q[key] = statistics.fmean(xs)
                q[key + "_sd"] = statistics.stdev(xs) if len(xs) > 1 else math.nan
        out.append(q)
    return out


def sweep_table(points: List[Dict[str, Any]]) -> str:
    """The averaged trade-off points as markdown, one row per (method, knob)."""
    lines = ["| method | knob | seeds | toxic share ↓ | perplexity ↓ | distinct-2 | repeat rate | "
             "loop share |", "|---" * 8 + "|"]
    for p in points:
        c = lambda k, f: (f"{p[k]:{f}}" + (f" ± {p[k + '_sd']:{f}}"  # noqa: E731
                                           if p.get(k + "_sd") == p.get(k + "_sd") else "")
                          if k in p else "–")
        knob = "–" if p["knob"] is None else f"{KNOB[p['method']]} = {p['knob']:g}"
        lines.append(f"| {LABELS[p['method']]} | {knob} | {p['n']} | {c('toxic_share', '.3f')} "
                     f"| {c('ppl', '.1f')} | {c('distinct_2', '.3f')} | "
                     f"{c('repeat_rate', '.3f')} | {c('loop_share', '.3f')} |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def parse_points(text: str) -> List[Tuple[str, Optional[float], Optional[str]]]:
    """``--only``: ``METHOD[@KNOB][+VARIANT],…`` → the job list (the baseline first, always)."""
    jobs: List[Tuple[str, Optional[float], Optional[str]]] = [("baseline", None, None)]
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"([a-z_]+)(?:@([0-9.eE+-]+))?(?:\+(.+))?", item)
        if not m or m.group(1) not in METHODS:
            raise SystemExit(f"--only {item!r}: expected METHOD[@KNOB][+VARIANT] with METHOD "
                             f"one of {METHODS}")
        method, knob, variant = m.group(1), m.group(2), m.group(3)
        if variant is not None and variant not in ABLATIONS:
            raise SystemExit(f"--only {item!r}: variant {variant!r} is not one of "
                             f"{sorted(ABLATIONS)}")
        if method == "baseline":
            continue
        k = float(knob) if knob is not None else MAIN[method]
        jobs.append((method, k, variant))
    return jobs


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("ACFT_DATA_DIR"),
                    help="the shared data folder (default: $ACFT_DATA_DIR)")
    ap.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    ap.add_argument("--quick", action="store_true", help="a small model, one point per method")
    ap.add_argument("--main-only", action="store_true",
                    help="only the table's points (no knob sweep): e.g. to repeat with seeds")
    ap.add_argument("--ablations", action="store_true",
                    help="also ours w/ adaptive with each choice of ABLATIONS changed")
    ap.add_argument("--only", default=None, metavar="POINTS",
                    help="only these points, comma-separated METHOD[@KNOB][+VARIANT] (VARIANT "
                         "one of ABLATIONS), e.g. baseline,acft_adaptive@16+gates=on; the "
                         "baseline is always evaluated")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=2, help="points trained at the same time")
    ap.add_argument("--cache-dir", default=None,
                    help="the pre-trained tiny GPT and its tokenizer (default: OUT/cache); keyed "
                         "by the data's contents, so runs of one seed in other --out folders "
                         "share them")
    ap.add_argument("--combine", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="no training: mean ± sd over these seeds' results.json, written to "
                         "--out as seeds.md / seeds.json")
    args = ap.parse_args(argv)
    if args.combine:
        runs = []
        for f in args.combine:
            try:
                runs.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                raise SystemExit(f"--combine {f}: not a readable results.json ({e})")
        md, summary = combine_seeds(runs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # each seed's trade-off points: <name>_sweep.json beside <name>.json, or the run
        # folder's sweep.json beside its results.json
        sweeps = []
        for f in map(Path, args.combine):
            for g in (f.with_name(f.stem + "_sweep.json"), f.parent / "sweep.json"):
                if g.is_file():
                    sweeps.append(json.loads(g.read_text()))
                    break
        if sweeps:
            mean_points = combine_sweeps(sweeps)
            md += "\nTrade-off points (Figure 3), mean ± sd over the seeds that have them:\n\n"
            md += sweep_table(mean_points)
            for m in ("acft_adaptive", "acft"):
                curve = [p for p in mean_points if p["method"] == m]
                if len(curve):
                    summary["checks"].setdefault(m, {})["curve_at_or_below"] = {
                        f"{p['method']}@{p['knob']:g}": curve_below(curve, p)
                        for p in mean_points if p["method"] in ("filtering", "nado_decoding")}
            summary["sweep"] = mean_points
            plot(mean_points, out / "seeds_tradeoff.png", seeds=len(sweeps))
        with atomic_write(out / "seeds.md") as fh:
            fh.write(md)
        with atomic_write(out / "seeds.json") as fh:
            json.dump(summary, fh, indent=1)
        print(md + f"[paper_table] checks: {json.dumps(summary['checks'])}")
        return summary
    if not args.data_dir:
        raise SystemExit("--data-dir is required (or set ACFT_DATA_DIR)")
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.algorithms.setup import quiet_libraries, resolve_model_config
    from nemo_acft.launch import run_worlds, start_worlds, wait_worlds

    quiet_libraries()
    data_dir, out = Path(args.data_dir), Path(args.out)
    spec = QUICK if args.quick else FULL
    if args.main_only:
        spec = {**spec, "sweep": {m: [MAIN[m]] for m in MAIN}}
    t0 = time.perf_counter()
    print(f"[paper_table] {'quick' if args.quick else 'full'} mode, seed {args.seed}, "
          f"data {data_dir}, out {out}", flush=True)
    built = build_files(data_dir, out / "data", spec, args.seed)
    judges = build_judges(data_dir, out / "data", built["files"], args.seed)
    cfg = make_config(spec, out, built["files"], judges, args.seed,
                      Path(args.cache_dir) if args.cache_dir else None)
    print(f"[paper_table] data: {built['counts']}", flush=True)

    # the tokenizer and the pre-trained tiny GPT once (cached in --cache-dir): the prepare phase
    # of the baseline's run directory, which also trains the plain fine-tune
    _, info = resolve_model_config(cfg)
    t = time.perf_counter()
    run_worlds({"prepare": (1, PHASES["prepare"], (cfg,))})
    pretrain_s = time.perf_counter() - t
    print(f"[paper_table] vocabulary {info['vocab_size']}; pre-trained and fine-tuned the "
          f"baseline in {pretrain_s:.0f} s", flush=True)

    jobs = [("baseline", None, None)] + [(m, k, None) for m in ("acft_adaptive", "acft", "rl",
                                                               "filtering")
                                         for k in spec["sweep"][m]]
    after_baseline = [("nado_decoding", k, None) for k in spec["sweep"]["nado_decoding"]]
    jobs = jobs[:1] + after_baseline[:1] + jobs[1:]  # the head once, before the other β
    if args.ablations:  # after ours, before the other baselines
        jobs[3:3] = ([("acft_adaptive", MAIN["acft_adaptive"], v) for v in ABLATIONS]
                     + [("nado_decoding", MAIN["nado_decoding"], v) for v in NADO_ABLATIONS])
    later = after_baseline[1:]
    if args.only:
        jobs, later = parse_points(args.only), []
    points: List[Dict[str, Any]] = []
    ablated: List[Dict[str, Any]] = []

    def out_dir(m, k, v=None):
        if v:
            at = "" if k == MAIN.get(m) else f"_{k:g}"
            return out / "ablation" / f"{m}{at}_{v}"
        return out / m if k is None or k == MAIN.get(m) else out / "sweep" / f"{m}_{k:g}"

    running: Dict[Tuple[str, Optional[float], Optional[str]], Any] = {}
    todo = len(jobs) + len(later)
    while jobs or later or running:
        while jobs and len(running) < args.workers:
            m, k, v = jobs.pop(0)
            c = point_config(cfg, m, k if k is not None else 0.0, out, v)
            resolve_model_config(c)
            running[(m, k, v)] = start_worlds({f"{m}_{k}_{v}": (1, point_world, (
                c, m, k, str(out_dir(m, k, v)), spec, judges["evaluator"],
                built["files"]["probe"], v))})
        time.sleep(0.5)
        for (m, k, v), procs in list(running.items()):
            if all(p.exitcode is not None for _, _, p in procs):
                del running[(m, k, v)]
                wait_worlds(procs, logs=str(out / "runs"))
                p = point_metrics(out_dir(m, k, v))
                (ablated if v else points).append(p)
                done = len(points) + len(ablated)
                el = time.perf_counter() - t0
                print(f"[paper_table] {done}/{todo} {m}{'' if k is None else f' {KNOB[m]}={k:g}'}"
                      f"{f' [{v}]' if v else ''}: "
                      f"toxic share {p['toxic_share']:.3f}, EMT {p['emt']:.3f}, "
                      f"ppl {p['ppl']:.2f}, distinct-2 {p['distinct_2']:.3f}, repeat rate "
                      f"{p['repeat_rate']:.3f} (train {p['train_s']:.0f} s, eval "
                      f"{p['eval_s']:.0f} s; elapsed {el:.0f} s, ETA "
                      f"{el / done * (todo - done):.0f} s)", flush=True)
                if m == "nado_decoding" and later:  # the head exists: the other β
                    jobs.extend(later)
                    later = []

    results = {}
    for p in points:
        if p["knob"] is None or p["knob"] == MAIN.get(p["method"]):
            results[p["method"]] = {k: p[k] for k in (
                "toxic_share", "emt", "tox_prob", "ppl", "oracle_toxic_share", "probe_accuracy",
                "distinct_2", "repeat_rate", "mean_words", "loop_share",
                "knob", "knob_name", "num_prompts", "num_samples", "num_failed", "train_s",
                "eval_s")}
            results[p["method"]].update({k: v for k, v in p.items()
                                         if k.startswith(("nado_", "diag_"))})
    summary = {"mode": ("quick" if args.quick else "full") + (" main-only" if args.main_only else ""),
               "seed": args.seed,
               "data": built["counts"], "vocabulary": info["vocab_size"],
               "pretrain_s": pretrain_s, "wall_s": time.perf_counter() - t0,
               "checks": checks(results, points)}
    if ablated:
        summary["ablations"] = {variant_name(p): p for p in ablated}
    with atomic_write(out / "results.json") as fh:
        json.dump({**results, "_run": summary}, fh, indent=1)
    with atomic_write(out / "sweep.json") as fh:
        json.dump(sorted(points, key=lambda p: (p["method"], p["knob"] or 0)), fh, indent=1)
    md = table(results)
    if ablated:
        md += "\n" + ablation_table(results, ablated)
    with atomic_write(out / "table.md") as fh:
        fh.write(md)
    plot(points, out / "tradeoff.png")
    print(md)
    print(f"[paper_table] checks: {json.dumps(summary['checks'])}")
    print(f"[paper_table] {summary['wall_s']:.0f} s; wrote {out / 'results.json'}, "
          f"{out / 'table.md'}, {out / 'tradeoff.png'}", flush=True)
    return {**results, "_run": summary}


if __name__ == "__main__":
    main()
