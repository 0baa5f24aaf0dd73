"""The whole run (``role=all``): pre-train (or load the cached) tiny GPT, the baseline fine-tune,
ACFT under the chosen schedule, the evaluation of every θ_k, ``summary.json``, the plot."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from nemo_acft.io_utils import atomic_write, save_figure
from nemo_acft.training.exchange import ArtifactStore
from nemo_acft.training.run import Side, run_lm_side, run_parallel, run_sequential, side_lock
from nemo_acft.training.setup import (build_model, ensure_pretrained, init_process, log_to_file,
                                      regularizer_config, validate)

log = logging.getLogger("nemo_acft")

#: config keys that may change between a run and its resumption
_VOLATILE = ("role", "progress", "acft.exchange_timeout_s", "acft.handshake_timeout_s",
             "acft.heartbeat_s", "acft.heartbeat_timeout_s")


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


def evaluate_iterations(side: Side, store: ArtifactStore, label: str, oracle,
                        nado_store: Optional[ArtifactStore] = None) -> List[Dict]:
    """Violation rate and perplexity of θ_0..θ_K in ``store`` (cached in ``run_dir/eval``).

    With ``nado_store`` (NADO decoding): the LM is ``lm/iter_0`` of that store and iteration k
    decodes from ``q ∝ p·R^β`` with its φ_k (β = ``nado_decoding.guidance``); perplexity is q's.
    """
    from nemo_acft.eval import perplexity, violation_rate
    from nemo_acft.sampling import SamplingParams

    cfg, e = side.cfg, side.cfg["eval"]
    tok = side.data.tokenizer
    guided = nado_store is not None
    guidance = float(cfg["nado_decoding"]["guidance"]) if guided else 1.0
    model = None
    rows = []
    for k in range(side.K + 1):
        cache = side.run_dir / "eval" / f"{label}_iter_{k}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        if model is None:
            model = build_model(side.gcfg, side.cfg["seed"], with_head=guided)
        if guided:
            model.load_base_state_dict(nado_store.load("lm", 0, "model.pt"))
            model.load_head_state_dict(nado_store.load("nado", k, "head.pt"))
        else:
            model.load_state_dict(store.load("lm", k, "model.pt"), strict=True)
        params = SamplingParams(max_new_tokens=e["max_new_tokens"], top_p=e["top_p"],
                                eos_id=tok.eos_id, seed=cfg["seed"] + 7, guidance=guidance)
        v = violation_rate(model, tok, side.data.eval_prompts, oracle, params,
                           vocab_size=len(tok), samples_per_prompt=e["samples_per_prompt"],
                           batch_size=cfg["sampling"]["batch_size"],
                           threshold=cfg["oracle"]["threshold"] or 0.5, guided=guided)
        row = {"iteration": k, "violation_rate": v["violation_rate"],
               "ppl": perplexity(model, side.data.heldout,
                                 guidance=guidance if guided else None),
               "num_scored": v["num_scored"], "num_failed": v["num_failed"],
               "examples": v["texts"][:6]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as fh:
            json.dump(row, fh, indent=1)
        side.tb.add_scalar(f"eval/{label}/violation_rate", row["violation_rate"], k)
        side.tb.add_scalar(f"eval/{label}/ppl", row["ppl"], k)
        rows.append(row)
    return rows


def plot_iterations(path: Path, curves: Dict[str, List[Dict]]) -> None:
    """Violation rate and perplexity per iteration, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, rows in curves.items():
        style = "s-" if name.startswith("ACFT") else "o--"
        ks = [r["iteration"] for r in rows]
        axes[0].plot(ks, [r["violation_rate"] for r in rows], style, label=name)
        axes[1].plot(ks, [r["ppl"] for r in rows], style, label=name)
    axes[0].set(xlabel="iteration k", ylabel="violation rate", title="samples the oracle fails")
    axes[1].set(xlabel="iteration k", ylabel="perplexity", title="held-out text")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _phase(run_dir: Path, name: str, seconds: float) -> Dict[str, float]:
    """Record a phase's wall time in ``run_dir/phases.json`` (phases may run in different
    processes: the roles of a Slurm job); returns all recorded phases."""
    path = run_dir / "phases.json"
    phases = json.loads(path.read_text()) if path.is_file() else {}
    phases[name] = seconds
    with atomic_write(path) as fh:
        json.dump(phases, fh, indent=1)
    return phases


