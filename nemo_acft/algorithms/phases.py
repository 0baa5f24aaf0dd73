"""The phases of a run, each run by every rank of one world (the roles of ``acft-train``):

- :func:`prepare` (the LM group's layout): θ_0 from the ``.nemo`` (or the built-in tiny GPT,
  pre-trained once and cached as a ``.nemo``), then the plain fine-tune and the LM-side
  baselines (filtering, RL);
- :func:`sequential` (the LM group's layout): ACFT, sequential schedule;
- :func:`side` (``lm``: the LM group; ``oracle``: the oracle group): one side of the parallel
  schedule;
- :func:`finish` (the oracle group's layout, which samples): the NADO decoding baseline's head,
  the evaluation of every θ_k, ``summary.json``, ``iterations.png`` and the ``.nemo`` files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from nemo_acft import config as schema
from nemo_acft import progress
from nemo_acft.algorithms.baselines import RLTerm, filter_by_oracle, train_nado_decoding
from nemo_acft.algorithms.blocks import lm_block, log_block
from nemo_acft.algorithms.coordination import side_lock
from nemo_acft.algorithms.exchange import MANIFEST, ArtifactStore, DamagedArtifact, broadcast
from nemo_acft.algorithms.setup import Run, model_dir
from nemo_acft.io_utils import atomic_write, save_figure

log = logging.getLogger("nemo_acft")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- prepare -----------------------------------------------------------------------------


def pretrain(run: Run, path: str) -> None:
    """Pre-train the built-in tiny GPT on the pre-training records (the LM loss, NeMo's
    optimizer and schedule) and write it to ``path`` as a plain GPT ``.nemo``."""
    from nemo_acft.data import batch_indices
    from nemo_acft.models.export import export_plain_gpt

    p = run.cfg["pretrain"]
    m = run.model
    m.configure_training("trunk", p["optim"], max_steps=max(p["steps"], 1))
    log.info("pre-training the tiny GPT: %d steps of %d records (cached as %s)", p["steps"],
             p["global_batch_size"], path)
    bar = run.bar(p["steps"], "pretrain")
    data, metrics = run.data.pretrain, {}
    for step in range(p["steps"]):
        batch = data.batch(batch_indices(len(data), p["global_batch_size"], run.seed,
                                         "pretrain", step))
        metrics = m.lm_step(batch, micro_batch_size=run.cfg["model"]["micro_batch_size"])
        run.scalars("pretrain", metrics, step + 1)
        bar.update(1)
        progress.tick(f"pretrain step {step + 1}")
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
    bar.close()
    log.info("pre-training done: last loss %.3f", metrics.get("loss", math.nan))
    export_plain_gpt(m, path)


def publish_initial_lm(run: Run, source: Dict[str, Any]) -> None:
    """θ_0: the model as built (restored from the ``.nemo``, or just pre-trained), as iteration
    0 of the exchange."""
    ex = run.exchange
    if ex.exists("lm", 0):
        return
    ex.clean_temporaries("lm")
    ex.publish("lm", 0, lambda tmp: run.model.save_part(tmp / "trunk", "trunk"),
               {"based_on": source, "global_step": 0, "with_optimizer": False,
                "layout": run.model.layout()})


def run_baseline(run: Run, name: str) -> ArtifactStore:
    """The plain fine-tune (``baseline``) or an LM-side baseline (``filtering``, ``rl``): K LM
    blocks into ``run_dir/<name>``."""
    store = ArtifactStore(run.run_dir / name)
    if store.exists("lm", run.K):
        return store
    data, extra = run.data.train, None
    if name == "filtering":
        data, stats = filter_by_oracle(run.data.train, run.tokenizer, run.oracle,
                                       run.cfg["filtering"]["threshold"],
                                       run.cfg["oracle"]["batch_size"])
        log.info("[%s] filtering: kept %d of %d training records (dropped by domain: %s)",
                 run.side, stats["kept"], stats["kept"] + stats["dropped"],
                 stats["dropped_by_domain"])
        if run.rank0:
            with atomic_write(store.root / "filter.json") as fh:
                json.dump(stats, fh, indent=1)
    elif name == "rl":
        extra = RLTerm(run)
    with side_lock(store, name):
        todo = [k for k in range(1, run.K + 1) if not store.exists("lm", k)]
        t0 = time.perf_counter()
        for done, k in enumerate(todo, 1):
            m = lm_block(run, name, k, store, data, extra=extra)
            log_block(run, f"{name} LM block", k, m, t0, done, len(todo))
    return store


def prepare(cfg: Dict[str, Any]) -> None:
    """θ_0 in the exchange, then the plain fine-tune and the LM-side baselines."""
    info = json.loads((model_dir(cfg) / "info.json").read_text())
    builtin = info.get("builtin")
    restore = info.get("restore_from_path")
    if builtin and Path(builtin).is_file():
        restore = builtin
    run = Run(cfg, "prepare", schema.lm_layout(cfg), restore_from=restore, watch=True)
    log.info("run_dir %s, schedule %s, K=%d iterations of %d LM steps; vocabulary %d, "
             "%d fine-tune records, %d held-out prompts; LM group %s, oracle group %s",
             run.run_dir, cfg["schedule"], run.K, run.S, run.tokenizer.vocab_size,
             len(run.data.train), len(run.data.eval_prompts), schema.lm_layout(cfg),
             schema.oracle_layout(cfg))
    if not run.exchange.exists("lm", 0):
        if builtin and restore is None:
            pretrain(run, builtin)
        publish_initial_lm(run, {"nemo": restore or builtin})
    for name in ("baseline", *(b for b in cfg["baselines"] if b != "nado_decoding")):
        run_baseline(run, name)
    run.close()


# --- the schedules ------------------------------------------------------------------------


def sequential(cfg: Dict[str, Any]) -> None:
    """ACFT under the sequential schedule, in the LM group's world."""
    from nemo_acft.algorithms.schedules import run_sequential

    run = Run(cfg, "acft", schema.lm_layout(cfg), watch=True)
    with side_lock(run.exchange, "lm"), side_lock(run.exchange, "oracle"):
        run_sequential(run)
    run.close()


