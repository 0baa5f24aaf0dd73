"""Sampling from the model and labelling with the oracle, for a whole world: the data of the
oracle block, of the RL baseline and of the evaluation.

Every function here is collective (every rank of the world calls it with the same arguments).
Prompts go in batches; batch b is sampled with seed ``params.seed + b`` by data-parallel rank
``b mod dp``, and the batches are gathered, so the samples do not depend on the layout. The
oracle runs on global rank 0 alone (only there is it built) and the scores are broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from nemo_acft import progress
from nemo_acft.models.generate import Samples, SamplingParams
from nemo_acft.oracles import score_robust, to_labels


@dataclass
class LabelledSamples:
    """Samples with their texts, oracle scores and labels (None: the oracle failed)."""

    samples: Samples
    texts: List[str]
    scores: List[Optional[float]]
    labels: List[Optional[float]]

    def label_tensor(self) -> torch.Tensor:
        """``[n]`` float labels, NaN where unlabelled (masked by :func:`nado_loss`)."""
        return torch.tensor([math.nan if x is None else x for x in self.labels])

    def violation_rate(self) -> float:
        """Share of scored samples with label < 0.5 (NaN when none was scored)."""
        scored = [x for x in self.labels if x is not None]
        return sum(x < 0.5 for x in scored) / len(scored) if scored else math.nan


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _dp() -> Tuple[int, int, object]:
    if not dist.is_initialized():
        return 0, 1, None
    from megatron.core import parallel_state

    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def merge(parts: Sequence[Samples], pad_id: int) -> Samples:
    """Concatenate batches of samples, right-padding the tokens with ``pad_id``."""
    width = max(s.tokens.shape[1] for s in parts)

    def cat(name, value=0):
        ts = [getattr(s, name) for s in parts]
        if ts[0].dim() == 2:
            ts = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in ts]
        return torch.cat(ts)

    return Samples(tokens=cat("tokens", pad_id), prompt_lengths=cat("prompt_lengths"),
                   lengths=cat("lengths"), logprobs=cat("logprobs"))


def generate_batched(model, tokenizer, prompts: Sequence[str], params: SamplingParams, *,
                     batch_size: int, guided: bool = False) -> Samples:
    """One continuation per prompt (text), in batches over the data-parallel ranks, merged into
    one :class:`Samples` on every rank. A prompt that encodes to nothing starts from EOS."""
    dp_rank, dp, group = _dp()
    mine = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        if b % dp != dp_rank:
            continue
        chunk = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts[i:i + batch_size]]
        mine.append((b, model.generate(chunk, replace(params, seed=params.seed + b), guided)))
        progress.tick(f"sampled batch {b} ({len(chunk)} prompts)")
    if dp > 1:
        gathered: List = [None] * dp
        with progress.waiting("the other data-parallel ranks' samples"):
            dist.all_gather_object(gathered, mine, group=group)
        mine = [x for part in gathered for x in part]
    return merge([s for _, s in sorted(mine, key=lambda x: x[0])], tokenizer.pad_id)


def texts(samples: Samples, tokenizer, continuation_only: bool = False) -> List[str]:
    """The decoded text of each sample (prompt + continuation, or the continuation alone)."""
    out = []
    for i in range(samples.tokens.shape[0]):
        start = int(samples.prompt_lengths[i]) if continuation_only else 0
        out.append(tokenizer.decode(samples.tokens[i, start:int(samples.lengths[i])].tolist()))
    return out


def score(oracle, items: Sequence[str], batch_size: int = 256) -> List[Optional[float]]:
    """The oracle's scores of ``items``, computed on global rank 0 (the only rank that needs to
    hold the oracle; others pass None) and broadcast to every rank."""
    out = [score_robust(oracle, list(items), batch_size=batch_size) if _rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        with progress.waiting("rank 0's oracle scores"):
            dist.broadcast_object_list(out, src=0)
    return out[0]


def sample_and_label(model, tokenizer, prompts: Sequence[str], oracle, params: SamplingParams,
                     *, batch_size: int, threshold: Optional[float], guided: bool = False,
                     oracle_batch_size: int = 256) -> LabelledSamples:
    """Sample one continuation per prompt (:func:`generate_batched`) and label the whole texts
    (prompt + continuation) with the oracle."""
    samples = generate_batched(model, tokenizer, prompts, params, batch_size=batch_size,
                               guided=guided)
    whole = texts(samples, tokenizer)
    scores = score(oracle, whole, oracle_batch_size)
    labels = to_labels(scores, threshold)
    samples.labels = labels
    return LabelledSamples(samples, whole, scores, labels)


def generated_mask(samples: Samples) -> torch.Tensor:
    """``[n, T-1]``: 1 where target ``tokens[:, j+1]`` is a generated token (the positions from
    the last prompt token to the token before the last generated one)."""
    j = torch.arange(samples.tokens.shape[1] - 1).unsqueeze(0) + 1  # index of the target
    return ((j >= samples.prompt_lengths.unsqueeze(1))
            & (j < samples.lengths.unsqueeze(1))).float()


def nado_batch(samples: Samples, labels: torch.Tensor, index: Optional[torch.Tensor] = None):
    """The NADO loss's batch of (rows ``index`` of) labelled samples: ``inputs``, ``targets``,
    ``loss_mask`` (the generated positions) and the sequence ``labels``."""
    idx = slice(None) if index is None else index
    tokens = samples.tokens[idx]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].contiguous(),
            "loss_mask": generated_mask(samples)[idx], "labels": labels[idx].float()}


__all__ = ["LabelledSamples", "generate_batched", "generated_mask", "merge", "nado_batch",
           "sample_and_label", "score", "texts"]
