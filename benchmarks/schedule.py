"""Wall time of K iterations of plain SFT, sequential ACFT and parallel ACFT on the same work.

    python benchmarks/schedule.py                      # K = 4 on the tiny_cpu config
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
iteration k is ``created(θ_k) − created(θ_(k−1))``, for ACFT's exchange and for the plain
fine-tune's store alike. The first iteration carries the start-up (the worlds, the first oracle
block that the parallel schedule cannot overlap); ``steady_*`` are medians over iterations 3..K.
``steady_parallel_vs_sequential`` and ``steady_parallel_vs_sft`` compare those. ``--tp2`` runs the
model-parallel case: the LM group at TP = 2 (two processes), the oracle group at TP = 1.

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nemo_acft.io_utils import save_figure  # noqa: E402

#: the work of one iteration: LM block and oracle block of similar length on 2 cores
DEFAULT = ["model.acft.iterations=8", "model.acft.steps_per_iteration=200",
           "model.acft.oracle_block.steps=150", "model.acft.oracle_block.prompts=512",
           "eval.prompts=50", "eval.samples_per_prompt=1", "eval.ppl_records=100",
           "progress=false", "model.acft.save_every=100"]


def run(run_dir: Path, cache: Path, schedule: str, overrides):
    cmd = [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}", f"cache_dir={cache}",
           f"schedule={schedule}", *DEFAULT, *overrides]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    phases = json.loads((run_dir / "phases.json").read_text())
    phases["process_s"] = time.perf_counter() - t
    # plain SFT: the plain fine-tune's K LM blocks, as their manifests time them
    phases["baseline_s"] = sum(json.loads(m.read_text())["seconds"] for m in
                               (run_dir / "baseline" / "lm").glob("iter_*/manifest.json"))
    phases["acft_iterations_s"] = iteration_times(run_dir / "exchange" / "lm")
    phases["sft_iterations_s"] = iteration_times(run_dir / "baseline" / "lm")
    return phases


def iteration_times(store_kind: Path):
    """``created(θ_k) − created(θ_(k−1))`` for k = 1..K from the manifests of a store."""
    created = [json.loads(m.read_text())["created"]
               for m in sorted(store_kind.glob("iter_*/manifest.json"))]
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
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="acft-schedule-"))
    cache = work / "cache"
    seq, par, sft = [], [], []
    st_seq, st_par, st_sft, first = [], [], [], []
    overrides = list(args.overrides)
    if args.tp2:
        overrides += ["model.tensor_model_parallel_size=2",
                      "model.acft.oracle_group.tensor_model_parallel_size=1"]
    for r in range(args.repeats):
        a = run(work / f"seq{r}", cache, "sequential", overrides)
        b = run(work / f"par{r}", cache, "parallel", overrides)
        seq.append(a["acft_s"])
        par.append(b["acft_s"])
        sft.extend([a["baseline_s"], b["baseline_s"]])
        st_seq.append(steady(a["acft_iterations_s"]))
        st_par.append(steady(b["acft_iterations_s"]))
        st_sft.extend([steady(a["sft_iterations_s"]), steady(b["sft_iterations_s"])])
        first.append(b["acft_iterations_s"][0])
        print(f"repeat {r}: per iteration, sequential {[round(x, 1) for x in a['acft_iterations_s']]}"
              f", parallel {[round(x, 1) for x in b['acft_iterations_s']]}, SFT "
              f"{[round(x, 1) for x in a['sft_iterations_s']]}", flush=True)
        print(f"repeat {r}: SFT {a['baseline_s']:.1f}/{b['baseline_s']:.1f} s, sequential ACFT "
              f"{a['acft_s']:.1f} s, parallel ACFT {b['acft_s']:.1f} s", flush=True)
    k = [int(o.split("=")[1]) for o in [*DEFAULT, *overrides]
         if o.startswith("model.acft.iterations=")][-1]
    res = {"device": f"CPU, {os.cpu_count()} cores", "iterations": k, "tp2": args.tp2,
           "steady_sequential_s": statistics.median(st_seq),
           "steady_parallel_s": statistics.median(st_par),
           "steady_sft_s": statistics.median(st_sft),
           "parallel_first_iteration_s": statistics.median(first),
           "sft_s": statistics.median(sft), "sequential_s": statistics.median(seq),
           "parallel_s": statistics.median(par)}
    res["parallel_vs_sequential"] = res["parallel_s"] / res["sequential_s"]
    res["parallel_vs_sft"] = res["parallel_s"] / res["sft_s"]
    res["sequential_vs_sft"] = res["sequential_s"] / res["sft_s"]
    res["steady_parallel_vs_sequential"] = res["steady_parallel_s"] / res["steady_sequential_s"]
    res["steady_parallel_vs_sft"] = res["steady_parallel_s"] / res["steady_sft_s"]
    res["parallel_startup_share"] = (res["parallel_first_iteration_s"] - res["steady_parallel_s"]) \
        / res["parallel_s"]
    print(f"K = {k}: plain SFT {res['sft_s']:.1f} s | sequential ACFT {res['sequential_s']:.1f} s "
          f"| parallel ACFT {res['parallel_s']:.1f} s")
    print(f"parallel / sequential = {res['parallel_vs_sequential']:.3f}; parallel / SFT = "
          f"{res['parallel_vs_sft']:.3f}; sequential / SFT = {res['sequential_vs_sft']:.3f}")
    print(f"steady state per iteration: SFT {res['steady_sft_s']:.1f} s | sequential "
          f"{res['steady_sequential_s']:.1f} s | parallel {res['steady_parallel_s']:.1f} s; "
          f"parallel / sequential = {res['steady_parallel_vs_sequential']:.3f}, parallel / SFT = "
          f"{res['steady_parallel_vs_sft']:.3f}; parallel start-up "
          f"{100 * res['parallel_startup_share']:.0f}% of its run")
    if args.json:
        write_results(args.json, res, plot, res)
    return res


if __name__ == "__main__":
    main()