def _start(cfg: Dict[str, Any], log_name: str):
    """Checks, the config written (or compared with the run's), the process set up."""
    from nemo_acft.oracles import build_oracle
    from nemo_acft.training.run import install_stop_handlers

    validate(cfg)
    oracle = build_oracle(cfg["oracle"])  # bad oracle settings fail before any training
    side = Side(cfg, "driver")  # reads and checks the data files
    regularizer_config(cfg).lambdas(side.data.domains)  # domain names checked before training
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(cfg, run_dir)  # only a config that passed every check
    init_process(cfg)
    install_stop_handlers()
    log_to_file(run_dir / "logs" / f"{log_name}.log")
    return side, oracle, run_dir, config_path


def run_baseline(cfg: Dict[str, Any], side: Side, run_dir: Path, name: str, pretrained: Path,
                 oracle) -> ArtifactStore:
    """The plain fine-tune (``baseline``) or one of the paper's other baselines (``baselines:``
    in the config) into ``run_dir/<name>``: ``baseline``, ``filtering`` and ``rl`` train an LM
    side of that mode; ``nado_decoding`` trains a head for the plain fine-tune's θ_K (which must
    exist)."""
    from nemo_acft.training.run import run_nado_decoding

    store = ArtifactStore(run_dir / name)
    if store.exists(*(("nado", side.K) if name == "nado_decoding" else ("lm", side.K))):
        return store  # finished: nothing to train, no lock needed (readers may share it)
    bside = Side(cfg, name, data=side.data)
    with side_lock(store, name):
        if name == "nado_decoding":
            plain = ArtifactStore(run_dir / "baseline")
            if not plain.exists("lm", side.K):
                raise RuntimeError(f"NADO decoding needs the plain fine-tune's θ_K: "
                                   f"{plain.path('lm', side.K)} is missing")
            run_nado_decoding(bside, plain.load("lm", side.K, "model.pt"), oracle, store,
                              source=str(plain.path("lm", side.K)))
        else:
            run_lm_side(bside, "sequential", pretrained, mode=name, store=store, oracle=oracle)
    bside.close()
    return store


def prepare(cfg: Dict[str, Any], side: Side, run_dir: Path, oracle=None) -> Path:
    """Pre-train (or reuse) the tiny GPT, then the baseline fine-tune and the baselines the
    config lists; returns the pre-trained model's directory."""
    log.info("run_dir %s, schedule %s, K=%d iterations of %d LM steps; vocabulary %d, "
             "%d fine-tune records, %d held-out prompts", run_dir, cfg["schedule"], side.K,
             side.S, len(side.data.tokenizer), len(side.data.train), len(side.data.eval_prompts))
    t = time.perf_counter()
    pretrained = ensure_pretrained(cfg, side.data, side.gcfg, cfg["progress"])
    _phase(run_dir, "pretrain_s", time.perf_counter() - t)
    for name in ("baseline", *cfg["baselines"]):
        t = time.perf_counter()
        run_baseline(cfg, side, run_dir, name, pretrained, oracle)
        _phase(run_dir, f"{name}_s", time.perf_counter() - t)
    return pretrained


def export_nemo(cfg: Dict[str, Any], side: Side, run_dir: Path) -> Path | None:
    """θ_K as a stock ``MegatronGPTModel`` ``.nemo`` (``run_dir/export/acft_gpt.nemo``) when
    ``export.nemo`` asks for it (auto: byte-level tokenizer and NeMo installed)."""
    want = cfg["export"]["nemo"]
    if want is False:
        return None
    if want == "auto":
        if cfg["data"]["tokenizer"] != "byte":
            log.info("no .nemo export: data.tokenizer=word has no NeMo equivalent (use "
                     "data.tokenizer=byte)")
            return None
        try:
            import nemo.collections.nlp  # noqa: F401
        except ImportError:
            log.info("no .nemo export: nemo-toolkit is not installed (pip install .[nemo])")
            return None
    from nemo_acft.nemo.export import export_native

    out = run_dir / "export" / "acft_gpt.nemo"
    if out.is_file():
        return out
    state = side.exchange.load("lm", side.K, "model.pt")
    export_native(state, side.gcfg, out, side.data.tokenizer, seed=cfg["seed"])
    log.info("wrote %s (stock MegatronGPTModel, byte-level tokenizer)", out)
    return out


