"""The schedules of a run, and its two sides.

A run directory holds::

    config.yaml                    the resolved config (a rerun must match it)
    exchange/lm/iter_k/            θ_k: trunk weights, optimizer state, manifest
    exchange/nado/iter_k/          φ_k: head weights, the labelled samples, manifest
    exchange/status/<side>.json    running | done | failed, per side
    checkpoints/<mode>/lm/iter_t/  rolling checkpoints inside LM blocks (t = global step)
    baseline/lm/iter_k/            the baseline fine-tune's θ_k
    eval/, tb/, logs/, summary.json, iterations.png

Sequential: oracle block k, then LM block k with φ_k, in one process. Parallel: the LM side and
the oracle side run as two processes (on a cluster, two groups of GPUs); iteration 1 runs as in
the sequential schedule, and from k = 2 the oracle block k (samples from θ_(k−1), trains φ_k)
and the LM block k (trains θ_k with φ_(k−1)) run at the same time. Each block loads exactly
the artifacts its manifest names, so a side that is killed and restarted continues from the
last artifact or checkpoint and repeats the same computation bit for bit.

Run one side directly (e.g. one Slurm het-job component)::

    python -m nemo_acft.training.run --config RUN_DIR/config.yaml --role lm|oracle
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from nemo_acft.io_utils import atomic_write
from nemo_acft.training.baselines import LM_MODES, RLConfig, Reinforce, filter_by_oracle
from nemo_acft.training.blocks import OptimConfig, freeze_head, lm_block, train_nado
from nemo_acft.training.exchange import ArtifactStore
from nemo_acft.training.setup import (RunData, build_data, build_model, ensure_pretrained,
                                      gpt_config, init_process, log_to_file, regularizer_config,
                                      sampling_kwargs, validate)

log = logging.getLogger("nemo_acft")


class Side:
    """State shared by the blocks of one process: config, data, model config, stores."""

    def __init__(self, cfg: Dict[str, Any], name: str, data: Optional[RunData] = None):
        self.cfg = cfg
        self.name = name
        self.run_dir = Path(cfg["run_dir"])
        self.data = data or build_data(cfg)
        self.gcfg = gpt_config(cfg, len(self.data.tokenizer))
        self.exchange = ArtifactStore(self.run_dir / "exchange")
        self.K = cfg["acft"]["iterations"]
        self.S = cfg["finetune"]["steps_per_iteration"]
        self._tb = None

    @property
    def tb(self):
        """TensorBoard writer of this side (``run_dir/tb/<side>``)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb" / self.name))
        return self._tb

    def bar(self, total: int, desc: str, position: int = 0):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, position=position, leave=False, mininterval=1,
                    disable=not self.cfg["progress"], file=sys.stdout)

    def filtered_train(self, oracle, store: ArtifactStore):
        """The filtering baseline's training records (computed once; the counts are written to
        ``<store>/filter.json``)."""
        if getattr(self, "_filtered", None) is None:
            if oracle is None:
                raise ValueError("the filtering baseline needs the oracle")
            self._filtered, stats = filter_by_oracle(
                self.data.train, self.data.tokenizer, oracle, self.cfg["filtering"]["threshold"],
                self.cfg["oracle"]["batch_size"])
            log.info("[%s] filtering: kept %d of %d training records (dropped by domain: %s)",
                     self.name, stats["kept"], stats["kept"] + stats["dropped"],
                     stats["dropped_by_domain"])
            store.root.mkdir(parents=True, exist_ok=True)
            with atomic_write(store.root / "filter.json") as fh:
                json.dump(stats, fh, indent=1)
        return self._filtered

    def close(self):
        if self._tb is not None:
            self._tb.close()


# --- status files and locks --------------------------------------------------------------


def _status_path(store: ArtifactStore, side: str) -> Path:
    return store.root / "status" / f"{side}.json"


def write_status(store: ArtifactStore, side: str, state: str, **extra) -> None:
    """``exchange/status/<side>.json``: running | done | failed | stopped (atomically
    replaced)."""
    with atomic_write(_status_path(store, side)) as fh:
        json.dump({"state": state, "host": socket.gethostname(), "pid": os.getpid(),
                   "time": time.time(), **extra}, fh)