def side(cfg: Dict[str, Any], name: str) -> None:
    """One side of the parallel schedule (``lm`` or ``oracle``) in this world."""
    from nemo_acft.algorithms.schedules import run_side

    layout = schema.lm_layout(cfg) if name == "lm" else schema.oracle_layout(cfg)
    run = Run(cfg, name, layout, watch=True)
    try:
        run_side(run, name)
    finally:
        run.close()


# --- finish -------------------------------------------------------------------------------


def eval_store(run: Run) -> ArtifactStore:
    """``run_dir/eval``: one artifact per evaluated iteration (``<label>/iter_<k>/result.json``
    with its manifest), so that a result read back is checked like θ and φ."""
    return ArtifactStore(run.run_dir / "eval")


def read_result(store: ArtifactStore, label: str, k: int) -> Dict[str, Any]:
    """An evaluation result, checked against its manifest's digest."""
    p = store.check_file(label, k, "result.json")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise DamagedArtifact(f"{p}: not JSON ({e}); delete {p.parent} and rerun the same "
                              "command to recompute it") from None


def publish_result(store: ArtifactStore, label: str, k: int, row: Dict[str, Any],
                   rank0: bool) -> None:
    """Collective: publish ``row`` as ``<label>`` iteration ``k``."""
    def write(tmp):
        if rank0:
            (tmp / "result.json").write_text(json.dumps(row, indent=1))
    store.publish(label, k, write, {"label": label})


