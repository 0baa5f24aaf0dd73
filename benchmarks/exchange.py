"""The weight exchange against the file system: each θ (trunk) and φ (head) hand-over between the
groups, against writing and reading the same bytes once, in the same run.

    python benchmarks/exchange.py --json benchmarks/results/exchange_cpu.json
    python benchmarks/exchange.py --sizes tiny,small --repeats 2
    python benchmarks/exchange.py --sizes medium --compare-megatron  # against megatron's caller

A hand-over is what the schedules do (:class:`~nemo_acft.algorithms.exchange.ArtifactStore`):
the writer ``publish``es the part (megatron ``dist_checkpointing`` save of the part's sharded state
dict into a temporary directory, the xxh3-128 digest of every file into the manifest, rename),
the reader ``verify``s it (manifest and every file's digest) and ``load_part``s it into its model (a
``dist_checkpointing`` load, resharded where the layouts differ). The file-system bound beside it:
the artifact's files, already in memory, written to new files (``write`` + ``fsync``) and read
back once, the same bytes in the same run. ``exchange_vs_fs_bound`` is the hand-over's time over
that bound at the largest size (the worst of θ and φ); smaller sizes are dominated by fixed costs
(process-group barriers, metadata) and are listed beside it. One process, TP = 1 on both sides
(the layout change costs nothing extra on one process; the TP = 2 → 1 read is timed by the
schedules' manifests).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from benchmarks.step_overhead import CPU_SIZES  # noqa: E402
from nemo_acft.io_utils import save_figure  # noqa: E402

PARTS = {"theta": ("lm", "trunk"), "phi": ("nado", "head")}


def fs_bound(src: Path, dst: Path) -> tuple:
    """Write the files of ``src`` (read into memory first, not timed) under ``dst`` with fsync,
    then read them back: (write seconds, read seconds)."""
    blobs = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    t = time.perf_counter()
    for rel, data in blobs.items():
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    w = time.perf_counter() - t
    t = time.perf_counter()
    for rel in blobs:
        (dst / rel).read_bytes()
    return w, time.perf_counter() - t


@contextlib.contextmanager
def megatron_caller():
    """The hand-over as megatron does it by default, for ``--compare-megatron``: the save
    scheduled on its forking ``TemporalAsyncCaller`` and files read through the multi-storage
    client (what :mod:`nemo_acft.models.checkpoint` did before it wrote in process, MSC off)."""
    from megatron.core.dist_checkpointing.strategies.base import async_calls
    from nemo_acft.models import checkpoint

    def forked(request):
        async_calls.schedule_async_request(request)
        async_calls.maybe_finalize_async_calls(blocking=True)

    kept = checkpoint._save_in_process, checkpoint._local_files
    checkpoint._save_in_process, checkpoint._local_files = forked, contextlib.nullcontext
    try:
        yield
    finally:
        checkpoint._save_in_process, checkpoint._local_files = kept


def bench_size(name, size, repeats, root: Path, compare: bool = False):
    from benchmarks.common import engine
    from nemo_acft.algorithms.exchange import ArtifactStore

    hidden, layers, heads, vocab, _batch, seq = size
    model = engine(vocab, hidden, layers, heads, seq, head_layers=1)
    store = ArtifactStore(root / name / "exchange")
    row = {"size": name}
    it = itertools.count()  # each hand-over its own iteration number

    def hand_over(kind, part):
        k = next(it)
        t = time.perf_counter()
        store.publish(kind, k, lambda d: model.save_part(d / part, part), {})
        w = time.perf_counter() - t
        t = time.perf_counter()
        path = store.verify(kind, k)
        model.load_part(path / part, part)
        return w, time.perf_counter() - t, path, k

    for label, (kind, part) in PARTS.items():
        writes, reads, bounds, theirs = [], [], [], []
        for k in range(repeats):
            w, r, path, last_k = hand_over(kind, part)
            writes.append(w)
            reads.append(r)
            fs_dir = root / name / f"fs_{label}_{k}"
            bounds.append(fs_bound(path, fs_dir))
            shutil.rmtree(fs_dir)
            if compare:  # interleaved with ours, so that both see the same machine
                with megatron_caller():
                    theirs.append(sum(hand_over(kind, part)[:2]))
        nbytes = store.manifest(kind, last_k)["bytes"]
        w, r = statistics.median(writes), statistics.median(reads)
        fw = statistics.median(b[0] for b in bounds)
        fr = statistics.median(b[1] for b in bounds)
        row.update({f"{label}_bytes": nbytes, f"{label}_write_s": w, f"{label}_read_s": r,
                    f"{label}_fs_write_s": fw, f"{label}_fs_read_s": fr,
                    f"{label}_vs_fs_bound": (w + r) / (fw + fr),
                    f"{label}_mb_per_s": nbytes / 2**20 / (w + r)})
        if compare:
            ours = statistics.median(a + b for a, b in zip(writes, reads))
            row.update({f"{label}_megatron_caller_s": statistics.median(theirs),
                        f"{label}_vs_megatron_caller": ours / statistics.median(theirs)})
    shutil.rmtree(root / name)
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, marker in (("theta", "o"), ("phi", "s")):
        mb = [r[f"{label}_bytes"] / 2**20 for r in rows]
        ax.loglog(mb, [r[f"{label}_write_s"] + r[f"{label}_read_s"] for r in rows],
                  marker=marker, label=f"{label}: hand-over (publish + verify + load)")
        ax.loglog(mb, [r[f"{label}_fs_write_s"] + r[f"{label}_fs_read_s"] for r in rows],
                  marker=marker, linestyle="--", label=f"{label}: write + read the same bytes")
    ax.set(xlabel="artifact size (MiB)", ylabel="seconds", title="Weight exchange vs file system")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated names of step_overhead's "
                                                  "CPU sizes; default: all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compare-megatron", action="store_true",
                    help="also time each hand-over as megatron's default caller does it (forked "
                         "writer, files read through MSC), interleaved: *_vs_megatron_caller")
    args = ap.parse_args(argv)
    names = args.sizes.split(",") if args.sizes else list(CPU_SIZES)
    root = Path(args.dir or tempfile.mkdtemp(prefix="acft_exchange_"))
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(bench_size(name, CPU_SIZES[name], args.repeats, root,
                               args.compare_megatron))
        print(f"[{name}] measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cols = ["size"] + [f"{p}_{k}" for p in PARTS for k in (
        "bytes", "write_s", "read_s", "fs_write_s", "fs_read_s", "vs_fs_bound", "mb_per_s")]
    print(f"CPU, {os.cpu_count()} cores; file system of {root}; medians of {args.repeats}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) if isinstance(r[c], (str, int)) else f"{r[c]:.3f}"
                         for c in cols))
    last = rows[-1]
    flat = {"device": f"CPU, {os.cpu_count()} cores", "size": last["size"],
            "exchange_vs_fs_bound": max(last["theta_vs_fs_bound"], last["phi_vs_fs_bound"])}
    if args.compare_megatron:
        flat["exchange_vs_megatron_caller"] = max(last["theta_vs_megatron_caller"],
                                                  last["phi_vs_megatron_caller"])
    for r in rows:
        for k, v in r.items():
            if k != "size":
                flat[f"{r['size']}.{k}"] = v
    if args.json:
        write_results(args.json, flat, plot, rows)
    return flat


if __name__ == "__main__":
    main()
