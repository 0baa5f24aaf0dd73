"""Sampling on the model and oracle labelling, collective over a world (the decode loop itself
is the model's: :meth:`MegatronGPTACFTModel.generate`)."""

from nemo_acft.models.generate import Samples, SamplingParams, filter_logits
from nemo_acft.sampling.labelled import (LabelledSamples, generate_batched, generated_mask, merge,
                                         nado_batch, sample_and_label, score, texts)

__all__ = ["LabelledSamples", "Samples", "SamplingParams", "filter_logits", "generate_batched",
           "generated_mask", "merge", "nado_batch", "sample_and_label", "score", "texts"]
