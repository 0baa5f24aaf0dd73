"""Step time and peak memory of an ACFT LM step against a plain SFT step, same model and batch.

    python benchmarks/step_overhead.py                      # CPU sizes, tiny to the largest here
    python benchmarks/step_overhead.py --sizes tiny --repeats 5 --json out.json
    python benchmarks/step_overhead.py --device cuda        # bf16 ~1B GPT, 32k and 128k vocab
                                                            # (+ MFU against the bf16 peak)

Variants, each a real optimizer step of the engine (``MegatronGPTACFTModel.lm_step``: forward
and backward in megatron-core's schedule, loss, gradient clipping, NeMo's AdamW):

- ``sft``: the LM loss alone (the head switched off: the trunk's forward and the CE);
- ``acft``: with the frozen NADO head (one transformer layer) and the fused chunked CE + KL
  (``loss_chunk_tokens``), plus λ · gated KL (``kl_penalty``);
- ``acft_unfused``: the same with ``loss_chunk_tokens=0`` (autograd through ``cross_entropy``
  and ``closed_form_kl``);
- ``acft_ref``: the default ``model.acft.reference=frozen``: q from a frozen reference (a second
  copy of the model, ``set_reference``), one no-grad forward of its trunk and head per batch and
  its logits projected inside the fused pass; the current head does not run;
- ``acft_ref_compiled``: the same with ``model.acft.nado_head.compile_loss`` (each chunk of the
  fused pass a ``torch.compile``-d function; compiled in the warm-up steps);
- ``acft_shipped``: ``model.acft.reference_on=oracle``: the frozen reference's q computed
  elsewhere (the oracle group) and given with the batch as its top 64 ids per token and a tail
  bucket (``nado/sparse.py``); the step runs no reference and no head: SFT's FLOPs. Beside it,
  ``q_ms``: what computing that q costs the oracle group per LM step
  (``MegatronGPTACFTModel.reference_q``: a forward of trunk and head, the top-k).

Beside each measured ratio, the FLOP-predicted one (:func:`flops`: matrix multiplies counted from
the shapes, backward = 2 × forward, the fused pass's recomputed projections included) and
``overhead_vs_flop_bound`` = (measured − 1) / (predicted − 1): how much more the extra work costs
than its FLOPs say (elementwise passes over ``[tokens, V]``, the reference's memory traffic).

Time: the variants run interleaved (sft, acft, acft_unfused, acft_ref, sft, ...) after warm-up
steps, on one model in one process (the loss chunk and the regularizer switched per step), and
the medians are compared. Memory: on CPU each variant runs in a fresh
subprocess, which reports its peak resident set (``VmHWM``) over its steps and the RSS just
before them. ``peak_mem_ratio`` compares the whole-process peaks and ``step_mem_ratio`` the
memory the step adds on top of the model. On GPU ``torch.cuda.max_memory_allocated`` is used.
Prints a table, writes ``--json`` (a flat dict) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nemo_acft.io_utils import save_figure  # noqa: E402

#: name -> (hidden, layers, heads, vocab, batch, seq)
CPU_SIZES = {
    "tiny": (64, 2, 4, 512, 8, 64),
    "small": (256, 4, 4, 8192, 4, 128),
    "medium": (512, 4, 8, 32768, 4, 256),
    "llm": (1024, 12, 16, 32768, 1, 512),  # an LLM's head/trunk ratio: 12 layers, 32k vocab
}
GPU_SIZES = {
    "1b_32k": (2048, 16, 16, 32768, 4, 2048),
    "1b_128k": (2048, 16, 16, 131072, 4, 2048),
}
VARIANTS = ("sft", "acft", "acft_unfused", "acft_ref", "acft_ref_compiled", "acft_shipped")
#: ids of q shipped per token (model.acft.reference_top_k's default)
SHIPPED_TOP_K = 64
#: dense bf16 peak of a GPU by the start of its name (vendor data sheets, SXM parts), TFLOP/s
PEAK_BF16_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0}


def peak_tflops(device_name: str, override=None):
    """The device's dense bf16 peak for MFU (``--peak-tflops`` wins; None: unknown device)."""
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if device_name.startswith(k)), None)


