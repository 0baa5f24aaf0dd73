"""Sampling from the megatron-core model: batched, KV-cached, seeded, TP-aware, optionally
NADO-guided (q ∝ p·R)."""

from nemo_acft.sampling.generate import Samples, SamplingParams, filter_logits, generate

__all__ = ["Samples", "SamplingParams", "filter_logits", "generate"]
