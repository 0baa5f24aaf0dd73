"""Evaluation: violation rate of sampled continuations and perplexity on held-out text."""

from nemo_acft.eval.metrics import perplexity, violation_rate

__all__ = ["perplexity", "violation_rate"]
