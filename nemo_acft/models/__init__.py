"""Model code on megatron-core: the GPT trunk and the NADO head on the last pipeline stage."""

from nemo_acft import cpu_compat

cpu_compat.apply()  # no-op when CUDA is available

from nemo_acft.models.config import GPTConfig, NADOHeadConfig  # noqa: E402
from nemo_acft.models.gpt_nado import (  # noqa: E402
    GPTNADOModel,
    NADOHead,
    TokenLosses,
    build_gpt_nado,
    layer_spec,
)
from nemo_acft.models.parallel import destroy_distributed, init_distributed, tp_group  # noqa: E402

__all__ = [
    "GPTConfig", "NADOHeadConfig", "GPTNADOModel", "NADOHead", "TokenLosses", "build_gpt_nado",
    "layer_spec", "init_distributed", "destroy_distributed", "tp_group",
]