def read_status(store: ArtifactStore, side: str) -> Optional[Dict[str, Any]]:
    """The side's status, or None when it has none (yet) or it is being replaced."""
    try:
        return json.loads(_status_path(store, side).read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """Keeps ``status/<side>.json`` at ``running`` with a counter ``beat`` that a live side
    advances every ``every_s`` seconds (a thread), so the other side can tell a live process
    from a dead one's last word (kill -9, a lost node, ``scancel``) without comparing clocks
    across hosts. ``finish(state)`` stops the thread and writes the final state."""

    def __init__(self, store: ArtifactStore, side: str, every_s: float = 2.0, **extra):
        import threading

        self.store, self.side, self.every_s, self.extra = store, side, every_s, extra
        self.beat = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write("running")
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{side}", daemon=True)
        self._thread.start()

    def _write(self, state: str, **extra) -> None:
        self.beat += 1
        write_status(self.store, self.side, state, beat=self.beat, **self.extra, **extra)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write("running")
                except OSError as e:  # a full or lost file system: the other side will notice
                    log.warning("[%s] heartbeat not written: %s", self.side, e)

    def finish(self, state: str, **extra) -> None:
        with self._lock:
            self._stop.set()
            self._write(state, **extra)
        self._thread.join(timeout=5)


class Liveness:
    """Whether the other side is alive, from its status file: dead once it reports failed or
    stopped, or when its heartbeat has not advanced for ``stale_s`` seconds of this host's
    clock. ``reason`` says why."""

    def __init__(self, store: ArtifactStore, other: str, stale_s: float):
        self.store, self.other, self.stale_s = store, other, stale_s
        self._beat, self._seen = None, time.monotonic()
        self.reason = ""

    def __call__(self) -> bool:
        if stop_requested() is not None:
            raise StopRequested(f"signal {stop_requested()} while waiting for the {self.other} "
                                "side")
        st = read_status(self.store, self.other)
        now = time.monotonic()
        if st is None:
            return True  # not started yet, or being replaced: the timeouts cover it
        if st.get("state") in ("failed", "stopped"):
            self.reason = (f"the {self.other} side reported {st['state']!r} on host "
                           f"{st.get('host')}: {st.get('error', 'no error message')}")
            return False
        if st.get("state") == "done":
            return True
        if st.get("beat") != self._beat:
            self._beat, self._seen = st.get("beat"), now
        elif now - self._seen > self.stale_s:
            self.reason = (f"the {self.other} side's heartbeat ({_status_path(self.store, self.other)}, "
                           f"host {st.get('host')}, pid {st.get('pid')}) has not advanced for "
                           f"{now - self._seen:.0f} s: the process is gone (killed, cancelled or "
                           "its node lost)")
            return False
        return True


def other_alive(store: ArtifactStore, other: str, stale_s: float = 60.0) -> Liveness:
    """A predicate for ``wait_for``: False once the other side has failed or gone silent."""
    return Liveness(store, other, stale_s)


def handshake(store: ArtifactStore, side: str, other: str, timeout_s: float,
              poll_s: float = 0.2) -> None:
    """Wait until the other side shows it is alive in the same exchange directory: its status
    is ``done``, or ``running`` with a heartbeat that advances while we watch (an old status
    file of an earlier attempt does not count). A RuntimeError after ``timeout_s`` names the
    directory as this host sees it and what to check."""
    first = read_status(store, other)
    deadline = time.monotonic() + timeout_s
    while True:
        st = read_status(store, other)
        if st is not None and (st.get("state") == "done" or (
                st.get("state") == "running" and (first is None or st.get("beat") != first.get("beat")
                                                  or st.get("pid") != first.get("pid")))):
            log.info("[%s] handshake: the %s side is up on host %s (pid %s)", side, other,
                     st.get("host"), st.get("pid"))
            return
        if time.monotonic() > deadline:
            seen = ("no status file" if st is None else
                    f"a {st.get('state')!r} status that did not advance (host {st.get('host')}, "
                    f"pid {st.get('pid')})")
            raise RuntimeError(
                f"[{side}] the {other} side did not report in {store.root.resolve()} within "
                f"{timeout_s:.0f} s (found {seen}). Check that both groups see this directory on "
                f"a shared file system (this side is on host {socket.gethostname()}), and the "
                f"{other} side's log ({store.root.parent / 'logs' / (other + '.log')}).")
        time.sleep(poll_s)


class StopRequested(BaseException):
    """SIGTERM or SIGUSR1 (Slurm's time-limit warning, scancel): save and exit at the next
    step boundary."""


_STOP = {"signal": None}


def stop_requested() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _STOP["signal"]


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 set a flag that the blocks check at each step (an LM block writes a
    checkpoint first); a second signal stops at once."""
    def handler(signum, frame):
        if _STOP["signal"] is not None:
            raise StopRequested(f"signal {signum} (second)")
        _STOP["signal"] = signum
        log.warning("signal %d: stopping at the next step boundary", signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


@contextmanager
def side_lock(store: ArtifactStore, side: str):
    """One live process per side and run: a second one fails with the holder's pid."""
    import fcntl

    p = store.root / "status" / f"{side}.lock"
    p.parent.mkdir(parents=True, exist_ok=True)
    fh = open(p, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise RuntimeError(f"another {side} process of this run is alive ({fh.read().strip()}); "
                           f"lock file {p}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()} pid {os.getpid()}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# --- the LM side -------------------------------------------------------------------------


def publish_initial_lm(side: Side, store: ArtifactStore, pretrained: Path) -> None:
    """θ_0: the pre-trained trunk, as iteration 0 of ``store``."""
    if store.exists("lm", 0):
        return
    store.clean_temporaries("lm")
    state = torch.load(pretrained / "model.pt", map_location="cpu", weights_only=False)
    store.publish("lm", 0, {"model.pt": state},
                  {"based_on": {"pretrained": str(pretrained)}, "global_step": 0},
                  texts={"tokenizer.json": (pretrained / "tokenizer.json").read_text()})


def lm_iteration(side: Side, store: ArtifactStore, k: int, mode: str, model,
                 nado_iteration: Optional[int] = None, oracle=None) -> Dict[str, float]:
    """LM block k: θ_k from θ_(k−1) (and its optimizer state). ``mode`` (see
    :mod:`.baselines`): ``acft`` with φ_(nado_iteration); ``baseline`` the LM loss alone;
    ``filtering`` the LM loss on the records the oracle keeps; ``rl`` the LM loss plus the
    REINFORCE term (both need ``oracle``). Publishes ``lm/iter_k``."""
    cfg, f = side.cfg, side.cfg["finetune"]
    if mode not in LM_MODES:
        raise ValueError(f"LM mode {mode!r}: expected one of {LM_MODES}")
    optim = OptimConfig(**f["optim"])
    ckpts = ArtifactStore(side.run_dir / "checkpoints" / mode)
    ckpts.clean_temporaries("lm")
    start, end, total = (k - 1) * side.S, k * side.S, side.K * side.S
    trunk_params = freeze_head(model) if mode == "acft" else list(model.parameters())
    optimizer = optim.make(trunk_params)
    source = ("lm", k - 1, store)
    resumable = [t for t in ckpts.iterations("lm") if start < t < end
                 and ckpts.manifest("lm", t).get("nado_iteration") == nado_iteration]
    if resumable:
        source = ("lm", resumable[-1], ckpts)
        start = resumable[-1]
        log.info("[%s] iteration %d: resuming from the checkpoint at step %d", side.name, k, start)
    kind, it, src = source
    _load_trunk(model, src.load(kind, it, "model.pt"), mode)
    if "optimizer.pt" in src.manifest(kind, it)["files"]:
        optimizer.load_state_dict(src.load(kind, it, "optimizer.pt"))
    if mode == "acft":
        model.load_head_state_dict(store.load("nado", nado_iteration, "head.pt"))
    bar = side.bar(end - start, f"[{side.name}] iter {k}/{side.K}", 0)
    regularizer = regularizer_config(cfg) if mode == "acft" else None
    data, extra = side.data.train, None
    if mode == "filtering":
        data = side.filtered_train(oracle, store)
    elif mode == "rl":
        extra = Reinforce(RLConfig(**cfg["rl"]), side.data.tokenizer, side.data.train_prompts,
                          oracle, vocab_size=len(side.data.tokenizer), seed=cfg["seed"],
                          oracle_batch_size=cfg["oracle"]["batch_size"])
    save_every = f["save_every"]

    def on_step(step, m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
        for key, v in m.items():
            side.tb.add_scalar(f"{mode}/{key}", v, step + 1)
        done = step + 1
        stop = stop_requested() is not None and done < end
        if (save_every and done % save_every == 0 and done < end) or stop:
            ckpts.publish("lm", done, {"model.pt": _trunk_state(model, mode),
                                       "optimizer.pt": optimizer.state_dict()},
                          {"block": k, "global_step": done, "nado_iteration": nado_iteration})
            ckpts.prune("lm", keep=2)
        if stop:
            raise StopRequested(f"signal {stop_requested()}: checkpoint at step {done} in "
                                f"{ckpts.path('lm', done)}")

    t0 = time.perf_counter()
    metrics = lm_block(model, optimizer, data, start=start, end=end, total=total,
                       batch_size=f["batch_size"], optim=optim, seed=cfg["seed"],
                       regularizer=regularizer, extra_loss=extra, on_step=on_step)
    bar.close()
    store.publish("lm", k, {"model.pt": _trunk_state(model, mode),
                            "optimizer.pt": optimizer.state_dict()},
                  {"based_on": {"lm": k - 1, "nado": nado_iteration}, "global_step": end,
                   "mode": mode, "metrics": metrics, "seconds": time.perf_counter() - t0})
    return metrics


def _trunk_state(model, mode):
    return model.base_state_dict() if mode == "acft" else model.state_dict()


def _load_trunk(model, state, mode):
    if mode == "acft":
        model.load_base_state_dict(state)
    else:
        model.load_state_dict(state, strict=True)


# --- the oracle side ---------------------------------------------------------------------


def publish_initial_nado(side: Side, model, store: Optional[ArtifactStore] = None) -> None:
    """φ_0: the zero-initialised head (R = 1/2 everywhere, q = p)."""
    store = store or side.exchange
    if not store.exists("nado", 0):
        store.clean_temporaries("nado")
        store.publish("nado", 0, {"head.pt": model.head_state_dict()},
                      {"based_on": {"lm": None, "nado": None}, "init": "zeros"})


def oracle_iteration(side: Side, k: int, model, oracle, store: Optional[ArtifactStore] = None,
                     base_iteration: Optional[int] = None) -> Dict[str, float]:
    """Oracle block k: sample from θ_(k−1) (or θ_(base_iteration): NADO decoding's fixed LM),
    label, train φ_k warm-started from φ_(k−1); published in ``store`` (default: the
    exchange)."""
    from nemo_acft.data import batch_indices
    from nemo_acft.sampling import SamplingParams, sample_and_label

    cfg, n = side.cfg, side.cfg["acft"]["nado"]
    ex = store or side.exchange
    base = k - 1 if base_iteration is None else base_iteration
    model.load_base_state_dict(ex.load("lm", base, "model.pt"))
    model.load_head_state_dict(ex.load("nado", k - 1, "head.pt"))
    pool = side.data.train_prompts
    idx = batch_indices(len(pool), min(n["prompts"], len(pool)), cfg["seed"], "prompts", k)
    prompts = [pool[i] for i in idx.tolist()]
    t0 = time.perf_counter()
    params = SamplingParams(**sampling_kwargs(cfg["sampling"]),
                            eos_id=side.data.tokenizer.eos_id, seed=cfg["seed"] * 1000 + k)
    labelled = sample_and_label(model, side.data.tokenizer, prompts, oracle, params,
                                vocab_size=len(side.data.tokenizer),
                                batch_size=cfg["sampling"]["batch_size"],
                                threshold=cfg["oracle"]["threshold"],
                                oracle_batch_size=cfg["oracle"]["batch_size"])
    t_sample = time.perf_counter() - t0
    bar = side.bar(n["steps"], f"[{side.name}] NADO {k}/{side.K}", 1)
    step0 = (k - 1) * n["steps"]

    def on_step(step, m):
        bar.update(1)
        for key, v in m.items():
            side.tb.add_scalar(f"nado/{key}", v, step0 + step + 1)
        if stop_requested() is not None:
            raise StopRequested(f"signal {stop_requested()}: oracle block {k} is redone on "
                                "resume")

    metrics = train_nado(model, labelled.samples, labelled.label_tensor(), steps=n["steps"],
                         batch_size=n["batch_size"], optim=OptimConfig(**n["optim"]),
                         alpha=cfg["acft"]["alpha"], seed=cfg["seed"], stream=f"nado{k}",
                         on_step=on_step)
    bar.close()
    unlabelled = sum(x is None for x in labelled.labels)
    rate = labelled.violation_rate()
    side.tb.add_scalar("nado/sample_violation_rate", rate, k)
    s = labelled.samples
    rows = [json.dumps({"text": t, "score": sc, "label": lb, "prompt_length": int(pl),
                        "length": int(ln)})
            for t, sc, lb, pl, ln in zip(labelled.texts, labelled.scores, labelled.labels,
                                         s.prompt_lengths, s.lengths)]
    ex.publish("nado", k,
               {"head.pt": model.head_state_dict(),
                "samples.pt": {"tokens": s.tokens, "prompt_lengths": s.prompt_lengths,
                               "lengths": s.lengths, "logprobs": s.logprobs,
                               "labels": labelled.label_tensor()}},
               {"based_on": {"lm": base, "nado": k - 1}, "num_samples": len(rows),
                "num_unlabelled": unlabelled, "sample_violation_rate": rate,
                "metrics": metrics, "seconds_sampling": t_sample,
                "seconds": time.perf_counter() - t0},
               texts={"samples.jsonl": "\n".join(rows) + "\n"})
    return {**metrics, "sample_violation_rate": rate}


# --- sides and schedules -----------------------------------------------------------------


def _nado_for(schedule: str, k: int) -> int:
    """Which φ LM block k uses: φ_k in the sequential schedule and in the parallel schedule's
    first iteration, φ_(k−1) afterwards."""
    return k if schedule == "sequential" or k == 1 else k - 1


def _log_block(side: Side, what: str, k: int, m: Dict[str, float], t0: float, done: int,
               todo: int) -> None:
    rate = (time.perf_counter() - t0) / max(done, 1)
    shown = " ".join(f"{key} {v:.4g}" for key, v in m.items()
                     if key in ("lm_loss", "kl", "penalty", "gated_share", "nado_loss",
                                "sample_violation_rate"))
    log.info("[%s] %s %d/%d  %s  (%.1f s/block, ETA %.0f s)", side.name, what, k, side.K, shown,
             rate, rate * (todo - done))


def _wait(store: ArtifactStore, kind: str, k: int, timeout: float, who: str,
          alive: Liveness):
    """``store.wait_for`` that says why the other side is considered dead."""
    try:
        return store.wait_for(kind, k, timeout, waiting_for=who, alive=alive)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: {alive.reason}") from None


def run_lm_side(side: Side, schedule: str, pretrained: Path, mode: str = "acft",
                store: Optional[ArtifactStore] = None, oracle=None) -> None:
    """All LM blocks of ``mode`` (acft: waits for the oracle side's φ in the exchange;
    filtering and rl need ``oracle``)."""
    store = store or side.exchange
    publish_initial_lm(side, store, pretrained)
    model = build_model(side.gcfg, side.cfg["seed"], with_head=(mode == "acft"))
    timeout = side.cfg["acft"]["exchange_timeout_s"]
    todo = [k for k in range(1, side.K + 1) if not store.exists("lm", k)]
    t0 = time.perf_counter()
    for done, k in enumerate(todo, 1):
        j = None
        if mode == "acft":
            j = _nado_for(schedule, k)
            _wait(store, "nado", j, timeout, "the oracle side",
                  other_alive(store, "oracle", side.cfg["acft"]["heartbeat_timeout_s"]))
        m = lm_iteration(side, store, k, mode, model, j, oracle)
        _log_block(side, f"{mode} LM block", k, m, t0, done, len(todo))


def run_nado_decoding(side: Side, lm_state: Dict[str, torch.Tensor], oracle,
                      store: ArtifactStore, source: str) -> None:
    """The NADO decoding baseline's training: K oracle blocks (the same prompts and sample
    budget as ACFT's) with the LM held at ``lm_state`` (the baseline's θ_K, published as
    ``lm/iter_0`` of ``store``); φ_K in ``store`` then guides decoding."""
    if not store.exists("lm", 0):
        store.clean_temporaries("lm")
        store.publish("lm", 0, {"model.pt": lm_state}, {"based_on": {"copied_from": source}})
    model = build_model(side.gcfg, side.cfg["seed"], with_head=True)
    publish_initial_nado(side, model, store)
    todo = [k for k in range(1, side.K + 1) if not store.exists("nado", k)]
    t0 = time.perf_counter()
    for done, k in enumerate(todo, 1):
        m = oracle_iteration(side, k, model, oracle, store=store, base_iteration=0)
        _log_block(side, "NADO decoding: oracle block", k, m, t0, done, len(todo))


def run_oracle_side(side: Side, oracle) -> None:
    """All oracle blocks: each waits for θ_(k−1) from the LM side."""
    model = build_model(side.gcfg, side.cfg["seed"], with_head=True)
    publish_initial_nado(side, model)
    timeout = side.cfg["acft"]["exchange_timeout_s"]
    todo = [k for k in range(1, side.K + 1) if not side.exchange.exists("nado", k)]
    t0 = time.perf_counter()
    for done, k in enumerate(todo, 1):
        _wait(side.exchange, "lm", k - 1, timeout, "the LM side",
              other_alive(side.exchange, "lm", side.cfg["acft"]["heartbeat_timeout_s"]))
        m = oracle_iteration(side, k, model, oracle)
        _log_block(side, "oracle block", k, m, t0, done, len(todo))


def run_sequential(side: Side, pretrained: Path, oracle) -> None:
    """Oracle block k then LM block k with φ_k, for k = 1..K, in this process."""
    ex = side.exchange
    publish_initial_lm(side, ex, pretrained)
    model = build_model(side.gcfg, side.cfg["seed"], with_head=True)
    publish_initial_nado(side, model)
    t0 = time.perf_counter()
    todo = [k for k in range(1, side.K + 1) if not ex.exists("lm", k)]
    for done, k in enumerate(todo, 1):
        if not ex.exists("nado", k):
            m = oracle_iteration(side, k, model, oracle)
            _log_block(side, "oracle block", k, m, t0, done - 1, len(todo))
        m = lm_iteration(side, ex, k, "acft", model, nado_iteration=k)
        _log_block(side, "acft LM block", k, m, t0, done, len(todo))


def run_side(cfg: Dict[str, Any], role: str) -> None:
    """One side of the parallel schedule in this process (``role`` = lm | oracle): a heartbeat
    in ``exchange/status``, a handshake with the other side, then the side's blocks. SIGTERM or
    SIGUSR1 stops it at the next step (an LM block checkpoints first): status ``stopped``, exit
    code 143, and a rerun resumes. Any failure: status ``failed`` with the error, which the other
    side reads and fails on."""
    from nemo_acft.oracles import build_oracle

    validate(cfg)
    init_process(cfg)
    install_stop_handlers()
    side = Side(cfg, role)
    log_to_file(side.run_dir / "logs" / f"{role}.log")
    oracle = build_oracle(cfg["oracle"]) if role == "oracle" else None
    other = "oracle" if role == "lm" else "lm"
    a = cfg["acft"]
    try:
        lock = side_lock(side.exchange, role)
        lock.__enter__()
    except OSError as e:
        raise RuntimeError(f"[{role}] cannot write to the exchange directory "
                           f"{side.exchange.root.resolve()} on host {socket.gethostname()}: {e}") from e
    beat = Heartbeat(side.exchange, role, every_s=a["heartbeat_s"],
                     slurm_job=os.environ.get("SLURM_JOB_ID"),
                     slurm_node=os.environ.get("SLURMD_NODENAME"))
    try:
        handshake(side.exchange, role, other, a["handshake_timeout_s"])
        if role == "lm":
            pretrained = ensure_pretrained(cfg, side.data, side.gcfg, cfg["progress"])
            run_lm_side(side, "parallel", pretrained)
        else:
            run_oracle_side(side, oracle)
    except StopRequested as e:
        beat.finish("stopped", error=str(e))
        log.warning("[%s] stopped: %s", role, e)
        raise SystemExit(143) from None
    except BaseException as e:
        beat.finish("failed", error=f"{type(e).__name__}: {e}")
        log.error("[%s] failed: %s: %s", role, type(e).__name__, e)
        raise
    finally:
        side.close()
        lock.__exit__(None, None, None)
    beat.finish("done")


def _pdeathsig():  # the side processes die with the driver (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_parallel(side: Side, config_path: Path) -> None:
    """Launch the LM side and the oracle side as two processes and wait for both; if one fails,
    stop the other and raise with the failed side's log file."""
    procs = {}
    # each side is its own single-process world: not the driver's rendezvous address
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = str(side.cfg["threads"])
    for role in ("lm", "oracle"):
        procs[role] = subprocess.Popen(
            [sys.executable, "-m", "nemo_acft.training.run", "--config", str(config_path),
             "--role", role], env=env, preexec_fn=_pdeathsig)
    failed = None
    try:
        while procs:
            for role, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[role]
                if rc != 0:
                    failed = (role, rc)
                    raise RuntimeError(
                        f"the {role} side exited with code {rc}; its log: "
                        f"{side.run_dir / 'logs' / (role + '.log')}")
            time.sleep(0.2)
    finally:
        for role, p in procs.items():
            if p.poll() is None:
                log.error("stopping the %s side%s", role,
                          f" because the {failed[0]} side failed" if failed else "")
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run one side of the parallel schedule.")
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    parser.add_argument("--role", required=True, choices=("lm", "oracle"))
    args = parser.parse_args(argv)
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise SystemExit(f"--config {path}: no such file")
    cfg = yaml.safe_load(path.read_text())
    cfg["role"] = args.role
    run_side(cfg, args.role)


if __name__ == "__main__":
    main()
