"""Wall time of K iterations of plain SFT, sequential ACFT and parallel ACFT on the same work.

    python benchmarks/schedule.py                      # K = 8 on the tiny_cpu config
    python benchmarks/schedule.py --repeats 2 --json out.json -- model.acft.steps_per_iteration=300

Each repeat runs ``acft-train`` twice in fresh run directories (one pre-trained model, cached):
``schedule=sequential`` and then ``schedule=parallel``, the latter with its two sides as two
processes (on a 2-core machine, one core each). Each run times its phases in
``run_dir/phases.json``:

- ``baseline_s``: plain SFT, K blocks of the same LM steps on the same batches (the seconds
  each LM block's manifest records);
- ``acft_s``: the ACFT schedule, K oracle blocks and K LM blocks. For the parallel schedule this
  includes starting both worlds (forked after the imports; building the model), as a run pays it.

Steady state: every θ_k's manifest records when it was published (``created``), so the time of
iteration k is ``created(θ_k) − created(θ_(k−1))`` (iteration 1 from the ACFT phase's start,
``phases.json``'s ``acft_started``), for ACFT's exchange and for the plain fine-tune's store alike;
``steady_*`` are medians over iterations 3..K, and ``steady_parallel_vs_sequential`` and
``steady_parallel_vs_sft`` compare those. Before the steady state the parallel run pays its
start-up (``parallel_startup_s``: starting the worlds, building the models, the handshake, the
initial head; from the phase's start to oracle block 1's) and the pipeline fill
(``parallel_fill_s``: oracle block 1, which LM block 1 waits for by the schedule's definition, so
with balanced groups it is about 1/(K+1) of the run whatever the block length). ``--tp2`` runs the
model-parallel case: the LM group at TP = 2 (two processes), the oracle group at TP = 1.

The groups are balanced by the work of a block: the default oracle block (768 prompts, 225 NADO
steps) takes about as long on one core as the LM block (200 ACFT steps) on the tiny config.

The evaluation is left out of every figure. Medians over repeats; ratios come from one
invocation. Extra arguments after ``--`` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nemo_acft.algorithms.exchange import ArtifactStore  # noqa: E402
from nemo_acft.io_utils import save_figure  # noqa: E402

#: the work of one iteration: LM block and oracle block of similar length on one core each
DEFAULT = ["model.acft.iterations=8", "model.acft.steps_per_iteration=200",
           "model.acft.oracle_block.steps=225", "model.acft.oracle_block.prompts=768",
           "eval.prompts=50", "eval.samples_per_prompt=1", "eval.ppl_records=100",
           "progress=false", "model.acft.save_every=100"]


def run(run_dir: Path, cache: Path, schedule: str, overrides, analyse_only=False):
    cmd = [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}", f"cache_dir={cache}",
           f"schedule={schedule}", *DEFAULT, *overrides]
    if not analyse_only:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    elif not (run_dir / "phases.json").is_file():
        raise FileNotFoundError(f"--analyse-only: {run_dir / 'phases.json'} does not exist")
    phases = json.loads((run_dir / "phases.json").read_text())
    exchange, baseline = ArtifactStore(run_dir / "exchange"), ArtifactStore(run_dir / "baseline")
    lm, nado = manifests(exchange, "lm"), manifests(exchange, "nado")  # θ_0.., φ_0..
    sft = manifests(baseline, "lm")  # the plain fine-tune's θ_1..θ_K
    # plain SFT: the plain fine-tune's K LM blocks, as their manifests time them
    phases["sft_block_s"] = [m["seconds"] for m in sft]
    phases["baseline_s"] = sum(phases["sft_block_s"])
    phases["acft_iterations_s"] = iteration_times(lm, phases["acft_started"])
    phases["sft_iterations_s"] = iteration_times(sft)
    phases["lm_block_s"] = [m["seconds"] for m in lm[1:]]
    phases["oracle_block_s"] = [m["seconds"] for m in nado[1:]]
    # before the steady state: start-up (worlds, model build, handshake, initial head: the ACFT
    # phase's start to the first oracle block's start) and the pipeline fill (the first oracle
    # block, which LM block 1 waits for in both schedules)
    phases["fill_s"] = nado[1]["seconds"]
    phases["startup_s"] = nado[1]["created"] - nado[1]["seconds"] - phases["acft_started"]
    return phases


def manifests(store: ArtifactStore, kind: str):
    """The manifests of a store's complete artifacts of ``kind``, by iteration."""
    return [store.manifest(kind, k) for k in store.iterations(kind)]


def lm_flop_ratio(run_dir: Path) -> float:
    """FLOP-predicted ACFT LM step / SFT step for the run's model (``run_dir/model/``), by
    ``step_overhead.flops``: with ``reference: current`` the frozen head alone, with
    ``reference_on: oracle`` none (SFT's), otherwise the reference's forward too."""
    import yaml

    from benchmarks.step_overhead import flops

    cfg = yaml.safe_load((run_dir / "model" / "config.yaml").read_text())
    vocab = json.loads((run_dir / "model" / "info.json").read_text())["vocab_size"]
    size = (cfg["hidden_size"], cfg["num_layers"], cfg["num_attention_heads"], vocab,
            cfg["global_batch_size"], cfg["encoder_seq_length"])
    a = cfg["acft"]
    variant = ("acft" if a.get("reference") == "current" else
               "acft_shipped" if a.get("reference_on") == "oracle" else "acft_ref")
    return flops(size, variant) / flops(size, "sft")


