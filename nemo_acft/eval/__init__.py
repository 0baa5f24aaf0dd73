"""Evaluation: violation rate and perplexity (the built-in run), the toxicity protocol (EMT,
toxicity probability, toxic share), the zero-shot probe, and ``acft-eval``."""

from nemo_acft.eval.metrics import diversity, perplexity, violation_rate
from nemo_acft.eval.toxicity import (probe_accuracy, sample_continuations, toxicity_eval,
                                     toxicity_metrics)

__all__ = ["diversity", "perplexity", "probe_accuracy", "sample_continuations", "toxicity_eval",
           "toxicity_metrics", "violation_rate"]
