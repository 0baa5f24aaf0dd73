"""Tokens per second of our KV-cached sampler, a naive full-recompute loop and megatron-core's
``StaticInferenceEngine``.

    python benchmarks/sampling.py                         # batch 1..64, 64 new tokens, CPU
    python benchmarks/sampling.py --batches 16 --json out.json

Both run the engine's decode loop (``nemo_acft.models.generate.generate``, what
``MegatronGPTACFTModel.generate`` runs) on the same model, prompts and seed: ``use_kv_cache``
True (a megatron ``StaticInferenceContext``, prefill then one position per step) or False (the
whole prefix recomputed each step). Both produce the same tokens, and the script checks it.
Rows alternate between the two and the median of ``--repeats`` is reported. Models (``--models``),
each with a one-layer NADO head, sampled unguided and guided (q ∝ p·R):

- ``tiny``: ``tiny_cpu``'s shape (2 layers, hidden 64, 4 heads, vocabulary 512), 8-token
  prompts; the headline figures (``kv_vs_naive_speedup``: batch 16, unguided);
- ``small``: 4 layers, hidden 256, 8 heads, vocabulary 8192, 32-token prompts (keys ``small.*``);
- ``1b_32k`` (GPU mode, ``--device cuda --models small,1b_32k``: the engine in bf16): 16 layers,
  hidden 2048, vocabulary 32k, 128-token prompts. In bf16 the KV-cached and recomputing paths
  round differently, so there the share of rows whose tokens differ is recorded
  (``kv_recompute_rows_differ``) instead of failing; on CPU (fp32) any difference fails.

megatron-core's own ``StaticInferenceEngine`` (``GPTInferenceWrapper`` +
``TextGenerationController``, top-p 0.9, the same trunk without the head, unguided only: it has no
NADO guidance) runs on CPU through ``nemo_acft.cpu_compat``'s ``torch.cuda`` shim. Its
prompts go through a whitespace tokenizer of ids. Its tokens/s counts the tokens it actually
generated (it stops a sequence at EOS = 0).

megatron-core 0.13.1's ``DynamicInferenceEngine`` (in-flight batching) is tried where it can run:
its attention path (``Attention.flash_decode_and_prefill``) calls flash-attn's varlen / KV-cache
kernels, CUDA-only and not installed on the CPU stack, so on CPU the JSON records why it was not
measured (``mcore_dynamic``) and "the best megatron-core engine" is the static one. Headline keys:
``vs_best_mcore_b16`` / ``vs_best_mcore_b64`` (ours / the faster engine, unguided, the largest
model run) and ``kv_vs_naive_small``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nemo_acft.io_utils import save_figure  # noqa: E402


def build(vocab, hidden, layers, heads, seq, device="cpu"):
    """The engine of this shape (a non-zero one-layer head) and its megatron-core module; on a
    GPU in bf16 (NeMo's ``precision: bf16``), on CPU in fp32."""
    from benchmarks.common import engine

    model = engine(vocab, hidden, layers, heads, seq, head_layers=1,
                   precision="bf16" if device == "cuda" else 32, device=device)
    return model, model.module.eval()


#: name -> (vocab, hidden, layers, heads, prompt length)
MODELS = {"tiny": (512, 64, 2, 4, 8), "small": (8192, 256, 4, 8, 32),
          "1b_32k": (32768, 2048, 16, 16, 128)}  # the GPU mode's (--device cuda)


def run(model, batch, new_tokens, vocab, kv, guided, seed=0, prompt_len=8):
    from nemo_acft.models.generate import SamplingParams, generate

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, top_p=0.9, seed=seed)
    t = time.perf_counter()
    with torch.no_grad():
        out = generate(model, prompts, params, vocab_size=vocab, guided=guided,
                       use_kv_cache=kv)
    return time.perf_counter() - t, out.tokens


