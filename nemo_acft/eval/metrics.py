"""The numbers of the built-in run: how often the model violates the constraint, what that
costs in perplexity, and whether the samples degenerate (distinct-2, repeat rate). Collective
over the world that holds the model."""

from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence

import torch

from nemo_acft import progress
from nemo_acft.data.lm_dataset import LMDataset
from nemo_acft.models.generate import SamplingParams
from nemo_acft.sampling import sample_and_label, texts


@torch.no_grad()
def perplexity(model, data: LMDataset, batch_size: int = 64,
               guidance: Optional[float] = None) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``data``'s masked tokens (the
    EOS included), from :meth:`MegatronGPTACFTModel.token_log_probs` (p over the tokenizer's
    vocabulary, the distribution the sampler draws from).

    ``guidance`` β: the perplexity of NADO decoding's distribution ``q_β ∝ p·R^β`` instead of
    p's, i.e. of the text as that decoder would model it.
    """
    total, count = 0.0, 0.0
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)))
        lp = model.token_log_probs(data.tokens[rows], guidance=guidance)
        mask = data.loss_mask[rows]
        total -= float((lp.double() * mask).sum())
        count += float(mask.sum())
        progress.tick(f"perplexity rows {i}..{i + len(rows)}")
    return math.exp(total / max(count, 1.0))


def violation_rate(model, tokenizer, prompts: Sequence[str], oracle, params: SamplingParams, *,
                   samples_per_prompt: int = 1, batch_size: int = 128, threshold: float = 0.5,
                   guided: bool = False, oracle_batch_size: int = 256) -> Dict[str, object]:
    """Share of sampled continuations whose whole text the oracle scores below ``threshold``.

    Returns ``{"violation_rate", "num_scored", "num_failed", "texts", "continuations",
    "scores"}``; failed oracle calls are left out of the rate and counted.
    """
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    out = sample_and_label(model, tokenizer, repeated, oracle, params, batch_size=batch_size,
                           threshold=threshold, guided=guided, oracle_batch_size=oracle_batch_size)
    failed = sum(s is None for s in out.scores)
    # labels are score >= threshold, so label < 0.5 is score < threshold
    return {"violation_rate": out.violation_rate(), "num_scored": len(out.scores) - failed,
            "num_failed": failed, "texts": out.texts, "scores": out.scores,
            "continuations": texts(out.samples, tokenizer, continuation_only=True)}


#: a piece of two or more characters repeated four or more times in a row ("lorlorlorlor",
#: "the the the the "): a loop, whether its unit is a word or a sub-word
_LOOP = re.compile(r"(.{2,}?)\1{3,}", re.DOTALL)


def diversity(items: Sequence[str]) -> Dict[str, float]:
    """Degeneration of generated texts (whitespace tokens): ``distinct_2``, the unique bigrams
    over all bigrams pooled across ``items`` (Li et al. 2016), and ``repeat_rate``, the mean over
    texts of ``1 − unique tokens / tokens`` (0 for a text without a repeated token). A sampler
    that loops on a few "safe" tokens has a low distinct-2 and a high repeat rate, whatever its
    toxicity or perplexity; one that "detoxifies" by stopping early has a small ``mean_words``
    (tokens per text, empty texts included). Both word measures miss a loop *inside* a word
    ("lorlorlorlorlor" is one whitespace token): ``loop_share`` is the share of texts with a
    piece of ≥ 2 characters repeated ≥ 4 times in a row, whatever its unit (what it caught on
    the paper table: docs/evaluation.md)."""
    bigrams, seen, rates = 0, set(), []
    for t in items:
        words = t.split()
        pairs = list(zip(words, words[1:]))
        bigrams += len(pairs)
        seen.update(pairs)
        if words:
            rates.append(1.0 - len(set(words)) / len(words))
    lengths = [len(t.split()) for t in items]
    return {"distinct_2": len(seen) / bigrams if bigrams else math.nan,
            "repeat_rate": sum(rates) / len(rates) if rates else math.nan,
            "mean_words": sum(lengths) / len(lengths) if lengths else math.nan,
            "loop_share": (sum(bool(_LOOP.search(t)) for t in items) / len(items)
                           if items else math.nan)}
