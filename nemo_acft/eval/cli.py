"""``acft-eval``: the toxicity protocol, perplexity and the probe for one checkpoint, and
``--compare`` for several evaluations.

    acft-eval --run-dir runs/tiny_cpu --prompts prompts.txt --out eval/acft --method acft
    acft-eval --run-dir runs/tiny_cpu --store baseline --out eval/base --method baseline
    acft-eval --run-dir runs/tiny_cpu --store nado_decoding --out eval/nado --method nado_decoding
    acft-eval --nemo acft_gpt.nemo --prompts prompts.txt --heldout test.txt --out eval/nemo
    acft-eval --compare eval/base eval/acft eval/nado --out eval/compare

A checkpoint is a run directory of ``acft-train`` (θ_k of ``exchange/``, ``baseline/`` or a
baseline's folder, the last iteration by default; ``--guided`` samples from q ∝ p·R^β with φ_k;
``--store nado_decoding`` is the NADO decoding baseline, always guided) or a GPT ``.nemo`` (any
NeMo tokenizer). The evaluator is any oracle (``--evaluator NAME key=value ...``, default the
run's own oracle, or ``lexicon``). Writes ``<out>/samples.jsonl`` (``prompt``, ``continuation``,
``score`` = toxicity, ``method``) and ``<out>/metrics.json``; ``--compare`` writes
``compare.md`` (one markdown table) and ``tradeoff.png`` (toxic share against perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from nemo_acft.io_utils import atomic_write, save_figure


def _kv(pairs: List[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--evaluator argument {p!r}: expected key=value")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


class _NeMoTokenizer:
    """NeMo's tokenizer behind the ``encode``/``decode``/ids interface of our sampler."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = int(tok.eos_id)
        pad = getattr(tok, "pad_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else self.eos_id

    def encode(self, text: str) -> List[int]:  # noqa: D102
        return list(self.tok.text_to_ids(text))

    def decode(self, ids) -> str:  # noqa: D102
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        try:
            return self.tok.ids_to_text(ids)
        except (ValueError, KeyError, IndexError):
            # an id the tokenizer cannot decode (e.g. 256..511 of NeMo's byte-level vocabulary
            # of 512) is dropped, not an error: a sampled id is not always a text
            ok = []
            for i in ids:
                try:
                    self.tok.ids_to_text(ok + [i])
                    ok.append(i)
                except (ValueError, KeyError, IndexError):
                    pass
            return self.tok.ids_to_text(ok)


def load_trained(run_dir: Path, store: str, gcfg, seed: int, iteration: Optional[int] = None,
                 guided: bool = False):
    """``(model, label, guided)`` of one trained model of a run directory: θ_k of
    ``run_dir/<store>`` (the last iteration by default), with ACFT's φ_k when ``guided``; the
    ``nado_decoding`` store is always guided (its fixed LM, ``lm/iter_0``, with its own φ_k).
    An unguided model is a plain GPTModel."""
    from nemo_acft.training.exchange import ArtifactStore
    from nemo_acft.training.setup import build_model

    st = ArtifactStore(run_dir / store)
    if store == "nado_decoding":
        heads = st.iterations("nado")
        if not heads or not st.exists("lm", 0):
            raise SystemExit(f"--run-dir {run_dir}: {st.root} holds no NADO decoding baseline")
        k = heads[-1] if iteration is None else iteration
        if k not in heads:
            raise SystemExit(f"--iteration {k}: not in {st.root / 'nado'} (have {heads})")
        model = build_model(gcfg, seed, with_head=True)
        model.load_base_state_dict(st.load("lm", 0, "model.pt"))
        model.load_head_state_dict(st.load("nado", k, "head.pt"))
        return model, f"{store}/nado/iter_{k}", True
    its = st.iterations("lm")
    if not its:
        raise SystemExit(f"--run-dir {run_dir}: {st.root / 'lm'} holds no iteration")
    k = its[-1] if iteration is None else iteration
    if k not in its:
        raise SystemExit(f"--iteration {k}: not in {st.root / 'lm'} (have {its})")
    model = build_model(gcfg, seed, with_head=guided)
    if guided:
        ex = ArtifactStore(run_dir / "exchange")
        if not ex.exists("nado", k):
            raise SystemExit(f"--guided: {ex.path('nado', k)} does not exist")
        model.load_base_state_dict(st.load("lm", k, "model.pt"))
        model.load_head_state_dict(ex.load("nado", k, "head.pt"))
    else:
        model.load_state_dict(st.load("lm", k, "model.pt"), strict=True)
    return model, f"{store}/lm/iter_{k}", guided


def load_run(run_dir: Path, store: str, iteration: Optional[int], guided: bool):
    """(model, tokenizer, vocab_size, run config, run data, label, guided) of a run directory
    (:func:`load_trained` after the run's config, process and data)."""
    import yaml

    from nemo_acft.training.setup import build_data, gpt_config, init_process

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"--run-dir {run_dir}: no config.yaml (not an acft-train run)")
    cfg = yaml.safe_load(cfg_path.read_text())
    init_process(cfg)
    data = build_data(cfg)
    model, label, guided = load_trained(run_dir, store, gpt_config(cfg, len(data.tokenizer)),
                                        cfg["seed"], iteration, guided)
    return model, data.tokenizer, len(data.tokenizer), cfg, data, label, guided


