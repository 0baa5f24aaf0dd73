"""Sampling from the megatron-core model: batched, KV-cached, seeded, TP-aware, optionally
NADO-guided (q ∝ p·R); and sampling plus oracle labelling (:func:`sample_and_label`)."""

from nemo_acft.sampling.generate import Samples, SamplingParams, filter_logits, generate
from nemo_acft.sampling.labelled import LabelledSamples, generate_batched, sample_and_label

__all__ = ["LabelledSamples", "Samples", "SamplingParams", "filter_logits", "generate",
           "generate_batched", "sample_and_label"]
