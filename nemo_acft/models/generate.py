"""Batched generation from the GPT (+ NADO) megatron-core module with a KV cache: the decode
loop behind :meth:`MegatronGPTACFTModel.generate`.

Static batching, as megatron-core's text-generation controller: prompts are right-padded, the
model prefills up to the shortest prompt, then decodes one position at a time; a sequence still
inside its prompt takes its prompt token instead of the sample. Keys and values live in a
megatron ``StaticInferenceContext``, the trunk's layers and the NADO head's layers each under
their own layer numbers.

Tensor parallelism: the last position's vocab-parallel logits are gathered (one ``[b, V]`` row
per step, as megatron's inference does) and every TP rank draws with the same seeded generator,
so all ranks produce identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    """Decoding settings. ``top_k=0`` and ``top_p=1.0`` disable those filters."""

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: Optional[int] = None
    seed: int = 0
    guidance: float = 1.0  # guided decoding only: q ∝ p·R^guidance

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: expected > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if not self.guidance >= 0:
            raise ValueError(f"guidance={self.guidance}: expected >= 0")


@dataclass
class Samples:
    """A batch of generations.

    Attributes:
        tokens: ``[n, T]`` int64, prompt + continuation, right-padded with ``pad_id``.
        prompt_lengths: ``[n]``; lengths: ``[n]`` prompt + generated tokens (EOS included).
        logprobs: ``[n, T]`` log-probability of each generated token under the sampling
            distribution actually used (after temperature/top-k/top-p, guided or not); 0 on
            prompt and padding positions.
        labels: oracle labels, filled in later (None = not labelled / oracle failed).
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    labels: List[Optional[float]] = field(default_factory=list)

    def continuation(self, i: int) -> List[int]:
        """Generated token ids of sample ``i``."""
        return self.tokens[i, self.prompt_lengths[i]:self.lengths[i]].tolist()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (−inf) all but the top-k tokens and the smallest nucleus of mass ≥ top_p.

    Args:
        logits: ``[b, V]`` full-vocabulary logits (or log-probs).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_filtered(logits: torch.Tensor, top_k: int, top_p: float,
                    generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``softmax(filter_logits(logits, top_k, top_p))``, and its
    log-probability under that filtered distribution: ``(ids [b], log_probs [b])``.

    With a nucleus the distribution is built in the sorted order the nucleus needs anyway (one
    sort, one normaliser over ``[b, V]``), then scattered back to vocabulary order for the draw.
    Drawing in sorted order would save that scatter, but two nearly tied logits can swap places
    between bit-different but equal computations (the KV-cached and the recomputing paths, TP 1
    and TP 2), which changes the token a seed draws: ``benchmarks/sampling.py`` caught it. The
    draw itself is :func:`draw`."""
    if top_p >= 1.0:
        log_probs = torch.log_softmax(filter_logits(logits, top_k, top_p), -1)
    else:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        if 0 < top_k < logits.shape[-1]:  # ties with the k-th kept, as in filter_logits
            sorted_logits = sorted_logits.masked_fill(
                sorted_logits < sorted_logits[..., top_k - 1:top_k], float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        sorted_lp = torch.log_softmax(sorted_logits.masked_fill_(drop, float("-inf")), -1)
        log_probs = torch.empty_like(sorted_lp).scatter_(-1, order, sorted_lp)
    ids = draw(log_probs, generator)
    return ids, log_probs.gather(-1, ids[:, None]).squeeze(-1)


def draw(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of ``[b, V]`` log-probabilities (normalised or not; −inf never drawn):
    ``argmax(log_probs − log E)``, ``E = −log U`` exponential, ``U`` uniform: the Gumbel-max
    race ``torch.multinomial`` runs too, one random number per token, so a bit-level difference
    in the log-probabilities (the KV-cached and recomputing paths, TP 1 and TP 2) changes the
    winner only at a near tie of the keys. Drawn from ``torch.rand`` this is 4–5× faster on CPU
    at ``[16, 8192]`` than ``torch.multinomial``, whose ``exponential_`` costs there as much as
    the nucleus's sort (measured while profiling ``benchmarks/sampling.py``). ``U`` is kept
    ≥ the smallest normal float, so ``log E`` is finite and a kept token always beats −inf."""
    e = torch.rand(log_probs.shape, generator=generator, device=log_probs.device,
                   dtype=torch.float32).clamp_(min=torch.finfo(torch.float32).tiny)
    e = e.log_().neg_().log_()
    return (log_probs.float() - e).argmax(-1)


def _gather_vocab(x: torch.Tensor, tp_group) -> torch.Tensor:
    """Concatenate vocab shards ``[b, V/TP]`` → ``[b, V]`` (last position only)."""
    if tp_group is None:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, x.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             vocab_size: int, guided: bool = False, tp_group=None, pad_id: int = 0,
             use_kv_cache: bool = True) -> Samples:
    """Sample continuations of ``prompts`` from ``model`` (p, or q ∝ p·R when ``guided``).

    Args:
        model: a ``GPTNADOModel`` (single pipeline stage), or a plain ``GPTModel`` if not guided.
            Tensors are placed on the device of its parameters.
        prompts: token-id lists, each non-empty.
        vocab_size: the real vocabulary; padded ids beyond it are never sampled.
        guided: NADO-guided decoding, ``log q = log_softmax(z / T + β·logσ(s))``, β =
            ``params.guidance``.
        tp_group: tensor-parallel group of the model (None when TP = 1).
        use_kv_cache: False recomputes the whole prefix each step (a reference, and the
            baseline of the sampling benchmark).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_acft.nado import guided_log_probs

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    n = len(prompts)
    device = next(model.parameters()).device
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(prompt_lengths.max()) + params.max_new_tokens
    tokens = torch.full((n, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    positions = torch.arange(total, device=device).expand(n, total)
    logprobs = torch.zeros(n, total, device=device)
    lengths = prompt_lengths + params.max_new_tokens
    done = torch.zeros(n, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    ctx = StaticInferenceContext(n, total) if use_kv_cache else None
    if ctx is not None:  # the prefill projects only its last position (as megatron's engine)
        ctx.materialize_only_last_token_logits = True
    # sampling from p needs no NADO head: skip its layers and vocabulary projection
    skip_head = not guided and getattr(model, "head_enabled", False)
    if skip_head:
        model.head_enabled = False

    try:
        start = 0
        for end in range(int(prompt_lengths.min()), total):
            if ctx is None:
                start = 0
            out = model(tokens[:, start:end], positions[:, start:end], None, inference_context=ctx)
            if ctx is not None:
                ctx.sequence_len_offset += end - start
            lm_logits, nado_logits = out if isinstance(out, tuple) else (out, None)
            z = lm_logits[:, -1].float() / params.temperature
            if guided:
                log_probs = guided_log_probs(z, nado_logits[:, -1], tp_group, params.guidance)
            else:
                log_probs = z
            log_probs = _gather_vocab(log_probs, tp_group)[:, :vocab_size]
            sampled, sampled_lp = sample_filtered(log_probs, params.top_k, params.top_p, gen)
            generating = (end >= prompt_lengths) & (end < lengths) & ~done
            nxt = torch.where(generating, sampled, tokens[:, end])
            nxt = torch.where(done | (end >= lengths), torch.full_like(nxt, pad_id), nxt)
            tokens[:, end] = nxt
            logprobs[:, end] = torch.where(generating, sampled_lp, torch.zeros(n, device=device))
            if params.eos_id is not None:
                hit_eos = generating & (sampled == params.eos_id)
                lengths = torch.where(hit_eos, torch.full_like(lengths, end + 1), lengths)
                done |= hit_eos
            start = end
            if done.all():
                break
    finally:
        model.train(was_training)
        if skip_head:
            model.head_enabled = True
    return Samples(tokens=tokens.cpu(), prompt_lengths=prompt_lengths.cpu(),
                   lengths=lengths.cpu(), logprobs=logprobs.cpu())