def finish(cfg: Dict[str, Any], side: Side, oracle, run_dir: Path) -> Dict[str, Any]:
    """Evaluate every θ_k of the baseline and of ACFT, write ``summary.json``, the plot and the
    ``.nemo``. Needs both to be complete (a clear error names what is missing)."""
    baseline_store = ArtifactStore(run_dir / "baseline")
    for store, what in ((baseline_store, "the baseline (role=prepare)"),
                        (side.exchange, "ACFT (roles lm and oracle)")):
        if not store.exists("lm", side.K):
            raise RuntimeError(f"{what} has not finished: {store.path('lm', side.K)} is missing")
    t = time.perf_counter()
    base_rows = evaluate_iterations(side, baseline_store, "baseline", oracle)
    acft_rows = evaluate_iterations(side, side.exchange, "acft", oracle)
    others = {}
    for name in cfg["baselines"]:
        store = ArtifactStore(run_dir / name)
        last = ("nado", side.K) if name == "nado_decoding" else ("lm", side.K)
        if not store.exists(*last):
            raise RuntimeError(f"the {name} baseline has not finished: {store.path(*last)} is "
                               "missing (role=prepare)")
        others[name] = evaluate_iterations(side, store, name, oracle,
                                           nado_store=store if name == "nado_decoding" else None)
    times = _phase(run_dir, "eval_s", time.perf_counter() - t)

    _print_table(base_rows, acft_rows)
    for name, rows in others.items():
        log.info("%s: violation rate %.3f, perplexity %.3f", name, rows[-1]["violation_rate"],
                 rows[-1]["ppl"])
    plot_iterations(run_dir / "iterations.png",
                    {"baseline (LM loss)": base_rows, **others,
                     f"ACFT ({cfg['schedule']})": acft_rows})
    nemo_path = export_nemo(cfg, side, run_dir)
    pick = lambda r: {"violation_rate": r["violation_rate"], "ppl": r["ppl"]}  # noqa: E731
    summary = {
        "baseline": pick(base_rows[-1]),
        "acft": pick(acft_rows[-1]),
        "schedule": cfg["schedule"],
        "wall_s": sum(times.values()),
        "phases_s": times,
        "baselines": {name: pick(rows[-1]) for name, rows in others.items()},
        "iterations": {"baseline": [pick(r) for r in base_rows],
                       "acft": [pick(r) for r in acft_rows],
                       **{name: [pick(r) for r in rows] for name, rows in others.items()}},
        "ratios": {"violation_rate": _ratio(acft_rows[-1]["violation_rate"],
                                            base_rows[-1]["violation_rate"]),
                   "ppl": _ratio(acft_rows[-1]["ppl"], base_rows[-1]["ppl"])},
        "examples": {"baseline": base_rows[-1]["examples"], "acft": acft_rows[-1]["examples"]},
        "nemo": str(nemo_path) if nemo_path else None,
    }
    with atomic_write(run_dir / "summary.json") as fh:
        json.dump(summary, fh, indent=1)
    log.info("summary: violation rate %.3f -> %.3f (x%.2f), perplexity %.3f -> %.3f (x%.3f); "
             "%.0f s; %s", summary["baseline"]["violation_rate"],
             summary["acft"]["violation_rate"], summary["ratios"]["violation_rate"],
             summary["baseline"]["ppl"], summary["acft"]["ppl"], summary["ratios"]["ppl"],
             summary["wall_s"], run_dir / "summary.json")
    return summary


def run_all(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The whole run; returns the summary (also written to ``run_dir/summary.json``)."""
    side, oracle, run_dir, config_path = _start(cfg, "driver")
    (run_dir / "phases.json").unlink(missing_ok=True)  # this process times every phase
    pretrained = prepare(cfg, side, run_dir, oracle)
    t = time.perf_counter()
    if cfg["schedule"] == "sequential":
        with side_lock(side.exchange, "lm"), side_lock(side.exchange, "oracle"):
            run_sequential(Side(cfg, "acft", data=side.data), pretrained, oracle)
    else:
        run_parallel(side, config_path)
    _phase(run_dir, "acft_s", time.perf_counter() - t)
    summary = finish(cfg, side, oracle, run_dir)
    side.close()
    return summary


def run_role(cfg: Dict[str, Any]) -> None:
    """``role=prepare`` or ``role=finish``: one phase of the run (for a Slurm job whose roles
    run as separate steps)."""
    side, oracle, run_dir, _ = _start(cfg, cfg["role"])
    if cfg["role"] == "prepare":
        prepare(cfg, side, run_dir, oracle)
    else:
        finish(cfg, side, oracle, run_dir)
    side.close()


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _print_table(base: List[Dict], acft: List[Dict]) -> None:
    log.info("%4s | %14s %14s | %10s %10s", "iter", "viol baseline", "viol ACFT", "ppl base",
             "ppl ACFT")
    for b, a in zip(base, acft):
        log.info("%4d | %14.3f %14.3f | %10.3f %10.3f", b["iteration"], b["violation_rate"],
                 a["violation_rate"], b["ppl"], a["ppl"])


__all__ = ["run_all", "run_role", "prepare", "run_baseline", "finish", "export_nemo", "write_config", "evaluate_iterations", "plot_iterations"]
