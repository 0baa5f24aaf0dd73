"""The fused CE + KL pass alone, against what plain SFT's loss costs on the same logits and
against an earlier revision of the same pass.

At an LLM's shape the ACFT step's extra work over SFT beyond the head's layers is this pass: the
``[tokens, V]`` elementwise work (exp, log-sigmoid, normalisers) and the recomputed ``hidden × V``
projection of the NADO logits. Timed here, forward + backward, interleaved with the references in
one run (these machines are noisy: the ratios are the figures, not the seconds):

- ``sft_ce``: ``F.cross_entropy`` on the same materialised logits, forward + backward (the loss
  plain SFT pays);
- ``fused``: :func:`~nemo_acft.nado.fused.fused_ce_kl_from_hidden` (the training path);
- ``fused_compiled``: the same with ``compile=True`` (``model.acft.nado_head.compile_loss``:
  each chunk's forward and backward one ``torch.compile``-d function; compile time reported
  apart, as ``compile_s``);
- ``fused_ref``, ``fused_ref_compiled``: the same two with a reference (the default
  ``model.acft.reference: frozen``: q_ref from the reference's LM logits, projected chunk by
  chunk from its hidden states like the NADO logits);
- ``fused_at_rev`` (``--baseline-rev REV``): the same function from ``git show
  REV:nemo_acft/nado/fused.py``, to measure a change of the pass;
- ``projection``: the two ``hidden × V`` products the pass adds (forward + backward recompute),
  as a matmul floor.

Usage: ``.venv/bin/python benchmarks/fused_pass.py --json benchmarks/results/fused_pass_cpu.json
[--baseline-rev eb396db] [--tokens 2048 --vocab 32768 --hidden 1024]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import write_results  # noqa: E402
from nemo_acft.nado.fused import fused_ce_kl_from_hidden  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fused_at(rev: str) -> Callable:
    """``fused_ce_kl_from_hidden`` as it was at git revision ``rev``."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:nemo_acft/nado/fused.py"],
                             check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline-rev {rev}: git show failed ({e.stderr.strip()})")
    path = Path(tempfile.mkdtemp()) / "fused_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("fused_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fused_ce_kl_from_hidden


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-rev", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for k in ("tokens", "vocab", "hidden", "chunk", "repeats"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k} {getattr(args, k)}: expected >= 1")
    g = torch.Generator().manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    z0 = torch.randn(n, v, generator=g) * 3
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.03
    y = torch.randint(0, v, (n,), generator=g)
    g_out = torch.rand(n, generator=g)
    ref = {"ref_hidden": torch.randn(n, h, generator=g),
           "ref_weight": torch.randn(v, h, generator=g) * 0.03}

    def sft_ce():
        z = z0.clone().requires_grad_()
        F.cross_entropy(z, y, reduction="none").backward(g_out)

    def run(fn, **kw):
        def go():
            z = z0.clone().requires_grad_()
            ce, kl, _ = fn(z, hid, w, y, chunk_tokens=args.chunk, **kw)
            torch.autograd.backward([ce, kl], [g_out, g_out])
        return go

    def projection():
        for _ in range(2):
            hid @ w.t()

    def clone_only():  # what every variant pays to get a fresh leaf
        z0.clone().requires_grad_()

    cases: Dict[str, Callable] = {"clone": clone_only, "sft_ce": sft_ce,
                                  "fused": run(fused_ce_kl_from_hidden),
                                  "fused_compiled": run(fused_ce_kl_from_hidden, compile=True),
                                  "fused_ref": run(fused_ce_kl_from_hidden, **ref),
                                  "fused_ref_compiled": run(fused_ce_kl_from_hidden, **ref,
                                                            compile=True),
                                  "projection": projection}
    if args.baseline_rev:
        cases["fused_at_rev"] = run(fused_at(args.baseline_rev))
    times = {k: [] for k in cases}
    warm = {}
    for k, fn in cases.items():  # warm-up (the compiled case compiles here)
        t = time.perf_counter()
        fn()
        warm[k] = time.perf_counter() - t
    t_all = time.perf_counter()
    for r in range(args.repeats):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        done = r + 1
        el = time.perf_counter() - t_all
        print(f"[fused_pass] {done}/{args.repeats} repeats, {el / done:.1f} s each, ETA "
              f"{el / done * (args.repeats - done):.0f} s", flush=True)
    med = {k: statistics.median(x) for k, x in times.items()}
    clone = med.pop("clone")
    net = {k: max(t - clone, 1e-9) for k, t in med.items() if k != "projection"}
    figures: Dict[str, Any] = {
        "device": f"CPU, {torch.get_num_threads()} threads", "tokens": n, "vocab": v,
        "hidden": h, "chunk": args.chunk, "repeats": args.repeats, "median_s": med,
        "clone_s": clone, "compile_s": warm["fused_compiled"] - med["fused_compiled"],
        "fused_vs_sft_ce": net["fused"] / net["sft_ce"],
        "fused_compiled_vs_sft_ce": net["fused_compiled"] / net["sft_ce"],
        "fused_compiled_vs_fused": net["fused_compiled"] / net["fused"],
        "fused_minus_projection_vs_sft_ce": (net["fused"] - med["projection"]) / net["sft_ce"],
        "compile_ref_s": warm["fused_ref_compiled"] - med["fused_ref_compiled"],
        "fused_ref_vs_sft_ce": net["fused_ref"] / net["sft_ce"],
        "fused_ref_compiled_vs_fused_ref": net["fused_ref_compiled"] / net["fused_ref"],
    }
    if "fused_at_rev" in net:
        figures["baseline_rev"] = args.baseline_rev
        figures["fused_vs_rev"] = net["fused"] / net["fused_at_rev"]
    for k, x in figures.items():
        print(f"  {k}: {x:.3f}" if isinstance(x, float) else f"  {k}: {x}")
    if args.json:
        write_results(args.json, figures, plot, med)
    return figures


def plot(med: Dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nemo_acft.io_utils import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(med), [t * 1e3 for t in med.values()])
    ax.set_ylabel("median ms (forward + backward)")
    ax.set_title("the fused CE + KL pass against SFT's loss")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
