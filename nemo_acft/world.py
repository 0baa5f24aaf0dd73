"""This process's place in its world, read from the launcher's environment (torchrun's or
:mod:`nemo_acft.launch`'s ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else srun's task variables),
before anything heavy is imported: the entry points ask it before taking the run lock. A leaf
module."""

from __future__ import annotations

import os


def world_env() -> dict:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` of this process: torchrun's (or the launcher's)
    variables, else Slurm's task variables, else a world of one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0))}
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_STEP_NUM_TASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return {"rank": 0, "world_size": 1, "local_rank": 0}


__all__ = ["world_env"]
