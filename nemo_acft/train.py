"""``acft-train``: the Hydra entry point (configs in ``conf/``, default ``tiny_cpu``).

    acft-train                                   # the built-in default, sequential schedule
    acft-train schedule=parallel run_dir=runs/par
    acft-train --config-name tiny_cpu acft.lambda=1.0 'acft.domain_lambdas={}'
    acft-train role=prepare run_dir=...          # pre-train and baseline (a Slurm step)
    acft-train role=lm run_dir=...               # one side of the parallel schedule
    acft-train role=finish run_dir=...           # evaluation, summary, plot, .nemo
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="tiny_cpu", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_acft.training.driver import run_all, run_role
    from nemo_acft.training.run import StopRequested, run_side

    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain["role"] in ("all", "prepare", "finish"):
        try:
            run_all(plain) if plain["role"] == "all" else run_role(plain)
        except StopRequested as e:  # SIGTERM/SIGUSR1: checkpoint written, rerun resumes
            print(f"stopped: {e}; rerun the same command to resume", file=sys.stderr)
            raise SystemExit(143) from None
    else:
        from nemo_acft.training.driver import write_config
        from nemo_acft.training.setup import validate

        validate(plain)
        Path(plain["run_dir"]).mkdir(parents=True, exist_ok=True)
        write_config({**plain, "role": "all"}, Path(plain["run_dir"]))
        run_side(plain, plain["role"])


if __name__ == "__main__":
    main()