class _IdTokenizer:
    """The tokenizer interface megatron's controller calls: text is space-separated ids."""

    eod = 0

    def __init__(self, vocab):
        self.vocab_size = vocab

    def tokenize(self, text):
        return [int(x) for x in text.split()]

    def detokenize(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def offsets(self, ids, text):
        return list(range(len(ids)))


def mcore_engine(model, vocab, max_batch, max_seq):
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import \
        GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import \
        InferenceWrapperConfig
    from megatron.core.inference.text_generation_controllers.text_generation_controller import \
        TextGenerationController

    cfg = InferenceWrapperConfig(hidden_size=model.config.hidden_size,
                                 inference_batch_times_seqlen_threshold=10**9,
                                 fp32_residual_connection=False,
                                 params_dtype=next(model.parameters()).dtype,
                                 padded_vocab_size=vocab, inference_max_seq_length=max_seq,
                                 inference_max_requests=max_batch)
    ctrl = TextGenerationController(inference_wrapped_model=GPTInferenceWrapper(model, cfg),
                                    tokenizer=_IdTokenizer(vocab))
    return StaticInferenceEngine(text_generation_controller=ctrl, max_batch_size=max_batch)


def run_mcore(engine, batch, new_tokens, vocab, seed=0, prompt_len=8):
    from megatron.core.inference.sampling_params import SamplingParams as MSamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [" ".join(map(str, torch.randint(3, vocab, (prompt_len,), generator=g).tolist()))
               for _ in range(batch)]
    torch.manual_seed(seed)
    t = time.perf_counter()
    res = engine.generate(prompts=prompts,
                          sampling_params=MSamplingParams(num_tokens_to_generate=new_tokens,
                                                          top_p=0.9))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return dt, sum(len(r.generated_tokens) for r in res)


def plot(all_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_rows), figsize=(5.5 * len(all_rows), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], all_rows.items()):
        for guided, style in ((False, "-"), (True, "--")):
            sel = [r for r in rows if r["guided"] == guided]
            b = [r["batch"] for r in sel]
            tag = "guided" if guided else "unguided"
            ax.plot(b, [r["kv_tok_s"] for r in sel], "o" + style, label=f"ours, KV cache, {tag}")
            ax.plot(b, [r["naive_tok_s"] for r in sel], "s" + style, label=f"recompute, {tag}")
            if not guided:
                ax.plot(b, [r["mcore_tok_s"] for r in sel], "^" + style,
                        label="megatron StaticInferenceEngine")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="new tokens / s",
               title=f"sampling throughput, {name} model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def bench_model(name, batches, new_tokens, repeats, device="cpu"):
    from benchmarks.common import plain_gpt

    vocab, hidden, layers, heads, prompt_len = MODELS[name]
    seq = prompt_len + new_tokens
    acft, model = build(vocab, hidden, layers, heads, seq, device)
    plain = plain_gpt(acft).to(next(model.parameters())).eval()  # device and dtype
    engine = mcore_engine(plain, vocab, max(batches), seq)
    rows = []
    for guided in (False, True):
        for batch in batches:
            run(model, batch, 4, vocab, True, guided, prompt_len=prompt_len)  # warm-up
            if not guided:
                run_mcore(engine, batch, 4, vocab, prompt_len=prompt_len)
            kv_t, naive_t, mc, mismatch = [], [], [], []
            for r in range(repeats):
                t1, tok_kv = run(model, batch, new_tokens, vocab, True, guided, r, prompt_len)
                t2, tok_naive = run(model, batch, new_tokens, vocab, False, guided, r, prompt_len)
                differ = float((tok_kv != tok_naive).any(-1).float().mean())
                if differ and device == "cpu":
                    raise AssertionError(f"{name} batch {batch}: KV-cache and recompute tokens "
                                         "differ")
                mismatch.append(differ)  # bf16 on a GPU: the paths round differently; counted
                kv_t.append(t1)
                naive_t.append(t2)
                if not guided:
                    dt, ntok = run_mcore(engine, batch, new_tokens, vocab, r, prompt_len)
                    mc.append(ntok / dt)
            n = batch * new_tokens
            row = {"batch": batch, "guided": guided,
                   "kv_tok_s": n / statistics.median(kv_t),
                   "naive_tok_s": n / statistics.median(naive_t)}
            row["speedup"] = row["kv_tok_s"] / row["naive_tok_s"]
            if device != "cpu":
                row["kv_recompute_rows_differ"] = statistics.mean(mismatch)
            if mc:
                row["mcore_tok_s"] = statistics.median(mc)
                row["kv_vs_mcore"] = row["kv_tok_s"] / row["mcore_tok_s"]
            rows.append(row)
            extra = f"   megatron engine {row['mcore_tok_s']:8.0f} tok/s" if mc else ""
            print(f"{name:5s} batch {batch:3d} {'guided  ' if guided else 'unguided'}  KV "
                  f"{row['kv_tok_s']:8.0f} tok/s   recompute {row['naive_tok_s']:8.0f} tok/s   "
                  f"x{row['speedup']:.2f}{extra}", flush=True)
    return rows


def dynamic_engine_unavailable():
    """Why megatron-core's ``DynamicInferenceEngine`` cannot run here (None: it can)."""
    from megatron.core.transformer import attention

    if not torch.cuda.is_available():
        return "CPU: its dynamic-batching attention needs CUDA"
    if attention.flash_attn_varlen_func is None and not attention.HAVE_FA3:
        return "flash-attn is not installed (Attention.flash_decode_and_prefill needs it)"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,small", help=f"comma-separated, of {list(MODELS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (fp32) | cuda (bf16; e.g. --models "
                    "small,1b_32k)")
    args = ap.parse_args(argv)
    device = (f"{torch.cuda.get_device_name()}, bf16 engine" if args.device == "cuda" else
              f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    batches = [int(b) for b in args.batches.split(",")]
    flat = {"device": device, "new_tokens": args.new_tokens}
    all_rows = {}
    for name in args.models.split(","):
        rows = all_rows[name] = bench_model(name, batches, args.new_tokens, args.repeats,
                                            args.device)
        prefix = "" if name == "tiny" else f"{name}."
        for r in rows:
            tag = f"{prefix}{'guided' if r['guided'] else 'unguided'}.b{r['batch']}"
            for key in ("kv_tok_s", "naive_tok_s", "speedup", "mcore_tok_s", "kv_vs_mcore",
                        "kv_recompute_rows_differ"):
                if key in r:
                    flat[f"{tag}.{key}"] = r[key]
        b16 = [r for r in rows if r["batch"] == 16 and not r["guided"]]
        if b16:
            flat[f"{prefix}kv_vs_naive_speedup"] = b16[0]["speedup"]
            flat[f"{prefix}kv_vs_mcore_engine"] = b16[0]["kv_vs_mcore"]
    why = dynamic_engine_unavailable()
    flat["mcore_dynamic"] = f"not measured: {why}" if why else "not wired yet on GPU"
    last = [n for n in args.models.split(",")][-1]
    for b in (16, 64):
        rows_b = [r for r in all_rows[last] if r["batch"] == b and not r["guided"]]
        if rows_b:
            flat[f"vs_best_mcore_b{b}"] = rows_b[0]["kv_vs_mcore"]
    if "small" in all_rows:
        b16 = [r for r in all_rows["small"] if r["batch"] == 16 and not r["guided"]]
        if b16:
            flat["kv_vs_naive_small"] = b16[0]["speedup"]
    flat["vs_best_mcore_model"] = last
    if args.json:
        write_results(args.json, flat, plot, all_rows)
    return flat


if __name__ == "__main__":
    main()