def evaluate_iterations(run: Run, store: ArtifactStore, label: str,
                        nado_store: Optional[ArtifactStore] = None,
                        fixed_lm: Optional[ArtifactStore] = None) -> List[Dict]:
    """Violation rate, perplexity and the samples' diversity of θ_0..θ_K in ``store`` (cached in
    ``run_dir/eval``; θ_0 is the exchange's).

    NADO decoding (``nado_store``): the LM is ``fixed_lm``'s θ_K and iteration k decodes from
    ``q ∝ p·R^β`` with ``nado_store``'s φ_k (β = ``nado_decoding.guidance``); perplexity is q's.
    """
    from nemo_acft.eval import diversity, perplexity, violation_rate
    from nemo_acft.models.generate import SamplingParams

    cfg, e = run.cfg, run.cfg["eval"]
    guided = nado_store is not None
    beta = float(cfg["nado_decoding"]["guidance"]) if guided else None
    cache = eval_store(run)
    cache.clean_temporaries(label)
    rows = []
    for k in range(run.K + 1):
        if cache.exists(label, k):
            rows.append(read_result(cache, label, k))
            continue
        if guided:
            run.model.load_part(fixed_lm.verify("lm", run.K) / "trunk", "trunk")
            run.model.load_part(nado_store.verify("nado", k) / "head", "head")
        else:
            src = (store, k) if k > 0 else (run.exchange, 0)
            run.model.load_part(src[0].verify("lm", src[1]) / "trunk", "trunk")
        params = SamplingParams(max_new_tokens=e["max_new_tokens"], top_p=e["top_p"],
                                eos_id=run.tokenizer.eos_id, seed=run.seed + 7,
                                guidance=beta if guided else 1.0)
        v = violation_rate(run.model, run.tokenizer, run.data.eval_prompts, run.oracle, params,
                           samples_per_prompt=e["samples_per_prompt"], batch_size=e["batch_size"],
                           threshold=cfg["oracle"]["threshold"] or 0.5, guided=guided,
                           oracle_batch_size=cfg["oracle"]["batch_size"])
        row = {"iteration": k, "violation_rate": v["violation_rate"],
               "ppl": perplexity(run.model, run.data.heldout, guidance=beta),
               **diversity(v["continuations"]),
               "num_scored": v["num_scored"], "num_failed": v["num_failed"],
               "examples": v["texts"][:6]}
        publish_result(cache, label, k, row, run.rank0)
        run.scalars(f"eval/{label}", {x: row[x] for x in ("violation_rate", "ppl",
                                                          "distinct_2", "repeat_rate")}, k)
        rows.append(row)
    _barrier()
    return rows


def diagnose_iterations(run: Run) -> List[Dict[str, Any]]:
    """The collapse diagnostics of ACFT's LM blocks (:func:`~nemo_acft.algorithms.diagnostics.
    collapse`), cached in ``run_dir/eval``, with each block's gated share and KL from its
    manifest; ``run_dir/diagnostics/collapse.png``. Empty when ``probe_prompts`` is 0."""
    from nemo_acft.algorithms.blocks import reference_source
    from nemo_acft.algorithms.diagnostics import collapse, plot_collapse
    from nemo_acft.algorithms.schedules import nado_for

    n = run.acft["diagnostics"]["probe_prompts"]
    if not n:
        return []
    ex, rows = run.exchange, []
    probe = run.data.eval_prompts[:n]
    cache = eval_store(run)
    cache.clean_temporaries("diagnostics")
    for k in range(1, run.K + 1):
        if cache.exists("diagnostics", k):
            rows.append(read_result(cache, "diagnostics", k))
            continue
        j = nado_for(run.cfg["schedule"], k)
        head = ex.verify("nado", j) / "head"
        rs, ri = reference_source(run, k, ex)
        run.model.load_part(ex.verify("lm", k) / "trunk", "trunk")
        run.model.load_part(head, "head")
        run.model.set_reference(rs.verify("lm", ri) / "trunk", head)
        row = {"iteration": k, "nado_iteration": j, "reference_iteration": ri,
               **collapse(run, k, run.acft["reference"], probe, seed=run.seed + 13)}
        block = ex.manifest("lm", k).get("metrics", {})
        row.update({x: block[x] for x in ("gated_share", "kl", "samples_kl", "samples_gated_share")
                    if x in block})
        publish_result(cache, "diagnostics", k, row, run.rank0)
        run.scalars("diagnostics", {x: v for x, v in row.items() if isinstance(v, float)}, k)
        rows.append(row)
    if run.rank0:
        plot_collapse(run.run_dir / "diagnostics" / "collapse.png", rows)
    _barrier()
    return rows


