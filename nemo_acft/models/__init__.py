"""The model layer: the megatron-core GPT + NADO head (:mod:`.gpt_nado`), its decode loop
(:mod:`.generate`), distributed checkpoints of θ and φ (:mod:`.checkpoint`), and NeMo's
``MegatronGPTACFTModel`` with the interface the algorithms call (:mod:`.acft_model`, built by
:mod:`.build`; importing it imports NeMo). Imports the math layer only."""

from nemo_acft import cpu_compat

cpu_compat.apply()  # no-op when CUDA is available

from nemo_acft.models.generate import Samples, SamplingParams, filter_logits  # noqa: E402
from nemo_acft.models.gpt_nado import GPTNADOModel, NADOHead, NADOHeadConfig, TokenLosses  # noqa: E402
from nemo_acft.models.parallel import destroy_distributed, init_distributed, tp_group  # noqa: E402

__all__ = [
    "GPTNADOModel", "NADOHead", "NADOHeadConfig", "TokenLosses", "Samples", "SamplingParams",
    "filter_logits", "init_distributed", "destroy_distributed", "tp_group",
]