def flops(size, variant) -> float:
    """Matrix-multiply FLOPs of one step of ``variant`` (forward 1×, backward 2×): per token a
    layer's forward is 24h² + 4sh (QKV, projection, a 4h MLP, the attention scores and values),
    a ``hidden × V`` projection 2hV. SFT: 3 (L·layer + proj). ACFT adds the frozen head's layer
    (forward only) and its projection (twice when fused: in the pass and in its backward);
    ``acft_ref`` instead the reference's trunk and head layers (forward) and two projections
    (its LM logits and its head's), each twice in the fused pass."""
    hidden, layers, _heads, vocab, batch, seq = size
    layer = 24 * hidden ** 2 + 4 * seq * hidden
    proj = 2 * hidden * vocab
    sft = 3 * (layers * layer + proj)
    extra = {"sft": 0, "acft": layer + 2 * proj, "acft_unfused": layer + proj,
             "acft_ref": (layers + 1) * layer + 4 * proj,
             "acft_ref_compiled": (layers + 1) * layer + 4 * proj,
             "acft_shipped": 0}[variant]
    return float((sft + extra) * batch * seq)


def build(size, variant, device, dtype):
    from benchmarks.common import engine

    hidden, layers, heads, vocab, batch, seq = size
    precision = "bf16" if dtype == "bfloat16" else 32
    model = engine(vocab, hidden, layers, heads, seq, head_layers=1,
                   chunk=0 if variant == "acft_unfused" else 256, precision=precision,
                   device=device)
    model.configure_training("trunk", {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},
                             max_steps=1)
    model.module.nado_config.compile_loss = variant == "acft_ref_compiled"
    if variant.startswith("acft_ref"):  # the reference: this model's own θ and φ, saved and
        # loaded back
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="acft_ref_"))
        model.save_part(tmp / "trunk", "trunk")
        model.save_part(tmp / "head", "head")
        model.set_reference(tmp / "trunk", tmp / "head")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch, seq), "domain_ids": torch.zeros(batch, dtype=torch.long)}
    if variant == "acft_shipped":  # this model's own q, as the oracle group would ship it
        data.update(shipped_q(model, tokens))
    return model, None, None, data


def shipped_q(model, tokens):
    return model.reference_q(tokens, SHIPPED_TOP_K, micro_batch_size=tokens.shape[0])


def step(model, optimizer, params, data, variant):
    from nemo_acft.models.objectives import Regularizer

    reg = None if variant == "sft" else Regularizer(
        torch.tensor([1.0]), delta=0.95, reference=variant.startswith(("acft_ref", "acft_sh")),
        shipped=variant == "acft_shipped")
    model.lm_step(data, reg, micro_batch_size=data["inputs"].shape[0])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(size, device, dtype, repeats, warmup):
    """Medians of interleaved steps of every variant on ONE model (the variants differ only in
    the regularizer passed and the loss chunk, switched per step; the reference is loaded once):
    one model's memory, so that the largest shapes fit, and the same weights' state for all."""
    model, optimizer, params, data = build(size, "acft_ref", device, dtype)
    chunk = model.module.nado_config.loss_chunk_tokens
    tokens = torch.cat([data["inputs"], data["targets"][:, -1:]], dim=1)
    shipped = {**data, **shipped_q(model, tokens)}

    def one(v):
        model.module.nado_config.loss_chunk_tokens = 0 if v == "acft_unfused" else chunk
        model.module.nado_config.compile_loss = v == "acft_ref_compiled"
        if v == "q":  # the oracle group's work for one LM step
            shipped_q(model, tokens)
        else:
            step(model, optimizer, params, shipped if v == "acft_shipped" else data, v)

    times = {v: [] for v in (*VARIANTS, "q")}
    for _ in range(warmup):
        for v in times:
            one(v)
    for _ in range(repeats):
        for v in times:
            _sync(device)
            t = time.perf_counter()
            one(v)
            _sync(device)
            times[v].append(time.perf_counter() - t)
    return {v: statistics.median(ts) for v, ts in times.items()}


