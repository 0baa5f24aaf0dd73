"""``acft-train``: the one training entry point (Hydra; configs in ``conf/``, default
``tiny_cpu``).

    acft-train                                   # the built-in default, sequential schedule
    acft-train schedule=parallel model.tensor_model_parallel_size=2 trainer.devices=2 \\
        model.acft.oracle_group.tensor_model_parallel_size=1 run_dir=runs/par
    acft-train model.restore_from_path=gpt.nemo data.source=files data.train_file=... \\
        data.heldout_file=... run_dir=runs/mine
    acft-train role=prepare run_dir=...          # one phase (a Slurm step, a torchrun launch)

``role=all`` runs the phases, each in a world of its own layout started here
(:mod:`nemo_acft.launch`): ``prepare`` (the LM group: θ_0, the plain fine-tune, the LM-side
baselines), ACFT (sequential: one world in the LM group's layout; parallel: the LM group and
the oracle group at once), ``finish`` (the oracle group's layout: NADO decoding's head, the
evaluation, ``summary.json``, ``iterations.png``, the ``.nemo`` files). ``role=prepare|lm|
oracle|finish`` runs one phase: as one rank of a world that torchrun or srun started (its size
must be the phase's), or in a world started here. Every config check runs before anything is
written; rerunning the same command resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _layout(cfg, phase):
    from nemo_acft import config as schema

    return schema.oracle_layout(cfg) if phase in ("oracle", "finish") else schema.lm_layout(cfg)


def _phase_record(cfg, name: str, seconds: float) -> None:
    """``run_dir/phases.json``: each phase's wall time ``<name>_s`` and when it started
    ``<name>_started`` (epoch seconds, the clock of the exchange manifests' ``created``); phases
    may run in different processes: the roles of a Slurm job."""
    from nemo_acft.io_utils import atomic_write

    path = Path(cfg["run_dir"]) / "phases.json"
    phases = json.loads(path.read_text()) if path.is_file() else {}
    phases[f"{name}_s"] = seconds
    phases[f"{name}_started"] = time.time() - seconds
    with atomic_write(path) as fh:
        json.dump(phases, fh, indent=1)


def start(cfg) -> None:
    """Everything that runs before any world exists, in this order so that a run that cannot
    start writes nothing: the oracle is built, the data files are read, an existing run's
    config is compared, the model config is resolved and checked against both groups' layouts
    (``run_dir/model/``), and only then is ``run_dir/config.yaml`` written."""
    from nemo_acft.algorithms.setup import (check_run_config, resolve_model_config,
                                            write_run_config)
    from nemo_acft.config import domain_lambdas
    from nemo_acft.data.run_data import records
    from nemo_acft.oracles import build_oracle

    build_oracle(cfg["oracle"])
    *_, domains = records(cfg["data"], cfg["seed"])
    domain_lambdas(cfg, domains)  # λ of a domain the data does not have
    check_run_config(cfg)
    resolve_model_config(cfg)
    write_run_config(cfg)


def drive(cfg) -> None:
    """``role=all``: every phase, each in its own world."""
    from nemo_acft import config as schema
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.launch import run_worlds

    start(cfg)
    (Path(cfg["run_dir"]) / "phases.json").unlink(missing_ok=True)
    logs = str(Path(cfg["run_dir"]) / "logs")
    lm, oracle = schema.lm_layout(cfg), schema.oracle_layout(cfg)
    steps = [("prepare", {"prepare": (lm.world_size, PHASES["prepare"], (cfg,))})]
    if cfg["schedule"] == "sequential":
        steps.append(("acft", {"acft": (lm.world_size, PHASES["sequential"], (cfg,))}))
    else:
        steps.append(("acft", {"lm": (lm.world_size, PHASES["lm"], (cfg,)),
                               "oracle": (oracle.world_size, PHASES["oracle"], (cfg,))}))
    steps.append(("finish", {"finish": (oracle.world_size, PHASES["finish"], (cfg,))}))
    for name, worlds in steps:
        t = time.perf_counter()
        run_worlds(worlds, threads=cfg["threads"], logs=logs)
        _phase_record(cfg, name, time.perf_counter() - t)


def run_role(cfg) -> None:
    """One phase: as a rank of the world torchrun/srun started, or in a world started here."""
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.launch import run_worlds
    from nemo_acft.models.parallel import world_env

    role = cfg["role"]
    layout = _layout(cfg, role)
    w = world_env()
    launched = w["world_size"] > 1 or "RANK" in os.environ
    if launched:
        if w["world_size"] != layout.world_size:
            raise ValueError(f"role={role}: this world has {w['world_size']} processes, the "
                             f"{'oracle' if role in ('oracle', 'finish') else 'LM'} group's "
                             f"layout {layout} needs {layout.world_size}")
        if w["rank"] == 0 and role == "prepare":
            start(cfg)
        else:  # prepare's rank 0 writes run_dir/model/, every other rank waits for it
            _wait_for_model_config(cfg)
        from nemo_acft.algorithms.coordination import install_stop_handlers

        install_stop_handlers()
        t = time.perf_counter()
        PHASES[role](cfg)
        if w["rank"] == 0:
            _phase_record(cfg, role, time.perf_counter() - t)
        return
    if role == "prepare":
        start(cfg)
    else:
        _wait_for_model_config(cfg)
    t = time.perf_counter()
    run_worlds({role: (layout.world_size, PHASES[role], (cfg,))}, threads=cfg["threads"],
               logs=str(Path(cfg["run_dir"]) / "logs"))
    _phase_record(cfg, role, time.perf_counter() - t)


def _wait_for_model_config(cfg, timeout_s: float = 600.0) -> None:
    """Roles after ``prepare`` (and prepare's other ranks) need ``run_dir/model/`` that prepare
    writes; wait for it, then check it against both layouts."""
    from nemo_acft.algorithms.setup import model_dir, resolve_model_config

    path = model_dir(cfg) / "info.json"
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout_s:.0f} s: run "
                               "role=prepare first (it resolves the model config)")
        time.sleep(0.5)
    resolve_model_config(cfg)


@hydra.main(config_path=CONF_DIR, config_name="tiny_cpu", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from nemo_acft.algorithms.coordination import StopRequested
    from nemo_acft.config import validate
    from nemo_acft.launch import STOPPED

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    validate(plain)
    from nemo_acft.algorithms.setup import quiet_libraries

    quiet_libraries()
    try:
        if plain["role"] == "all":
            from nemo_acft.models.parallel import world_env

            if world_env()["world_size"] > 1:
                raise ValueError("role=all starts its own worlds: under torchrun or srun run "
                                 "the roles (prepare, lm, oracle, finish) instead")
            drive(plain)
            summary = Path(plain["run_dir"]) / "summary.json"
            print(f"done: {summary}, {Path(plain['run_dir']) / 'export' / 'acft_gpt.nemo'}")
        else:
            run_role(plain)
    except StopRequested as e:  # a rank of a world started by torchrun/srun
        print(f"stopped: {e}; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(STOPPED) from None
    except SystemExit as e:
        if e.code == STOPPED:
            print("stopped on a signal; rerun the same command to resume", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