def plot_iterations(path: Path, curves: Dict[str, List[Dict]]) -> None:
    """Violation rate, perplexity and distinct-2 per iteration, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in curves.items():
        style = "s-" if name.startswith("ACFT") else "o--"
        ks = [r["iteration"] for r in rows]
        for ax, key in zip(axes, ("violation_rate", "ppl", "distinct_2")):
            ax.plot(ks, [r[key] for r in rows], style, label=name)
    axes[0].set(xlabel="iteration k", ylabel="violation rate", title="samples the oracle fails")
    axes[1].set(xlabel="iteration k", ylabel="perplexity", title="held-out text")
    axes[2].set(xlabel="iteration k", ylabel="distinct-2", title="diversity of the samples")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def export(run: Run) -> Dict[str, str]:
    """θ_K (and φ_K) of ACFT as ``export/acft_gpt.nemo`` (stock ``MegatronGPTModel``) and
    ``export/acft_with_head.nemo`` (``MegatronGPTACFTModel``), with ``export/manifest.json``
    (each file's size and digest). Files that exist are checked against it, not rewritten."""
    from nemo_acft.algorithms.exchange import DIGEST, file_digest
    from nemo_acft.models.export import export_plain_gpt, export_with_head

    out = run.run_dir / "export"
    paths = {"plain": out / "acft_gpt.nemo", "with_head": out / "acft_with_head.nemo"}
    intact = broadcast(_export_intact(out, paths) if run.rank0 else None)
    if isinstance(intact, str):
        raise DamagedArtifact(intact)
    if not intact:
        run.model.load_part(run.exchange.verify("lm", run.K) / "trunk", "trunk")
        run.model.load_part(run.exchange.verify("nado", run.K) / "head", "head")
        export_with_head(run.model, paths["with_head"])
        export_plain_gpt(run.model, paths["plain"])
        if run.rank0:
            files = {p.name: {"bytes": p.stat().st_size, DIGEST: file_digest(p)}
                     for p in paths.values()}
            with atomic_write(out / MANIFEST) as fh:
                json.dump({"files": files, "based_on": {"lm": run.K, "nado": run.K}}, fh,
                          indent=1)
        _barrier()
        log.info("wrote %s (stock MegatronGPTModel) and %s (with the NADO head)",
                 paths["plain"], paths["with_head"])
    return {k: str(v) for k, v in paths.items()}


def _export_intact(out: Path, paths: Dict[str, Path]):
    """Rank 0: True when the exported files match ``export/manifest.json``; False when there
    is nothing complete to check (they are written); the error message when one does not."""
    from nemo_acft.algorithms.exchange import DIGEST, file_digest

    man_path = out / MANIFEST
    if not man_path.is_file() or not all(p.is_file() for p in paths.values()):
        return False
    hint = f"delete {out} and rerun the same command to recompute it"
    try:
        files = json.loads(man_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{man_path}: a damaged manifest ({' '.join(str(e).split())}); {hint}"
    for p in paths.values():
        meta = files.get(p.name)
        if meta is None:
            return f"{p}: not in {man_path}; {hint}"
        found = file_digest(p)
        if p.stat().st_size != meta["bytes"] or found != meta[DIGEST]:
            return (f"{p} does not match its manifest ({DIGEST} {found}, {man_path} says "
                    f"{meta[DIGEST]}): the file is damaged; {hint}")
    return True


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def finish(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The NADO decoding baseline's head, the evaluation of every θ_k of the plain fine-tune,
    ACFT and the baselines, the summary, the plot and the ``.nemo`` files; in the oracle
    group's layout. Needs every training to be complete (a clear error names what is missing).
    """
    run = Run(cfg, "finish", schema.oracle_layout(cfg), watch=True)
    rd = run.run_dir
    baseline = ArtifactStore(rd / "baseline")
    stores = {"baseline": baseline, "acft": run.exchange}
    for name in cfg["baselines"]:
        stores[name] = ArtifactStore(rd / name)
    for name, store in stores.items():
        if name != "nado_decoding" and not store.exists("lm", run.K):
            raise RuntimeError(f"{name} has not finished: {store.path('lm', run.K)} is missing "
                               f"(role={'lm and oracle' if name == 'acft' else 'prepare'})")
    if "nado_decoding" in cfg["baselines"]:
        with side_lock(stores["nado_decoding"], "nado_decoding"):
            train_nado_decoding(run, baseline, stores["nado_decoding"])
    rows = {name: evaluate_iterations(
        run, store, name,
        nado_store=store if name == "nado_decoding" else None,
        fixed_lm=baseline if name == "nado_decoding" else None)
        for name, store in stores.items()}
    diagnostics = diagnose_iterations(run)
    nemo = export(run)
    summary = None
    if run.rank0:
        base, acft = rows["baseline"], rows["acft"]
        _print_table(base, acft)
        for name in cfg["baselines"]:
            r = rows[name][-1]
            log.info("%s: violation rate %.3f, perplexity %.3f, distinct-2 %.3f", name,
                     r["violation_rate"], r["ppl"], r["distinct_2"])
        plot_iterations(rd / "iterations.png",
                        {"baseline (LM loss)": base,
                         **{n: rows[n] for n in cfg["baselines"]},
                         f"ACFT ({cfg['schedule']})": acft})
        pick = lambda r: {x: r[x] for x in ("violation_rate", "ppl", "distinct_2",  # noqa: E731
                                           "repeat_rate")}
        phases = json.loads((rd / "phases.json").read_text()) if (rd / "phases.json").is_file() \
            else {}
        summary = {
            "baseline": pick(base[-1]), "acft": pick(acft[-1]), "schedule": cfg["schedule"],
            "layouts": {"lm": vars(schema.lm_layout(cfg)),
                        "oracle": vars(schema.oracle_layout(cfg))},
            "baselines": {n: pick(rows[n][-1]) for n in cfg["baselines"]},
            "iterations": {n: [pick(r) for r in rs] for n, rs in rows.items()},
            "ratios": {"violation_rate": _ratio(acft[-1]["violation_rate"],
                                                base[-1]["violation_rate"]),
                       "ppl": _ratio(acft[-1]["ppl"], base[-1]["ppl"]),
                       "distinct_2": _ratio(acft[-1]["distinct_2"], base[-1]["distinct_2"]),
                       "repeat_rate": _ratio(acft[-1]["repeat_rate"], base[-1]["repeat_rate"])},
            "diagnostics": diagnostics, "reference": cfg["model"]["acft"]["reference"],
            "kl_on": cfg["model"]["acft"]["kl_on"],
            "examples": {"baseline": base[-1]["examples"], "acft": acft[-1]["examples"]},
            "nemo": nemo, "phases_s": phases,
        }
        r = summary["ratios"]
        summary["checks"] = {  # the built-in default's acceptance, degeneration included
            "violation_at_most_half": r["violation_rate"] <= 0.5,
            "ppl_at_most_1.10x": r["ppl"] <= 1.10,
            "distinct_2_at_least_0.9x": r["distinct_2"] >= 0.9,
            # a repeat rate of 0 (no repeated word) has no meaningful ratio
            "repeat_rate_at_most_1.2x": (acft[-1]["repeat_rate"]
                                         <= 1.2 * base[-1]["repeat_rate"] + 1e-3)}
        with atomic_write(rd / "summary.json") as fh:
            json.dump(summary, fh, indent=1)
        log.info("summary: violation rate %.3f -> %.3f (x%.2f), perplexity %.3f -> %.3f (x%.3f), "
                 "distinct-2 %.3f -> %.3f, repeat rate %.3f -> %.3f; checks %s; %s",
                 summary["baseline"]["violation_rate"],
                 summary["acft"]["violation_rate"], summary["ratios"]["violation_rate"],
                 summary["baseline"]["ppl"], summary["acft"]["ppl"], summary["ratios"]["ppl"],
                 summary["baseline"]["distinct_2"], summary["acft"]["distinct_2"],
                 summary["baseline"]["repeat_rate"], summary["acft"]["repeat_rate"],
                 "all pass" if all(summary["checks"].values()) else
                 "FAILED: " + ", ".join(c for c, ok in summary["checks"].items() if not ok),
                 rd / "summary.json")
        for row in diagnostics:
            log.info("diagnostics LM block %d: H(p) %.3f, H(q) %.3f, |ΔZ| %.4f, distinct-2 "
                     "%.3f, repeat rate %.3f, gated share %.3f", row["iteration"],
                     row["entropy_p"], row["entropy_q"], row["delta_z"], row["distinct_2"],
                     row["repeat_rate"], row.get("gated_share", math.nan))
    _barrier()
    run.close()
    return summary


def _print_table(base: List[Dict], acft: List[Dict]) -> None:
    log.info("%4s | %13s %13s | %10s %10s | %9s %9s", "iter", "viol baseline", "viol ACFT",
             "ppl base", "ppl ACFT", "d-2 base", "d-2 ACFT")
    for b, a in zip(base, acft):
        log.info("%4d | %13.3f %13.3f | %10.3f %10.3f | %9.3f %9.3f", b["iteration"],
                 b["violation_rate"], a["violation_rate"], b["ppl"], a["ppl"], b["distinct_2"],
                 a["distinct_2"])


def lm_side(cfg: Dict[str, Any]) -> None:
    """The LM side of the parallel schedule (:func:`side`)."""
    side(cfg, "lm")


def oracle_side(cfg: Dict[str, Any]) -> None:
    """The oracle side of the parallel schedule (:func:`side`)."""
    side(cfg, "oracle")


#: each phase's function (module-level functions: a fork server's processes unpickle them)
PHASES = {"prepare": prepare, "sequential": sequential, "lm": lm_side, "oracle": oracle_side,
          "finish": finish}

__all__ = ["PHASES", "prepare", "sequential", "side", "finish", "evaluate_iterations",
           "plot_iterations", "run_baseline", "pretrain", "export"]