def memory_child(size_name, variant, device, dtype, steps):
    """Runs in a subprocess: the peak memory of ``steps`` steps of one variant (JSON on stdout)."""
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    model, optimizer, params, data = build(sizes[size_name], variant, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_now()
    for _ in range(steps):
        step(model, optimizer, params, data, variant)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _vm_hwm()
    print(json.dumps({"before": before, "peak": peak}))


def _vm_hwm():
    """This process's peak RSS (``VmHWM``): reset at exec, unlike ``ru_maxrss``, which a child
    inherits from the parent that forked it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(size_name, variant, device, dtype, steps=3):
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars},
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           # large buffers via mmap, returned to the OS when freed: RSS follows the allocator
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--memory-child", size_name, variant,
                          "--device", device, "--dtype", dtype], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory run {size_name}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["size"] for r in rows]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    series = (("time_ratio", "time ACFT/SFT"), ("acft_flop_ratio", "FLOPs ACFT/SFT"),
              ("ref_time_ratio", "time ACFT frozen ref/SFT"),
              ("acft_ref_flop_ratio", "FLOPs ACFT frozen ref/SFT"),
              ("peak_mem_ratio", "peak mem ACFT/SFT"),
              ("fused_vs_unfused_time_ratio", "time fused/unfused"),
              ("fused_vs_unfused_mem_ratio", "step mem fused/unfused"),
              ("shipped_time_ratio", "time ACFT q shipped/SFT"),
              ("q_vs_sft_step", "q on the oracle group/SFT step"))
    w = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([xi + (i - (len(series) - 1) / 2) * w for xi in x], [r[key] for r in rows], w,
               label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ratio")
    ax.set_title(f"ACFT step overhead ({rows[0]['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default)")
    ap.add_argument("--sizes", default=None, help="comma-separated names; default: all")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here (flat dict)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak for MFU (default: known GPUs' data sheets)")
    ap.add_argument("--memory-child", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.memory_child:
        return memory_child(*args.memory_child, args.device, dtype, steps=3)

    sizes = GPU_SIZES if args.device == "cuda" else CPU_SIZES
    names = args.sizes.split(",") if args.sizes else list(sizes)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        times = time_variants(sizes[name], args.device, dtype, args.repeats, args.warmup)
        mem = {v: measure_memory(name, v, args.device, dtype) for v in VARIANTS}
        step_mem = {v: mem[v]["peak"] - mem[v]["before"] for v in VARIANTS}
        rows.append({
            "size": name, "device": device_name, "dtype": dtype,
            "sft_ms": times["sft"] * 1e3, "acft_ms": times["acft"] * 1e3,
            "acft_unfused_ms": times["acft_unfused"] * 1e3,
            "sft_peak_mb": mem["sft"]["peak"] / 2**20, "acft_peak_mb": mem["acft"]["peak"] / 2**20,
            "acft_unfused_peak_mb": mem["acft_unfused"]["peak"] / 2**20,
            "time_ratio": times["acft"] / times["sft"],
            "peak_mem_ratio": mem["acft"]["peak"] / mem["sft"]["peak"],
            "step_mem_ratio": step_mem["acft"] / max(step_mem["sft"], 1),
            "fused_vs_unfused_time_ratio": times["acft"] / times["acft_unfused"],
            "fused_vs_unfused_mem_ratio": step_mem["acft"] / max(step_mem["acft_unfused"], 1),
            "fused_vs_unfused_peak_ratio": mem["acft"]["peak"] / mem["acft_unfused"]["peak"],
            "acft_ref_ms": times["acft_ref"] * 1e3,
            "acft_ref_peak_mb": mem["acft_ref"]["peak"] / 2**20,
            "ref_time_ratio": times["acft_ref"] / times["sft"],
            "ref_peak_mem_ratio": mem["acft_ref"]["peak"] / mem["sft"]["peak"],
            "acft_ref_compiled_ms": times["acft_ref_compiled"] * 1e3,
            "ref_compiled_time_ratio": times["acft_ref_compiled"] / times["sft"],
            "ref_compiled_vs_eager_time_ratio": times["acft_ref_compiled"] / times["acft_ref"],
            "ref_compiled_peak_mem_ratio": mem["acft_ref_compiled"]["peak"] / mem["sft"]["peak"],
            "acft_shipped_ms": times["acft_shipped"] * 1e3,
            "shipped_time_ratio": times["acft_shipped"] / times["sft"],
            "shipped_peak_mem_ratio": mem["acft_shipped"]["peak"] / mem["sft"]["peak"],
            "shipped_step_mem_ratio": step_mem["acft_shipped"] / max(step_mem["sft"], 1),
            "q_ms": times["q"] * 1e3, "q_vs_sft_step": times["q"] / times["sft"],
        })
        r = rows[-1]
        for v, key in (("acft", "time_ratio"), ("acft_ref", "ref_time_ratio"),
                       ("acft_ref_compiled", "ref_compiled_time_ratio")):
            pred = flops(sizes[name], v) / flops(sizes[name], "sft")
            r[f"{v}_flop_ratio"] = pred
            r[f"{v}_overhead_vs_flop_bound"] = (r[key] - 1) / (pred - 1)
        peak = peak_tflops(device_name, args.peak_tflops) if args.device == "cuda" else None
        if peak:  # MFU: SFT's model FLOPs per second of each variant over the peak; the
            # ACFT variants' own FLOPs (head, reference) count in their hardware utilisation
            for v in VARIANTS:
                t = times[v]
                r[f"{v}_mfu"] = flops(sizes[name], "sft") / t / (peak * 1e12)
                r[f"{v}_hfu"] = flops(sizes[name], v) / t / (peak * 1e12)
            r["peak_tflops"] = peak
        print(f"[{name}] measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cols = ("size", "sft_ms", "acft_ms", "acft_unfused_ms", "acft_ref_ms", "time_ratio",
            "acft_flop_ratio", "acft_overhead_vs_flop_bound", "ref_time_ratio",
            "acft_ref_flop_ratio", "acft_ref_overhead_vs_flop_bound", "ref_compiled_time_ratio",
            "acft_ref_compiled_overhead_vs_flop_bound", "sft_peak_mb",
            "acft_peak_mb", "acft_ref_peak_mb", "peak_mem_ratio", "ref_peak_mem_ratio",
            "step_mem_ratio", "fused_vs_unfused_time_ratio", "fused_vs_unfused_mem_ratio",
            "shipped_time_ratio", "shipped_peak_mem_ratio", "q_vs_sft_step")
    print(f"device: {device_name}, dtype {dtype}, medians of {args.repeats} interleaved steps")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.3f}" for c in cols))
        if "sft_mfu" in r:
            print(f"{r['size']}: MFU " + ", ".join(f"{v} {r[v + '_mfu']:.3f}" for v in VARIANTS)
                  + f" (peak {r['peak_tflops']:.0f} TFLOP/s bf16)")
    last = rows[-1]  # the headline figures: the largest size measured
    flat = {"device": device_name, "dtype": dtype, "size": last["size"]}
    for key in ("time_ratio", "peak_mem_ratio", "step_mem_ratio", "fused_vs_unfused_time_ratio",
                "fused_vs_unfused_mem_ratio", "fused_vs_unfused_peak_ratio"):
        flat[key] = last[key]
    for r in rows:
        for key, v in r.items():
            if key not in ("size", "device", "dtype"):
                flat[f"{r['size']}.{key}"] = v
    worst = max(rows, key=lambda r: max(r["acft_overhead_vs_flop_bound"],
                                        r["acft_ref_overhead_vs_flop_bound"]))
    flat["overhead_vs_flop_bound"] = max(worst["acft_overhead_vs_flop_bound"],
                                         worst["acft_ref_overhead_vs_flop_bound"])
    flat["overhead_vs_flop_bound_size"] = worst["size"]
    if "sft_mfu" in last:
        flat["sft_mfu"], flat["acft_ref_mfu"] = last["sft_mfu"], last["acft_ref_mfu"]
    if args.json:
        write_results(args.json, flat, plot, rows)
    return flat


if __name__ == "__main__":
    main()
