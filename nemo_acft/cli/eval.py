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
NeMo tokenizer; ``--guided`` with an ACFT ``.nemo`` that holds the head). The evaluator is any
oracle (``--evaluator NAME key=value ...``, default the run's own oracle, or ``lexicon``).
Writes ``<out>/samples.jsonl`` (``prompt``, ``continuation``, ``score`` = toxicity, ``method``)
and ``<out>/metrics.json``; ``--compare`` writes ``compare.md`` (one markdown table) and
``tradeoff.png`` (toxic share against perplexity). ``--out`` is written whole under a
temporary name and renamed; a folder that holds anything is refused unless ``--overwrite``.
An ``--out`` inside ``--run-dir`` takes the run's ``eval`` lock (refused while the run is being
trained). Under torchrun, every rank of the world runs it (``--tensor-model-parallel-size``);
rank 0 writes. Errors are one line, ``error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

from nemo_acft.errors import InputError, entry_point
from nemo_acft.io_utils import atomic_write, replace_dir, save_figure, tmp_name


def _kv(pairs: List[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for p in pairs:
        if "=" not in p:
            raise InputError(f"--evaluator argument {p!r}: expected key=value")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def evaluate(args) -> Dict[str, Any]:
    import torch.distributed as dist

    from nemo_acft.cli.load import load_nemo, load_run
    from nemo_acft.data import encode_records, read_prompts, read_records
    from nemo_acft.eval.metrics import perplexity
    from nemo_acft.eval.toxicity import probe_accuracy, save_evaluation, toxicity_eval
    from nemo_acft.oracles import build_oracle

    if args.run_dir:
        got = load_run(args.run_dir, args.store, args.iteration, args.guided,
                       args.tensor_model_parallel_size)
    else:
        got = load_nemo(args.nemo, args.guided, args.tensor_model_parallel_size)
    model, tok, run = got.model, got.tokenizer, got.run
    guided = got.guided
    if args.prompts:
        prompts, _ = read_prompts(args.prompts)
    elif run is not None:
        prompts = run.data.eval_prompts
    else:
        raise InputError("--prompts is required with --nemo")
    prompts = prompts[: args.num_prompts] if args.num_prompts else prompts
    if args.evaluator:
        ev_cfg = {"name": args.evaluator, **_kv(args.evaluator_args)}
    elif run is not None:
        ev_cfg = dict(run.cfg["oracle"])
    else:
        ev_cfg = {"name": "lexicon"}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    evaluator = build_oracle(ev_cfg) if rank0 else None
    rows, metrics = toxicity_eval(model, tok, prompts, evaluator,
                                  samples_per_prompt=args.samples_per_prompt,
                                  max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                                  seed=args.seed, batch_size=args.batch_size,
                                  guided=guided, method=args.method, guidance=args.guidance)
    guidance = args.guidance if guided else None  # NADO decoding: the perplexity of q
    seq = int(model.cfg.encoder_seq_length)
    if args.heldout:
        records, _ = read_records(args.heldout)
        held = encode_records(records[: args.ppl_records], tok, seq, ["general"])
        metrics["ppl"] = perplexity(model, held, guidance=guidance)
    elif run is not None:
        metrics["ppl"] = perplexity(model, run.data.heldout, guidance=guidance)
    else:
        metrics["ppl"] = math.nan
    if args.probe:
        statements = [json.loads(line) for line in Path(args.probe).read_text().splitlines()
                      if line.strip()]
        metrics["probe_accuracy"] = probe_accuracy(
            model, tok, [s["text"] for s in statements],
            [int(s["label"]) for s in statements])["accuracy"]
    metrics.update(method=args.method, checkpoint=got.label, guided=bool(guided),
                   guidance=args.guidance if guided else None, evaluator=ev_cfg["name"],
                   samples_per_prompt=args.samples_per_prompt,
                   max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed)
    out = Path(args.out)
    if rank0:
        with output_folder(out) as tmp:
            save_evaluation(tmp, rows, metrics)
        print(f"{args.method}: toxic share {metrics['toxic_share']:.3f}, EMT {metrics['emt']:.3f}, "
              f"toxicity probability {metrics['tox_prob']:.3f}, perplexity {metrics['ppl']:.3f}, "
              f"distinct-2 {metrics['distinct_2']:.3f}, repeat rate {metrics['repeat_rate']:.3f} "
              f"({metrics['num_samples']} samples, {metrics['num_failed']} unscored) -> {out}")
    return metrics


COLUMNS = (("toxic_share", "toxic share"), ("emt", "EMT"), ("tox_prob", "tox. prob."),
           ("ppl", "perplexity"), ("distinct_2", "distinct-2"), ("repeat_rate", "repeat rate"))


def compare(dirs: List[str], out: Path) -> str:
    """One markdown table of several evaluations' metrics.json, and a trade-off PNG."""
    rows = []
    for d in dirs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise InputError(f"--compare {d}: no metrics.json")
        try:
            m = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"--compare {d}: {p} is not JSON ({e})") from None
        rows.append((m.get("method") or Path(d).name, m))
    lines = ["| method | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, math.nan):.3f}" for k, _ in COLUMNS)
                     + " |")
    table = "\n".join(lines) + "\n"
    with output_folder(out) as tmp:
        with atomic_write(tmp / "compare.md") as fh:
            fh.write(table)
        _plot(rows, tmp / "tradeoff.png")
    print(table, end="")
    return table


def _plot(rows, path: Path) -> None:
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
    save_figure(fig, path)


def check_output(out: Path, overwrite: bool) -> None:
    """A folder that holds anything is refused unless ``overwrite``; a file is refused."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty; pass --overwrite to replace it, "
                         "or choose another folder")


@contextlib.contextmanager
def output_folder(out: Path):
    """A temporary folder beside ``out``, put in its place whole when the block succeeds."""
    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def run_lock_for(args):
    """The run's ``eval`` lock when ``--out`` is inside ``--run-dir`` (rank 0; acft-eval's
    and acft-harness's)."""
    import torch.distributed as dist

    from nemo_acft.world import world_env
    from nemo_acft.runlock import lock_run

    inside = args.run_dir and Path(args.out).resolve().is_relative_to(
        Path(args.run_dir).resolve())
    if not inside or world_env()["rank"] != 0 or (dist.is_initialized() and dist.get_rank()):
        yield
        return
    with lock_run(args.run_dir, "eval"):
        yield


@entry_point
def main(argv=None) -> None:
    """``acft-eval --run-dir R | --nemo F | --compare D ... --out O``"""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="an acft-train run directory")
    src.add_argument("--nemo", help="a GPT .nemo")
    src.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="evaluation folders")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--store", default="exchange",
                    choices=("exchange", "baseline", "filtering", "rl", "nado_decoding"),
                    help="which of the run's models (a baseline's folder, or ACFT's exchange)")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1,
                    help="the model's tensor-parallel size (the world: torchrun's, or one "
                         "process)")
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
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an --out folder that holds anything (otherwise refused)")
    args = ap.parse_args(argv)
    check_output(Path(args.out), args.overwrite)
    if args.compare:
        compare(args.compare, Path(args.out))
        return
    with run_lock_for(args):
        evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
