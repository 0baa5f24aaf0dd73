"""What the run lock and the checks before the first write add to ``acft-train``'s start-up.

    python benchmarks/startup.py --json benchmarks/results/startup_cpu.json

- ``lock_ms``: taking and giving up the run lock (``nemo_acft.runlock``) on a local file system,
  median of 300, with the lock files of every other role present (each is tried);
- ``cfg_s``: ``acft-train --cfg`` (interpreter start, Hydra compose, the schema check, print);
- ``refused_s``: ``acft-train`` on a run directory whose lock another process holds: the same
  plus the lock, up to the one-line refusal — how soon a second driver learns it must not run;
- ``checks_s``: the checks of the built-in default before its first write (oracle, data, the
  model config staged outside the run directory), in this process after its imports, and
  ``first_world_s``: ``acft-train`` from its start to its first world's start (the fork server's
  imports overlap the checks), on a directory whose run is complete (nothing is trained).

Each whole command is timed ``--repeats`` times, interleaved, medians reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAST = ["model.acft.iterations=2", "model.acft.steps_per_iteration=12", "pretrain.steps=30",
        "data.builtin.pretrain_records=600", "data.builtin.train_records=300",
        "data.builtin.heldout_records=100", "pretrain.model.hidden_size=32",
        "pretrain.model.ffn_hidden_size=128", "progress=false"]


def lock_ms(root: Path, n: int = 300) -> float:
    from nemo_acft.runlock import ROLES, lock_run

    run = root / "lockbench"
    for role in ROLES:  # every role's file exists, as in a run that has seen them all
        lock_run(run, role).release()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        lock_run(run, "finish").release()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _time(cmd) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="acft-startup-"))
    try:
        run, cache = root / "run", root / "cache"
        train = [sys.executable, "-m", "nemo_acft.train", f"run_dir={run}",
                 f"cache_dir={cache}", *FAST]
        t = time.perf_counter()
        r = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
        full_run_s = time.perf_counter() - t
        from nemo_acft.runlock import lock_run

        figures = {"lock_ms": lock_ms(root), "full_run_s": full_run_s}
        cfg_s, refused_s, first_s = [], [], []
        for _ in range(args.repeats):
            cfg_s.append(_time([*train, "--cfg"]))
            held = lock_run(run, "all")
            try:
                refused_s.append(_time(train))
            finally:
                held.release()
            (run / "phases.json").unlink(missing_ok=True)
            first_s.append(_first_world(train, run))
        from nemo_acft.algorithms.preflight import preflight
        from nemo_acft.algorithms.setup import quiet_libraries
        from nemo_acft.train import compose

        quiet_libraries()
        cfg = compose([f"run_dir={root / 'fresh'}", f"cache_dir={cache}", *FAST])
        preflight(cfg)  # warm: the imports
        checks = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            plan = preflight(cfg)
            checks.append(time.perf_counter() - t)
            if plan.staged is not None:
                plan.staged.cleanup()
        figures.update(cfg_s=statistics.median(cfg_s), refused_s=statistics.median(refused_s),
                       checks_s=statistics.median(checks),
                       first_world_s=statistics.median(first_s),
                       lock_share_of_first_world=figures["lock_ms"] / 1e3
                       / statistics.median(first_s), repeats=args.repeats)
        print("| figure | seconds |\n|---|---|")
        for key in ("cfg_s", "refused_s", "checks_s", "first_world_s"):
            print(f"| {key} | {figures[key]:.2f} |")
        print(f"| lock_ms | {figures['lock_ms']:.3f} ms |")
        print(f"| lock_share_of_first_world | {figures['lock_share_of_first_world']:.2e} |")
        if args.json:
            from benchmarks.common import write_results

            write_results(args.json, figures, _plot, figures)
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _first_world(train, run: Path) -> float:
    """Seconds from ``acft-train``'s start to its first world's start (the prepare phase's
    ``prepare_started`` in ``phases.json``), on a run that is complete."""
    t0 = time.time()
    r = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((run / "phases.json").read_text())["prepare_started"] - t0


def _plot(figures, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nemo_acft.io_utils import save_figure

    keys = ["cfg_s", "refused_s", "checks_s", "first_world_s"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(keys, [figures[k] for k in keys])
    ax.set(xlabel="seconds (median)", title=f"acft-train start-up; the lock: "
                                            f"{figures['lock_ms']:.2f} ms")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