def load_nemo(path: Path):
    """(model, tokenizer, vocab_size, sequence length) of a GPT ``.nemo``."""
    import nemo_acft.nemo  # noqa: F401  (version check, and the CPU patches when CUDA is absent)
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    from nemo_acft.models import init_distributed

    if not path.is_file():
        raise SystemExit(f"--nemo {path}: no such file")
    cfg = MegatronGPTModel.restore_from(str(path), return_config=True)
    init_distributed(tp=1, pp=1, seed=cfg.get("seed", 1234))
    trainer = Trainer(accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1,
                      strategy=NLPDDPStrategy(), logger=False, enable_checkpointing=False,
                      use_distributed_sampler=False)
    nemo_model = MegatronGPTModel.restore_from(str(path), trainer=trainer)
    tok = _NeMoTokenizer(nemo_model.tokenizer)
    return (nemo_model.model, tok, int(nemo_model.tokenizer.vocab_size),
            int(cfg.get("encoder_seq_length", 512)))


def evaluate(args) -> Dict[str, Any]:
    from nemo_acft.data import encode_records, read_prompts, read_records
    from nemo_acft.eval.metrics import perplexity
    from nemo_acft.eval.toxicity import probe_accuracy, save_evaluation, toxicity_eval
    from nemo_acft.oracles import build_oracle

    run_cfg, data, seq = None, None, None
    if args.run_dir:
        model, tok, vocab, run_cfg, data, label, args.guided = load_run(
            Path(args.run_dir), args.store, args.iteration, args.guided)
    else:
        if args.guided:
            raise SystemExit("--guided needs --run-dir (the NADO head of an acft-train run)")
        model, tok, vocab, seq = load_nemo(Path(args.nemo))
        label = str(args.nemo)
    if args.prompts:
        prompts, _ = read_prompts(args.prompts)
    elif data is not None:
        prompts = data.eval_prompts
    else:
        raise SystemExit("--prompts is required with --nemo")
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    if args.evaluator:
        ev_cfg = {"name": args.evaluator, **_kv(args.evaluator_args)}
    elif run_cfg is not None:
        ev_cfg = dict(run_cfg["oracle"])
    else:
        ev_cfg = {"name": "lexicon"}
    evaluator = build_oracle(ev_cfg)
    rows, metrics = toxicity_eval(model, tok, prompts, evaluator, vocab_size=vocab,
                                  samples_per_prompt=args.samples_per_prompt,
                                  max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                                  seed=args.seed, batch_size=args.batch_size,
                                  guided=args.guided, method=args.method,
                                  guidance=args.guidance)
    guidance = args.guidance if args.guided else None  # NADO decoding: the perplexity of q
    if args.heldout:
        records, _ = read_records(args.heldout)
        seq = run_cfg["model"]["seq_length"] if run_cfg else seq
        held = encode_records(records[: args.ppl_records], tok, seq, ["general"])
        metrics["ppl"] = perplexity(model, held, guidance=guidance)
    elif data is not None:
        metrics["ppl"] = perplexity(model, data.heldout, guidance=guidance)
    else:
        metrics["ppl"] = math.nan
    if args.probe:
        statements = [json.loads(line) for line in Path(args.probe).read_text().splitlines()
                      if line.strip()]
        metrics["probe_accuracy"] = probe_accuracy(
            model, tok, [s["text"] for s in statements],
            [int(s["label"]) for s in statements])["accuracy"]
    metrics.update(method=args.method, checkpoint=label, guided=bool(args.guided),
                   guidance=args.guidance if args.guided else None, evaluator=ev_cfg["name"],
                   samples_per_prompt=args.samples_per_prompt,
                   max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed)
    out = Path(args.out)
    save_evaluation(out, rows, metrics)
    print(f"{args.method}: toxic share {metrics['toxic_share']:.3f}, EMT {metrics['emt']:.3f}, "
          f"toxicity probability {metrics['tox_prob']:.3f}, perplexity {metrics['ppl']:.3f} "
          f"({metrics['num_samples']} samples, {metrics['num_failed']} unscored) -> {out}")
    return metrics


