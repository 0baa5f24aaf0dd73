"""The whole run (``role=all``): pre-train (or load the cached) tiny GPT, the baseline fine-tune,
ACFT under the chosen schedule, the evaluation of every θ_k, ``summary.json``, the plot."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List

from nemo_acft.io_utils import atomic_write
from nemo_acft.training.exchange import ArtifactStore
from nemo_acft.training.run import Side, run_lm_side, run_parallel, run_sequential, side_lock
from nemo_acft.training.setup import (build_model, ensure_pretrained, init_process, log_to_file,
                                      regularizer_config, validate)

log = logging.getLogger("nemo_acft")

#: config keys that may change between a run and its resumption
_VOLATILE = ("role", "progress", "acft.exchange_timeout_s")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_config(cfg: Dict[str, Any], run_dir: Path) -> Path:
    """Save the resolved config; if the run directory already holds a different one, raise a
    ValueError naming the keys that differ (a rerun must be the same run to resume it)."""
    import yaml

    path = run_dir / "config.yaml"
    if path.is_file():
        old = _flatten(yaml.safe_load(path.read_text()))
        new = _flatten(cfg)
        diff = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and not k.startswith(_VOLATILE))
        if diff:
            raise ValueError(
                f"run_dir {run_dir} holds a run with a different config (keys: "
                f"{', '.join(diff[:8])}); rerun with the same config to resume, or choose "
                "another run_dir")
    with atomic_write(path) as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


def evaluate_iterations(side: Side, store: ArtifactStore, label: str, oracle) -> List[Dict]:
    """Violation rate and perplexity of θ_0..θ_K in ``store`` (cached in ``run_dir/eval``)."""
    from nemo_acft.eval import perplexity, violation_rate
    from nemo_acft.sampling import SamplingParams

    cfg, e = side.cfg, side.cfg["eval"]
    tok = side.data.tokenizer
    model = None
    rows = []
    for k in range(side.K + 1):
        cache = side.run_dir / "eval" / f"{label}_iter_{k}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        if model is None:
            model = build_model(side.gcfg, side.cfg["seed"], with_head=False)
        model.load_state_dict(store.load("lm", k, "model.pt"), strict=True)
        params = SamplingParams(max_new_tokens=e["max_new_tokens"], top_p=e["top_p"],
                                eos_id=tok.eos_id, seed=cfg["seed"] + 7)
        v = violation_rate(model, tok, side.data.eval_prompts, oracle, params,
                           vocab_size=len(tok), samples_per_prompt=e["samples_per_prompt"],
                           batch_size=cfg["sampling"]["batch_size"],
                           threshold=cfg["oracle"]["threshold"] or 0.5)
        row = {"iteration": k, "violation_rate": v["violation_rate"],
               "ppl": perplexity(model, side.data.heldout),
               "num_scored": v["num_scored"], "num_failed": v["num_failed"],
               "examples": v["texts"][:6]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as fh:
            json.dump(row, fh, indent=1)
        side.tb.add_scalar(f"eval/{label}/violation_rate", row["violation_rate"], k)
        side.tb.add_scalar(f"eval/{label}/ppl", row["ppl"], k)
        rows.append(row)
    return rows


def plot_iterations(path: Path, baseline: List[Dict], acft: List[Dict], schedule: str) -> None:
    """Violation rate and perplexity per iteration, baseline vs ACFT, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for rows, name, style in ((baseline, "baseline (LM loss)", "o--"),
                              (acft, f"ACFT ({schedule})", "s-")):
        ks = [r["iteration"] for r in rows]
        axes[0].plot(ks, [r["violation_rate"] for r in rows], style, label=name)
        axes[1].plot(ks, [r["ppl"] for r in rows], style, label=name)
    axes[0].set(xlabel="iteration k", ylabel="violation rate", title="samples the oracle fails")
    axes[1].set(xlabel="iteration k", ylabel="perplexity", title="held-out text")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_all(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The whole run; returns the summary (also written to ``run_dir/summary.json``)."""
    from nemo_acft.oracles import build_oracle

    t_start = time.perf_counter()
    validate(cfg)
    oracle = build_oracle(cfg["oracle"])  # bad oracle settings fail before any training
    side = Side(cfg, "driver")  # reads and checks the data files
    regularizer_config(cfg).lambdas(side.data.domains)  # domain names checked before training
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(cfg, run_dir)  # only a config that passed every check
    init_process(cfg)
    log_to_file(run_dir / "logs" / "driver.log")
    times: Dict[str, float] = {}
    log.info("run_dir %s, schedule %s, K=%d iterations of %d LM steps; vocabulary %d, "
             "%d fine-tune records, %d held-out prompts", run_dir, cfg["schedule"], side.K,
             side.S, len(side.data.tokenizer), len(side.data.train), len(side.data.eval_prompts))

    t = time.perf_counter()
    pretrained = ensure_pretrained(cfg, side.data, side.gcfg, cfg["progress"])
    times["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    baseline_store = ArtifactStore(run_dir / "baseline")
    bside = Side(cfg, "baseline", data=side.data)
    with side_lock(baseline_store, "baseline"):
        run_lm_side(bside, "sequential", pretrained, mode="baseline", store=baseline_store)
    bside.close()
    times["baseline_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg["schedule"] == "sequential":
        with side_lock(side.exchange, "lm"), side_lock(side.exchange, "oracle"):
            run_sequential(Side(cfg, "acft", data=side.data), pretrained, oracle)
    else:
        run_parallel(side, config_path)
    times["acft_s"] = time.perf_counter() - t

    t = time.perf_counter()
    base_rows = evaluate_iterations(side, baseline_store, "baseline", oracle)
    acft_rows = evaluate_iterations(side, side.exchange, "acft", oracle)
    times["eval_s"] = time.perf_counter() - t

    _print_table(base_rows, acft_rows)
    plot_iterations(run_dir / "iterations.png", base_rows, acft_rows, cfg["schedule"])
    pick = lambda r: {"violation_rate": r["violation_rate"], "ppl": r["ppl"]}  # noqa: E731
    summary = {
        "baseline": pick(base_rows[-1]),
        "acft": pick(acft_rows[-1]),
        "schedule": cfg["schedule"],
        "wall_s": time.perf_counter() - t_start,
        "phases_s": times,
        "iterations": {"baseline": [pick(r) for r in base_rows],
                       "acft": [pick(r) for r in acft_rows]},
        "ratios": {"violation_rate": _ratio(acft_rows[-1]["violation_rate"],
                                            base_rows[-1]["violation_rate"]),
                   "ppl": _ratio(acft_rows[-1]["ppl"], base_rows[-1]["ppl"])},
        "examples": {"baseline": base_rows[-1]["examples"], "acft": acft_rows[-1]["examples"]},
    }
    with atomic_write(run_dir / "summary.json") as fh:
        json.dump(summary, fh, indent=1)
    side.close()
    log.info("summary: violation rate %.3f -> %.3f (x%.2f), perplexity %.3f -> %.3f (x%.3f); "
             "%.0f s; %s", summary["baseline"]["violation_rate"],
             summary["acft"]["violation_rate"], summary["ratios"]["violation_rate"],
             summary["baseline"]["ppl"], summary["acft"]["ppl"], summary["ratios"]["ppl"],
             summary["wall_s"], run_dir / "summary.json")
    return summary


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _print_table(base: List[Dict], acft: List[Dict]) -> None:
    log.info("%4s | %14s %14s | %10s %10s", "iter", "viol baseline", "viol ACFT", "ppl base",
             "ppl ACFT")
    for b, a in zip(base, acft):
        log.info("%4d | %14.3f %14.3f | %10.3f %10.3f", b["iteration"], b["violation_rate"],
                 a["violation_rate"], b["ppl"], a["ppl"])


__all__ = ["run_all", "write_config", "evaluate_iterations", "plot_iterations"]
