"""nemo-acft: attribute-controlled fine-tuning of GPT models with a NADO regularizer.

Layers, each importing only the ones before it:
``nemo_acft.nado`` (math, torch only) ← ``nemo_acft.models`` (megatron-core GPT + NADO head).
"""

__version__ = "0.1.0"
