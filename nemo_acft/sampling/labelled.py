"""Sampling plus oracle labelling: the data of the oracle block and of the evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from nemo_acft.oracles import score_robust, to_labels
from nemo_acft.sampling.generate import Samples, SamplingParams, generate


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


def generate_batched(model, tokenizer, prompts: Sequence[str], params: SamplingParams, *,
                     vocab_size: int, batch_size: int, guided: bool = False,
                     empty_prompt_id: Optional[int] = None) -> Samples:
    """One continuation per prompt, in batches (batch b drawn with seed ``params.seed + b``),
    merged into one :class:`Samples` padded with the tokenizer's pad id. A prompt that encodes
    to nothing becomes ``[empty_prompt_id]`` (default: the tokenizer's unk id)."""
    empty = tokenizer.unk_id if empty_prompt_id is None else empty_prompt_id
    parts = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        chunk = [tokenizer.encode(p) or [empty] for p in prompts[i:i + batch_size]]
        p = SamplingParams(**{**params.__dict__, "seed": params.seed + b})
        parts.append(generate(model, chunk, p, vocab_size=vocab_size, guided=guided,
                              pad_id=tokenizer.pad_id))
    width = max(s.tokens.shape[1] for s in parts)

    def cat(name, value=0):
        ts = [getattr(s, name) for s in parts]
        if ts[0].dim() == 2:
            ts = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in ts]
        return torch.cat(ts)

    return Samples(tokens=cat("tokens", tokenizer.pad_id), prompt_lengths=cat("prompt_lengths"),
                   lengths=cat("lengths"), logprobs=cat("logprobs"))


def sample_and_label(model, tokenizer, prompts: Sequence[str], oracle, params: SamplingParams,
                     *, vocab_size: int, batch_size: int, threshold: Optional[float],
                     guided: bool = False, oracle_batch_size: int = 256) -> LabelledSamples:
    """Sample one continuation per prompt (:func:`generate_batched`) and label the whole texts
    (prompt + continuation) with the oracle."""
    samples = generate_batched(model, tokenizer, prompts, params, vocab_size=vocab_size,
                               batch_size=batch_size, guided=guided)
    texts = [tokenizer.decode(samples.tokens[i, :samples.lengths[i]].tolist())
             for i in range(samples.tokens.shape[0])]
    scores = score_robust(oracle, texts, batch_size=oracle_batch_size)
    labels = to_labels(scores, threshold)
    samples.labels = labels
    return LabelledSamples(samples, texts, scores, labels)
