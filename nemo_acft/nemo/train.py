"""``acft-nemo-train``: MegatronGPTACFTModel under NeMo's Trainer, configs in ``conf/nemo/``.

    acft-nemo-train                                        # conf/nemo/acft_gpt.yaml (GPU)
    acft-nemo-train --config-name tiny_cpu                 # a tiny CPU run on mock data
    torchrun --nproc-per-node=8 -m nemo_acft.nemo.train model.restore_from_path=gpt.nemo \\
        model.tensor_model_parallel_size=4 model.pipeline_model_parallel_size=2 trainer.devices=8

Starting from ``model.restore_from_path``, the checkpoint's model config is the base and the
command line's ``model.*`` keys override it (NeMo-Aligner's pattern); the trunk is loaded and the
NADO head starts at zero. At the end it writes ``<export_dir>/acft_gpt.nemo`` (plain GPT, for
stock ``MegatronGPTModel``) and ``<export_dir>/acft_with_head.nemo``.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "nemo")
#: keys of the config file that describe the run, not the model: not merged into a checkpoint's
RUN_KEYS = ("restore_from_path",)


def model_config(cfg: DictConfig) -> DictConfig:
    """The model config: the user's, or the checkpoint's with the user's keys on top."""
    path = cfg.model.get("restore_from_path")
    if not path:
        return cfg.model
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.restore_from_path={path}: no such .nemo file")
    base = MegatronGPTModel.restore_from(path, return_config=True)
    OmegaConf.set_struct(base, False)
    resolved = OmegaConf.to_container(cfg.model, resolve=True)  # ${trainer.*} needs the root
    user = OmegaConf.create({k: v for k, v in resolved.items() if k not in RUN_KEYS})
    merged = OmegaConf.merge(base, user)
    with open_dict(merged):
        merged.restore_from_path = path
    return merged


@hydra.main(config_path=CONF_DIR, config_name="acft_gpt", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_acft.nemo import MegatronGPTACFTModel
    from nemo_acft.nemo.export import export_plain_gpt, export_with_head
    from nemo_acft.nemo.model import validate_config

    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    mcfg = model_config(cfg)
    validate_config(mcfg, world)  # before any process group

    from lightning.pytorch import Trainer
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    from nemo.utils.exp_manager import exp_manager

    from nemo_acft.models import init_distributed

    if int(os.environ.get("WORLD_SIZE", 1)) != world:
        raise ValueError(f"trainer.devices x trainer.num_nodes = {world}, but this launch has "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE', 1)} (use torchrun or srun)")
    init_distributed(tp=mcfg.get("tensor_model_parallel_size", 1),
                     pp=mcfg.get("pipeline_model_parallel_size", 1), seed=mcfg.get("seed", 1234))
    trainer = Trainer(strategy=NLPDDPStrategy(), **OmegaConf.to_container(cfg.trainer))
    exp_manager(trainer, cfg.exp_manager)
    if mcfg.get("restore_from_path"):
        model = MegatronGPTACFTModel.restore_from(mcfg.restore_from_path, trainer=trainer,
                                                  override_config_path=mcfg, strict=False)
    else:
        model = MegatronGPTACFTModel(mcfg, trainer)
    trainer.fit(model)
    out = Path(cfg.export_dir)
    export_with_head(model, out / "acft_with_head.nemo")
    export_plain_gpt(model, out / "acft_gpt.nemo")


if __name__ == "__main__":
    main()
