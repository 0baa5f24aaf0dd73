"""The two schedules of METHOD.md over the blocks.

Sequential (:func:`run_sequential`, one world): oracle block k, then LM block k with φ_k.

Parallel (:func:`run_side`, two worlds: the LM group and the oracle group, each its own
torch.distributed world with its own tensor/pipeline layout): iteration 1 runs as in the
sequential schedule; from k = 2 the oracle block k (samples from θ_(k−1), trains φ_k) and the
LM block k (trains θ_k with φ_(k−1)) run at the same time. θ_k and φ_k cross through the
exchange directory as distributed checkpoints, resharded to the reader's layout. Each block
loads exactly the artifacts its manifest names, so a world that is killed and restarted
continues from the last artifact or checkpoint and repeats the same computation bit for bit.
"""

from __future__ import annotations

import logging
import os
import time

from nemo_acft.algorithms.blocks import (lm_block, log_block, oracle_block, publish_initial_head,
                                         publish_reference_q, regularizer, sample_source,
                                         ships_reference_q)
from nemo_acft.algorithms.coordination import (Heartbeat, Liveness, StopRequested, handshake,
                                               side_lock, wait_for, world_pids)

log = logging.getLogger("nemo_acft")


def nado_for(schedule: str, k: int) -> int:
    """Which φ LM block k uses: φ_k in the sequential schedule and in the parallel schedule's
    first iteration, φ_(k−1) afterwards."""
    return k if schedule == "sequential" or k == 1 else k - 1


def run_sequential(run) -> None:
    """Oracle block k then LM block k with φ_k, for k = 1..K, in this world."""
    ex = run.exchange
    publish_initial_head(run, ex)
    reg = regularizer(run, run.data.domains)
    todo = [k for k in range(1, run.K + 1) if not ex.exists("lm", k)]
    t0 = time.perf_counter()
    for done, k in enumerate(todo, 1):
        if not ex.exists("nado", k):
            m = oracle_block(run, k, ex, (ex, sample_source(run, k)), run.data.train_prompts)
            log_block(run, "oracle block", k, m, t0, done - 1, len(todo))
        if ships_reference_q(run):
            publish_reference_q(run, k, ex, k, run.data.train)
        m = lm_block(run, "acft", k, ex, run.data.train, reg=reg, nado=(ex, k))
        log_block(run, "acft LM block", k, m, t0, done, len(todo))


def _lm_side(run) -> None:
    ex, x = run.exchange, run.acft["exchange"]
    reg = regularizer(run, run.data.domains)
    todo = [k for k in range(1, run.K + 1) if not ex.exists("lm", k)]
    t0 = time.perf_counter()
    alive = Liveness(ex, "oracle", x["heartbeat_timeout_s"])
    ship = ships_reference_q(run)
    for done, k in enumerate(todo, 1):
        j = nado_for("parallel", k)
        if not ship:  # with q shipped, each step waits for its q (built from φ_j) instead
            wait_for(ex, "nado", j, x["timeout_s"], "the oracle side", alive)
        m = lm_block(run, "acft", k, ex, run.data.train, reg=reg, nado=(ex, j), alive=alive)
        log_block(run, "acft LM block", k, m, t0, done, len(todo))


def _oracle_side(run) -> None:
    """Oracle block k after θ of :func:`sample_source`; with ``reference_on: oracle`` the q of
    LM block k first (its reference, θ_(k−1) or θ_0 and φ_(k−1), is what oracle block k starts
    from), and in iteration 1, after φ_1."""
    ex, x = run.exchange, run.acft["exchange"]
    publish_initial_head(run, ex)
    ship = ships_reference_q(run)
    todo = [k for k in range(1, run.K + 1)
            if not ex.exists("nado", k) or (ship and not ex.exists("lm", k))]
    t0 = time.perf_counter()
    alive = Liveness(ex, "lm", x["heartbeat_timeout_s"])
    for done, k in enumerate(todo, 1):
        j, q_from = sample_source(run, k), nado_for("parallel", k)
        wait_for(ex, "lm", j, x["timeout_s"], "the LM side", alive)
        loaded = None  # the reference q was built from: θ_j and φ_(k−1), oracle block k's start
        if ship and q_from < k:
            loaded = publish_reference_q(run, k, ex, q_from, run.data.train)
        if not ex.exists("nado", k):
            m = oracle_block(run, k, ex, (ex, j), run.data.train_prompts, loaded)
            log_block(run, "oracle block", k, m, t0, done, len(todo))
        if ship and q_from == k:
            publish_reference_q(run, k, ex, q_from, run.data.train)


def run_side(run, side: str) -> None:
    """One side of the parallel schedule in this world (``side`` = lm | oracle): a heartbeat in
    ``exchange/status``, a handshake with the other side, then the side's blocks. SIGTERM or
    SIGUSR1 stops it at the next step (an LM block checkpoints first): status ``stopped`` and
    StopRequested (exit code 143), and a rerun resumes. Any failure: status ``failed`` with
    the error, which the other side reads and fails on."""
    ex, x = run.exchange, run.acft["exchange"]
    other = "oracle" if side == "lm" else "lm"
    pids = world_pids()
    with side_lock(ex, side):
        beat = Heartbeat(ex, side, every_s=x["heartbeat_s"], pids=pids,
                         layout=run.model.layout(), slurm_job=os.environ.get("SLURM_JOB_ID"),
                         slurm_node=os.environ.get("SLURMD_NODENAME"))
        if run.watchdog is not None:  # a stuck or stopped rank ends the side as failed
            run.watchdog.heartbeat = beat
        try:
            handshake(ex, side, other, x["handshake_timeout_s"])
            _lm_side(run) if side == "lm" else _oracle_side(run)
        except StopRequested as e:
            beat.finish("stopped", error=str(e))
            log.warning("[%s] stopped: %s", side, e)
            raise
        except BaseException as e:
            beat.finish("failed", error=f"{type(e).__name__}: {e}")
            log.error("[%s] failed: %s: %s", side, type(e).__name__, e)
            raise
        beat.finish("done")


__all__ = ["nado_for", "run_sequential", "run_side"]
