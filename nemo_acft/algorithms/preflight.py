"""Everything checked before a run writes its first byte, and the first writes.

:func:`preflight` reads and writes nothing into the run directory: the oracle
(:func:`nemo_acft.oracles.check_oracle`: files, labels, a classifier that is one, without
building a model or a tokenizer), the ``.nemo`` (:func:`nemo_acft.models.nemo_file.check_nemo`),
the data files (readable, UTF-8, at least one record; errors name file and line), the prompts
file, the per-domain λ against the data's domains, an earlier run's config in the directory,
and the model config resolved against both groups' layouts (staged outside the run directory).
:func:`write_start` then writes ``run_dir/model/``, ``run_dir/config.yaml`` and a line of
``run_dir/logs/commands.log``, after removing the temporaries of dead processes.

:func:`check_role_order` is the check of a role after ``prepare``: the run was prepared with
the same config, and what the role reads exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from nemo_acft.errors import Refused

log = logging.getLogger("nemo_acft")


@dataclass
class Plan:
    """What :func:`preflight` found: whether an earlier config (with nothing computed) is
    replaced, and the staged model config when ``run_dir/model/`` is to be written."""

    replace: bool
    staged: Optional[Any] = None  # nemo_acft.algorithms.setup.StagedModelConfig


def check_inputs(cfg: Dict[str, Any]) -> List[str]:
    """The oracle, the ``.nemo``, the data and prompts files and the per-domain λ; returns the
    data's domain names. Reads only."""
    from nemo_acft.config import domain_lambdas
    from nemo_acft.data import read_prompts
    from nemo_acft.data.run_data import records
    from nemo_acft.models.nemo_file import check_nemo
    from nemo_acft.oracles import check_oracle

    check_oracle(cfg["oracle"])
    if cfg["model"]["restore_from_path"]:
        check_nemo(cfg["model"]["restore_from_path"], "model.restore_from_path")
    *_, domains = records(cfg["data"], cfg["seed"])
    if cfg["data"]["prompts_file"]:
        read_prompts(cfg["data"]["prompts_file"], cfg["data"]["skip_malformed"])
    domain_lambdas(cfg, domains)
    return domains


def preflight(cfg: Dict[str, Any]) -> Plan:
    """Every check of a run before its first write (see the module docstring)."""
    from nemo_acft.algorithms.setup import (StagedModelConfig, check_run_config, model_dir,
                                            resolve_model_config)

    check_inputs(cfg)
    replace = check_run_config(cfg)
    if (model_dir(cfg) / "config.yaml").is_file() and not replace:
        resolve_model_config(cfg, write=False)  # checked against both layouts
        return Plan(replace)
    return Plan(replace, StagedModelConfig(cfg))


def write_start(cfg: Dict[str, Any], plan: Plan, argv: List[str]) -> None:
    """The run's first writes, after :func:`preflight` passed."""
    from nemo_acft.algorithms.setup import model_dir, write_run_config
    from nemo_acft.io_utils import remove_dead_temporaries

    run_dir = Path(cfg["run_dir"])
    for p in remove_dead_temporaries(run_dir):
        log.info("removed %s (left by a process that is no longer running)", p)
    if plan.staged is not None:
        plan.staged.write(replace=plan.replace)
    elif plan.replace:
        shutil.rmtree(model_dir(cfg), ignore_errors=True)
    write_run_config(cfg)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "commands.log", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "host": socket.gethostname(), "pid": os.getpid(),
                             "role": cfg["role"], "argv": list(argv)}) + "\n")


def check_role_order(cfg: Dict[str, Any], role: str) -> None:
    """A role after ``prepare`` (``lm``, ``oracle``, ``finish``): the run directory holds a
    run prepared with this config, and what the role reads exists; else
    :class:`~nemo_acft.errors.Refused` (or a ValueError for a different config) naming what is
    missing. The oracle is checked again (its files may have moved since)."""
    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import check_run_config, model_dir
    from nemo_acft.io_utils import remove_dead_temporaries
    from nemo_acft.oracles import check_oracle

    run_dir = Path(cfg["run_dir"])
    first = "run role=prepare first"
    if not (run_dir / "config.yaml").is_file() or not (model_dir(cfg) / "info.json").is_file():
        raise Refused(f"role={role}: {run_dir} holds no prepared run ({run_dir / 'config.yaml'} "
                      f"or {model_dir(cfg) / 'info.json'} is missing); {first}")
    check_run_config(cfg, allow_replace=False)
    check_oracle(cfg["oracle"])
    ex = ArtifactStore(run_dir / "exchange")
    if not ex.exists("lm", 0):
        raise Refused(f"role={role}: θ_0 is not in the exchange yet ({ex.path('lm', 0)}); "
                      f"{first}")
    if role == "finish":
        K = cfg["model"]["acft"]["iterations"]
        stores = {"acft": ex, "baseline": ArtifactStore(run_dir / "baseline"),
                  **{b: ArtifactStore(run_dir / b) for b in cfg["baselines"]
                     if b != "nado_decoding"}}
        for name, store in stores.items():
            if not store.exists("lm", K):
                raise Refused(f"role=finish: {name} has not finished ({store.path('lm', K)} is "
                              f"missing); run role={'lm and oracle' if name == 'acft' else 'prepare'}"
                              " first")
    for p in remove_dead_temporaries(run_dir):
        log.info("removed %s (left by a process that is no longer running)", p)


__all__ = ["Plan", "preflight", "write_start", "check_inputs", "check_role_order"]