COLUMNS = (("toxic_share", "toxic share"), ("emt", "EMT"), ("tox_prob", "tox. prob."),
           ("ppl", "perplexity"))


def compare(dirs: List[str], out: Path) -> str:
    """One markdown table of several evaluations' metrics.json, and a trade-off PNG."""
    rows = []
    for d in dirs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise SystemExit(f"--compare {d}: no metrics.json")
        m = json.loads(p.read_text())
        rows.append((m.get("method") or Path(d).name, m))
    lines = ["| method | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, math.nan):.3f}" for k, _ in COLUMNS)
                     + " |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "compare.md") as fh:
        fh.write(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, m in rows:
        ax.scatter(m.get("ppl", math.nan), m.get("toxic_share", math.nan), s=40)
        ax.annotate(name, (m.get("ppl", math.nan), m.get("toxic_share", math.nan)),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="perplexity (lower is better)", ylabel="toxic share (lower is better)",
           title="toxicity vs utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "tradeoff.png")
    print(table, end="")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="an acft-train run directory")
    src.add_argument("--nemo", help="a GPT .nemo")
    src.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="evaluation folders")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--store", default="exchange",
                    choices=("exchange", "baseline", "filtering", "rl", "nado_decoding"),
                    help="which of the run's models (a baseline's folder, or ACFT's exchange)")
    ap.add_argument("--iteration", type=int, default=None, help="default: the last")
    ap.add_argument("--guided", action="store_true", help="NADO-guided decoding with φ_k")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="guided decoding from q ∝ p·R^guidance (default 1: METHOD.md's q)")
    ap.add_argument("--method", default="model", help="the name in samples.jsonl and tables")
    ap.add_argument("--prompts", help="prompts (.jsonl with prompt/text, or text)")
    ap.add_argument("--num-prompts", type=int, default=0, help="the first n prompts (0 = all)")
    ap.add_argument("--heldout", help="held-out text for perplexity (default: the run's)")
    ap.add_argument("--ppl-records", type=int, default=2000)
    ap.add_argument("--probe", help="JSONL of labelled statements (text, label 1 = toxic)")
    ap.add_argument("--evaluator", help="oracle name (default: the run's oracle, or lexicon)")
    ap.add_argument("evaluator_args", nargs="*", help="key=value settings of the evaluator")
    ap.add_argument("--samples-per-prompt", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare, Path(args.out))
        return
    evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
