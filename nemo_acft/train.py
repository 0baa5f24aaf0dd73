"""``acft-train``: the one training entry point (Hydra configs in ``conf/``, default
``tiny_cpu``).

    acft-train                                   # the built-in default, sequential schedule
    acft-train schedule=parallel model.tensor_model_parallel_size=2 trainer.devices=2 \\
        model.acft.oracle_group.tensor_model_parallel_size=1 run_dir=runs/par
    acft-train model.restore_from_path=gpt.nemo data.source=files data.train_file=... \\
        data.heldout_file=... run_dir=runs/mine
    acft-train --config-name llama7b_tp4pp2 ...  # another config of conf/ (or --config-dir)
    acft-train --cfg ...                         # print the composed config, run nothing
    acft-train role=prepare run_dir=...          # one phase (a Slurm step, a torchrun launch)

``role=all`` runs the phases, each in a world of its own layout started here
(:mod:`nemo_acft.launch`): ``prepare`` (the LM group: θ_0, the plain fine-tune, the LM-side
baselines), ACFT (sequential: one world in the LM group's layout; parallel: the LM group and
the oracle group at once), ``finish`` (the oracle group's layout: NADO decoding's head, the
evaluation, ``summary.json``, ``iterations.png``, the ``.nemo`` files). ``role=prepare|lm|
oracle|finish`` runs one phase: as one rank of a world that torchrun or srun started (its size
must be the phase's), or in a world started here.

In this order, so that nothing is lost and nothing runs that should not: the config is composed
with Hydra's compose API (Hydra writes nothing) and checked against the schema; the run
directory's lock is taken (:mod:`nemo_acft.runlock`: a second driver, a second copy of a role
or a role out of order is refused at once); every check runs (:mod:`nemo_acft.algorithms.
preflight`: config, data files, the ``.nemo``, the oracle, the model against both layouts, an
earlier run in the directory); only then is anything written. A run refused by its checks
leaves the run directory as it was. Rerunning the same command resumes. Errors are one line
(:mod:`nemo_acft.errors`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, List, Optional

from nemo_acft.errors import EXIT_STOPPED, InputError, Refused, entry_point

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
DEFAULT_CONFIG = "tiny_cpu"


# --- the config -------------------------------------------------------------------------------


def compose(overrides: List[str], config_name: str = DEFAULT_CONFIG,
            config_dir: str = CONF_DIR) -> Dict:
    """The resolved, checked config of ``acft-train <overrides>`` (a plain dict): Hydra's compose
    API over ``config_dir`` (its override grammar and defaults lists; no output folder), then
    :func:`nemo_acft.config.validate`. Any problem is an :class:`~nemo_acft.errors.InputError`
    naming the override or key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from nemo_acft.config import validate

    if not Path(config_dir, f"{config_name}.yaml").is_file():
        raise InputError(f"--config-name {config_name}: no {config_name}.yaml in {config_dir}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        first = " ".join(str(e).split("\n")[0].split())
        raise InputError(f"config: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    plain.pop("hydra", None)
    validate(plain)
    return plain


def _parse(argv: Optional[List[str]]):
    ap = argparse.ArgumentParser(
        prog="acft-train", description="Attribute-controlled fine-tuning (see conf/acft.yaml "
        "for every key; override with key=value, +key=value to add).")
    ap.add_argument("--config-name", "-cn", default=DEFAULT_CONFIG,
                    help=f"a config of the config folder (default {DEFAULT_CONFIG})")
    ap.add_argument("--config-dir", "-cd", default=CONF_DIR, help="the config folder")
    ap.add_argument("--cfg", action="store_true",
                    help="print the composed config and exit (nothing runs, nothing is written)")
    ap.add_argument("overrides", nargs="*", help="key=value Hydra overrides")
    return ap.parse_args(argv)


# --- start: checks, then the first write --------------------------------------------------


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


def start(cfg, argv: Optional[List[str]] = None) -> None:
    """Every check (:func:`~nemo_acft.algorithms.preflight.preflight`: reads only), then the
    run's first writes: ``run_dir/model/`` (the resolved model config and tokenizer),
    ``run_dir/config.yaml`` and a line in ``run_dir/logs/commands.log``. Temporaries of dead
    processes are removed."""
    from nemo_acft.algorithms.preflight import preflight, write_start

    plan = preflight(cfg)
    write_start(cfg, plan, argv if argv is not None else sys.argv)


@contextmanager
def run_lock(cfg, role: str, held=None):
    """The run directory's lock of ``role`` (:mod:`nemo_acft.runlock`), held for the block (or
    the lock ``held`` already). A failure before the first write (``lock.committed`` still
    False: the checks) gives the lock up and removes what taking it created, so the run
    directory is as it was."""
    from nemo_acft.runlock import lock_run

    if held is not None:
        yield held
        return
    lock = lock_run(cfg["run_dir"], role)
    try:
        yield lock
    except BaseException:
        lock.release(undo=not lock.committed)
        raise
    lock.release()


def drive(cfg, argv=None, lock=None) -> None:
    """``role=all``: every phase, each in its own world, under the run's ``all`` lock (taken
    here unless ``lock`` is the one the command took)."""
    from nemo_acft import config as schema
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.launch import run_worlds, warm_up

    with run_lock(cfg, "all", lock) as lock:
        warm_up()  # the fork server imports NeMo while the checks run
        start(cfg, argv)
        lock.committed = True
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


def run_role(cfg, argv=None, lock=None) -> None:
    """One phase: as a rank of the world torchrun/srun started (global rank 0 holds the role's
    lock), or in a world started here (this process holds it; ``lock``: the one the command
    took)."""
    from nemo_acft import config as schema
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.algorithms.preflight import check_role_order
    from nemo_acft.launch import run_worlds, warm_up
    from nemo_acft.world import world_env

    role = cfg["role"]
    layout = schema.oracle_layout(cfg) if role in ("oracle", "finish") else schema.lm_layout(cfg)
    w = world_env()
    launched = w["world_size"] > 1 or "RANK" in os.environ
    if launched and w["world_size"] != layout.world_size:
        raise InputError(f"role={role}: this world has {w['world_size']} processes, the "
                         f"{'oracle' if role in ('oracle', 'finish') else 'LM'} group's "
                         f"layout {layout} needs {layout.world_size}")
    if launched and w["rank"] != 0:  # covered by rank 0's lock and checks
        if role == "prepare":  # prepare's rank 0 writes run_dir/model/, the others wait for it
            _wait_for_model_config(cfg)
        from nemo_acft.algorithms.coordination import install_stop_handlers

        install_stop_handlers()
        PHASES[role](cfg)
        return
    with run_lock(cfg, role, lock) as lock:
        if not launched:
            warm_up()
        if role == "prepare":
            start(cfg, argv)
        else:
            check_role_order(cfg, role)
        lock.committed = True
        t = time.perf_counter()
        if launched:
            from nemo_acft.algorithms.coordination import install_stop_handlers

            install_stop_handlers()
            PHASES[role](cfg)
        else:
            run_worlds({role: (layout.world_size, PHASES[role], (cfg,))},
                       threads=cfg["threads"], logs=str(Path(cfg["run_dir"]) / "logs"))
        _phase_record(cfg, role, time.perf_counter() - t)


def _wait_for_model_config(cfg, timeout_s: float = 600.0) -> None:
    """prepare's other ranks need ``run_dir/model/`` that its rank 0 writes: wait for it."""
    from nemo_acft.algorithms.setup import model_dir

    path = model_dir(cfg) / "info.json"
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise Refused(f"{path} did not appear within {timeout_s:.0f} s: rank 0 of "
                          "role=prepare writes it (see its log)")
        time.sleep(0.5)


# --- the command ------------------------------------------------------------------------------


@entry_point
def main(argv: Optional[List[str]] = None) -> None:
    """``acft-train [--config-name NAME] [--cfg] key=value ...``"""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    cfg = compose(args.overrides, args.config_name, args.config_dir)
    if args.cfg:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return
    from nemo_acft.world import world_env

    w = world_env()
    if cfg["role"] == "all" and w["world_size"] > 1:
        raise InputError("role=all starts its own worlds: under torchrun or srun run the "
                         "roles (prepare, lm, oracle, finish) instead")
    command = ["acft-train", *argv]
    # the lock first, before the heavy imports: a second process is refused in a second or two
    with run_lock(cfg, cfg["role"]) if w["rank"] == 0 else nullcontext() as lock:
        from nemo_acft.algorithms.coordination import StopRequested
        from nemo_acft.algorithms.setup import quiet_libraries

        quiet_libraries()
        try:
            if cfg["role"] == "all":
                drive(cfg, command, lock)
                run_dir = Path(cfg["run_dir"])
                print(f"done: {run_dir / 'summary.json'}, "
                      f"{run_dir / 'export' / 'acft_gpt.nemo'}")
            else:
                run_role(cfg, command, lock)
        except StopRequested as e:  # a rank of a world started by torchrun/srun
            print(f"stopped: {e}; rerun the same command to resume", file=sys.stderr)
            raise SystemExit(EXIT_STOPPED) from None
        except SystemExit as e:
            if e.code == EXIT_STOPPED:
                print("stopped on a signal; rerun the same command to resume", file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