def iteration_times(manifests, start=None):
    """``created(θ_k) − created(θ_(k−1))`` for k = 1..K from a store's manifests; with ``start``
    (epoch seconds), iteration 1 counts from it instead of from θ_0 (which the prepare phase
    publishes before it runs the plain fine-tune)."""
    created = [m["created"] for m in manifests]
    if start is not None:
        created[0] = start
    return [b - a for a, b in zip(created, created[1:])]


def steady(times):
    """The median per-iteration time from iteration 3 on (all but the first two)."""
    return statistics.median(times[2:] if len(times) > 3 else times[1:])


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["plain SFT", "ACFT sequential", "ACFT parallel"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, vals, what in (
            (axes[0], [res["sft_s"], res["sequential_s"], res["parallel_s"]],
             f"wall time of K = {res['iterations']} iterations (s)"),
            (axes[1], [res["steady_sft_s"], res["steady_sequential_s"], res["steady_parallel_s"]],
             "steady state: seconds per iteration")):
        ax.bar(names, vals, color=["#999", "#4c72b0", "#dd8452"])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f} s" if v >= 10 else f"{v:.1f} s", ha="center", va="bottom")
        ax.set_ylabel(what, fontsize=8)
        ax.tick_params(labelsize=7)
    if "lm_block_flop_ratio" in res:  # the steady state's targets and the LM block's floor
        ax = axes[1]
        for y, style, label in (
                (0.6 * res["steady_sequential_s"], ":", "target: 0.6 × sequential"),
                (1.25 * res["steady_sft_s"], "--", "target: 1.25 × SFT"),
                (res["lm_block_flop_ratio"] * res["steady_sft_s"], "-.",
                 f"LM block's FLOP floor: {res['lm_block_flop_ratio']:.2f} × SFT")):
            ax.axhline(y, ls=style, color="k", lw=0.8, label=label)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{res['device']}{', LM TP 2 / oracle TP 1' if res.get('tp2') else ''}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--tp2", action="store_true",
                    help="the LM group at TP = 2, the oracle group at TP = 1")
    ap.add_argument("--analyse-only", action="store_true",
                    help="read the runs already in --workdir instead of running them")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="acft-schedule-"))
    cache = work / "cache"
    seq, par, sft = [], [], []
    st_seq, st_par, st_sft, first, startup, fill = [], [], [], [], [], []
    lm_block, oracle_block, sft_block = [], [], []  # the sequential run's blocks, alone
    par_lm_block = []  # the parallel run's LM blocks, beside the oracle group
    between = []
    overrides = list(args.overrides)
    if args.tp2:
        overrides += ["model.tensor_model_parallel_size=2",
                      "model.acft.oracle_group.tensor_model_parallel_size=1"]
    for r in range(args.repeats):
        a = run(work / f"seq{r}", cache, "sequential", overrides, args.analyse_only)
        b = run(work / f"par{r}", cache, "parallel", overrides, args.analyse_only)
        seq.append(a["acft_s"])
        par.append(b["acft_s"])
        sft.extend([a["baseline_s"], b["baseline_s"]])
        st_seq.append(steady(a["acft_iterations_s"]))
        st_par.append(steady(b["acft_iterations_s"]))
        st_sft.extend([steady(a["sft_iterations_s"]), steady(b["sft_iterations_s"])])
        first.append(b["acft_iterations_s"][0])
        startup.append(b["startup_s"])
        lm_block.append(steady(a["lm_block_s"]))
        par_lm_block.append(steady(b["lm_block_s"]))
        # what the sequential iteration spends beyond its two blocks: with reference_on=oracle
        # the reference's q for the LM block (and the blocks' loads and publications)
        between.append(steady([it - o - lm for it, o, lm in zip(
            a["acft_iterations_s"], a["oracle_block_s"], a["lm_block_s"])]))
        oracle_block.append(steady(a["oracle_block_s"]))
        sft_block.append(steady(a["sft_block_s"]))
        fill.append(b["fill_s"])
        print(f"repeat {r}: per iteration, sequential {[round(x, 1) for x in a['acft_iterations_s']]}"
              f", parallel {[round(x, 1) for x in b['acft_iterations_s']]}, SFT "
              f"{[round(x, 1) for x in a['sft_iterations_s']]}", flush=True)
        print(f"repeat {r}: SFT {a['baseline_s']:.1f}/{b['baseline_s']:.1f} s, sequential ACFT "
              f"{a['acft_s']:.1f} s, parallel ACFT {b['acft_s']:.1f} s", flush=True)
    k = [int(o.split("=")[1]) for o in [*DEFAULT, *overrides]
         if o.startswith("model.acft.iterations=")][-1]
    res = {"device": f"CPU, {os.cpu_count()} cores", "iterations": k, "tp2": args.tp2,
           "overrides": " ".join(overrides),
           "steady_sequential_s": statistics.median(st_seq),
           "steady_parallel_s": statistics.median(st_par),
           "steady_sft_s": statistics.median(st_sft),
           "parallel_first_iteration_s": statistics.median(first),
           "sft_s": statistics.median(sft), "sequential_s": statistics.median(seq),
           "parallel_s": statistics.median(par)}
    res["steady_lm_block_s"] = statistics.median(lm_block)
    res["steady_oracle_block_s"] = statistics.median(oracle_block)
    res["oracle_vs_lm_block"] = res["steady_oracle_block_s"] / res["steady_lm_block_s"]
    res["steady_between_blocks_s"] = statistics.median(between)
    # the oracle group's whole iteration (its block, and q with reference_on=oracle) / LM block
    res["oracle_group_vs_lm_block"] = ((res["steady_oracle_block_s"]
                                        + res["steady_between_blocks_s"])
                                       / res["steady_lm_block_s"])
    # what the parallel schedule costs beyond its LM block alone (contention, the exchange),
    # in two factors: the LM block beside the oracle group / alone (the two groups share this
    # machine's cores, caches and memory bandwidth; on a cluster they do not), and the parallel
    # iteration / its LM block (the hand-over of θ and the first q between the blocks)
    res["steady_parallel_vs_lm_block"] = res["steady_parallel_s"] / res["steady_lm_block_s"]
    res["steady_parallel_lm_block_s"] = statistics.median(par_lm_block)
    res["parallel_lm_block_vs_alone"] = res["steady_parallel_lm_block_s"] / res["steady_lm_block_s"]
    res["parallel_iteration_vs_lm_block"] = (res["steady_parallel_s"]
                                             / res["steady_parallel_lm_block_s"])
    res["steady_sft_block_s"] = statistics.median(sft_block)
    res["lm_block_vs_sft_block"] = res["steady_lm_block_s"] / res["steady_sft_block_s"]
    # the floor of steady_parallel_vs_sft: the LM block's own extra FLOPs over SFT's
    res["lm_block_flop_ratio"] = lm_flop_ratio(work / "seq0")
    res["parallel_vs_sequential"] = res["parallel_s"] / res["sequential_s"]
    res["parallel_vs_sft"] = res["parallel_s"] / res["sft_s"]
    res["sequential_vs_sft"] = res["sequential_s"] / res["sft_s"]
    res["steady_parallel_vs_sequential"] = res["steady_parallel_s"] / res["steady_sequential_s"]
    res["steady_parallel_vs_sft"] = res["steady_parallel_s"] / res["steady_sft_s"]
    res["parallel_startup_s"] = statistics.median(startup)
    res["parallel_fill_s"] = statistics.median(fill)
    res["parallel_startup_share"] = res["parallel_startup_s"] / res["parallel_s"]
    res["parallel_fill_share"] = res["parallel_fill_s"] / res["parallel_s"]
    print(f"K = {k}: plain SFT {res['sft_s']:.1f} s | sequential ACFT {res['sequential_s']:.1f} s "
          f"| parallel ACFT {res['parallel_s']:.1f} s")
    print(f"parallel / sequential = {res['parallel_vs_sequential']:.3f}; parallel / SFT = "
          f"{res['parallel_vs_sft']:.3f}; sequential / SFT = {res['sequential_vs_sft']:.3f}")
    print(f"steady state per iteration: SFT {res['steady_sft_s']:.1f} s | sequential "
          f"{res['steady_sequential_s']:.1f} s | parallel {res['steady_parallel_s']:.1f} s; "
          f"parallel / sequential = {res['steady_parallel_vs_sequential']:.3f}, parallel / SFT = "
          f"{res['steady_parallel_vs_sft']:.3f}; parallel start-up {res['parallel_startup_s']:.1f} s "
          f"({100 * res['parallel_startup_share']:.1f}% of its run), pipeline fill (oracle block "
          f"1) {res['parallel_fill_s']:.1f} s ({100 * res['parallel_fill_share']:.1f}%)")
    print(f"blocks alone (sequential run): LM {res['steady_lm_block_s']:.1f} s "
          f"({res['lm_block_vs_sft_block']:.2f}x SFT's block; FLOP-predicted "
          f"{res['lm_block_flop_ratio']:.2f}x), oracle {res['steady_oracle_block_s']:.1f} s "
          f"(oracle / LM {res['oracle_vs_lm_block']:.2f}), between the blocks "
          f"{res['steady_between_blocks_s']:.1f} s (oracle group / LM "
          f"{res['oracle_group_vs_lm_block']:.2f}); parallel / LM block "
          f"{res['steady_parallel_vs_lm_block']:.2f} = LM block beside the oracle group / alone "
          f"{res['parallel_lm_block_vs_alone']:.2f} x parallel iteration / its LM block "
          f"{res['parallel_iteration_vs_lm_block']:.2f}")
    if args.json:
        write_results(args.json, res, plot, res)
    return res


if __name__ == "__main__":
    main()
