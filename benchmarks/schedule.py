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
DEFAULT = ["model.acft.iterations=4", "model.acft.steps_per_iteration=200",
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
    return phases


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["plain SFT", "ACFT sequential", "ACFT parallel"]
    vals = [res["sft_s"], res["sequential_s"], res["parallel_s"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(names, vals, color=["#999", "#4c72b0", "#dd8452"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f} s", ha="center", va="bottom")
    ax.set_ylabel("wall time of K iterations (s)")
    ax.set_title(f"K = {res['iterations']}, {res['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="acft-schedule-"))
    cache = work / "cache"
    seq, par, sft = [], [], []
    for r in range(args.repeats):
        a = run(work / f"seq{r}", cache, "sequential", args.overrides)
        b = run(work / f"par{r}", cache, "parallel", args.overrides)
        seq.append(a["acft_s"])
        par.append(b["acft_s"])
        sft.extend([a["baseline_s"], b["baseline_s"]])
        print(f"repeat {r}: SFT {a['baseline_s']:.1f}/{b['baseline_s']:.1f} s, sequential ACFT "
              f"{a['acft_s']:.1f} s, parallel ACFT {b['acft_s']:.1f} s", flush=True)
    k = next(int(o.split("=")[1]) for o in [*DEFAULT, *args.overrides]
             if o.startswith("model.acft.iterations="))
    res = {"device": f"CPU, {os.cpu_count()} cores", "iterations": k,
           "sft_s": statistics.median(sft), "sequential_s": statistics.median(seq),
           "parallel_s": statistics.median(par)}
    res["parallel_vs_sequential"] = res["parallel_s"] / res["sequential_s"]
    res["parallel_vs_sft"] = res["parallel_s"] / res["sft_s"]
    res["sequential_vs_sft"] = res["sequential_s"] / res["sft_s"]
    print(f"K = {k}: plain SFT {res['sft_s']:.1f} s | sequential ACFT {res['sequential_s']:.1f} s "
          f"| parallel ACFT {res['parallel_s']:.1f} s")
    print(f"parallel / sequential = {res['parallel_vs_sequential']:.3f}; parallel / SFT = "
          f"{res['parallel_vs_sft']:.3f}; sequential / SFT = {res['sequential_vs_sft']:.3f}")
    if args.json:
        write_results(args.json, res, plot, res)
    return res


if __name__ == "__main__":
    main()
