"""Faults, on real processes, seeded so that they replay:

- chaos: a run of each schedule killed with SIGKILL at random moments (the whole process tree of
  ``acft-train``, or one worker of either group), rerun after each kill: θ_K, φ_K, the summary
  and the exported ``.nemo``'s weights are the uninterrupted run's, bit for bit;
- a rank of the oracle group stopped (SIGSTOP) inside a block: both sides fail, naming it,
  within the stated bound, and a rerun completes identically; the oracle is a Hugging Face
  classifier with a fast tokenizer, run in the forked worlds (the deadlock of a tokenizer
  forked after its thread pool was used);
- corruption: one flipped byte in each kind of artifact is found before it is used;
- a full disk under the exchange: a clear failure, nothing half-published, and the rerun after
  space is freed completes identically.

Concurrency (the run lock) and bad input are in tests/test_run_lock.py and
tests/test_bad_input.py.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.run_utils import FAST, REPO, compose, copy_run, drive

#: the parallel schedule with two ranks in the oracle group (TP 1 × DP 2; the LM group is one
#: rank) and the Hugging Face classifier as the oracle: the reference of the chaos and
#: stopped-rank tests
PAR2 = ["schedule=parallel", "model.acft.oracle_group.tensor_model_parallel_size=1",
        "model.acft.oracle_group.devices=2", "oracle.name=hf_classifier",
        "+oracle.violating_labels=[toxic]"]
#: the watchdog's bounds for the stopped-rank test (volatile keys: a rerun may change them)
WATCH = ["model.acft.exchange.heartbeat_s=0.5", "model.acft.exchange.heartbeat_timeout_s=8",
         "model.acft.exchange.stuck_timeout_s=120"]


def par2(classifier) -> list:
    return [*PAR2, f"+oracle.path={classifier}"]


@pytest.fixture(scope="module")
def par2_run(tmp_path_factory, cache, bert_classifier):
    run_dir = tmp_path_factory.mktemp("par2") / "run"
    drive(compose(run_dir, cache, *par2(bert_classifier)))
    return run_dir


# --- comparing runs ------------------------------------------------------------------------


def distcp(run_dir: Path, kind: str, k: int, store: str = "exchange") -> dict:
    """Every distributed-checkpoint file of an artifact, by name."""
    root = Path(run_dir) / store / kind / f"iter_{k:06d}"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.distcp"))}


def nemo_weights(path: Path) -> dict:
    """The weight files inside a ``.nemo``."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and m.name.endswith(".distcp")}


def summary_core(run_dir: Path) -> dict:
    """``summary.json`` without the wall times and the run directory's own paths."""
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("phases_s", "nemo")}


def block_metrics(run_dir: Path, K: int = 2) -> list:
    """Each ACFT LM block's mean metrics, as its manifest records them."""
    return [json.loads((Path(run_dir) / "exchange" / "lm" / f"iter_{k:06d}" / "manifest.json")
                       .read_text())["metrics"] for k in range(1, K + 1)]


def assert_same_run(got: Path, ref: Path, K: int = 2) -> None:
    for kind in ("lm", "nado"):
        assert distcp(got, kind, K) == distcp(ref, kind, K), kind
    assert block_metrics(got, K) == block_metrics(ref, K)  # a resumed block's are the whole's
    assert summary_core(got) == summary_core(ref)
    for name in ("acft_gpt.nemo", "acft_with_head.nemo"):
        assert nemo_weights(got / "export" / name) == nemo_weights(ref / "export" / name), name
    assert not [p for p in got.rglob("*") if ".tmp-" in p.name], "temporaries left behind"


# --- chaos ---------------------------------------------------------------------------------

#: moments of a run, in the order they happen (files that appear); a kill lands at one of them
#: plus a random delay
SEQ_POINTS = ["exchange/lm/iter_000000/manifest.json", "baseline/lm/iter_000001/manifest.json",
              "exchange/nado/iter_000001/manifest.json",
              "checkpoints/acft/lm/iter_000008/manifest.json",
              "exchange/lm/iter_000001/manifest.json", "exchange/nado/iter_000002/manifest.json",
              "checkpoints/acft/lm/iter_000020/manifest.json",
              "eval/baseline/iter_000001/manifest.json", "eval/acft/iter_000001/manifest.json",
              "eval/diagnostics/iter_000001/manifest.json"]
PAR_POINTS = ["exchange/lm/iter_000000/manifest.json", "baseline/lm/iter_000002/manifest.json",
              "exchange/nado/iter_000001/manifest.json",
              "checkpoints/acft/lm/iter_000008/manifest.json",
              "exchange/lm/iter_000001/manifest.json", "exchange/nado/iter_000002/manifest.json",
              "checkpoints/acft/lm/iter_000020/manifest.json",
              "eval/baseline/iter_000002/manifest.json", "eval/acft/iter_000001/manifest.json",
              "eval/diagnostics/iter_000002/manifest.json"]


def _wait_for(path: Path, timeout: float = 300.0, alive=lambda: True) -> bool:
    """Wait until ``path`` exists (True), or the process ``alive`` watches ended (False)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        if not alive():
            return False
        time.sleep(0.02)
    return True


def _cli(run_dir, cache, overrides):
    return [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}",
            f"cache_dir={cache}", *FAST, *overrides]


def _kill_tree(run_dir: Path, cache, overrides, point: str, delay: float) -> str:
    """``acft-train`` in its own process group, SIGKILLed whole at ``point`` + ``delay``."""
    p = subprocess.Popen(_cli(run_dir, cache, overrides), cwd=REPO, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if _wait_for(run_dir / point, alive=lambda: p.poll() is None):
            time.sleep(delay)
            os.killpg(p.pid, signal.SIGKILL)
    finally:
        _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    return f"tree at {point} + {delay:.2f} s"


def _kill_worker(run_dir: Path, cfg, point: str, delay: float, rng: random.Random) -> str:
    """The run driven from this process; one of its workers SIGKILLed at ``point`` +
    ``delay``."""
    import multiprocessing as mp

    from nemo_acft.io_utils import pid_running
    from nemo_acft.launch import WorldFailed

    victim = {}

    def kill():
        if not _wait_for(run_dir / point, alive=lambda: not finished.is_set()):
            return
        time.sleep(delay)
        for _ in range(200):  # between two phases no world runs for a moment
            workers = sorted((p.name, p.pid) for p in mp.active_children() if "-" in p.name
                             and p.name.split("-")[0] in ("prepare", "acft", "lm", "oracle",
                                                          "finish") and pid_running(p.pid))
            if workers or finished.is_set():
                break
            time.sleep(0.05)
        if workers:
            victim["name"], pid = rng.choice(workers)
            os.kill(pid, signal.SIGKILL)

    finished = threading.Event()
    t = threading.Thread(target=kill, daemon=True)
    t.start()
    try:
        with pytest.raises((WorldFailed, SystemExit)):
            drive(cfg)
    finally:
        finished.set()
        t.join(10)
    assert "name" in victim, f"no worker alive at {point}"
    return f"worker {victim['name']} at {point} + {delay:.2f} s"


def _chaos(run_dir, cache, overrides, points, seed, kills=5):
    """``kills`` SIGKILLs at moments drawn from ``points`` (in order) with a random delay, of the
    whole tree (two, in a random order) or of one worker (the others), each followed by the next
    attempt; then the run to its end. Returns what was killed."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(points)), kills))
    kinds = ["tree", "tree"] + ["worker"] * (kills - 2)  # the tree's are the dearer (imports)
    rng.shuffle(kinds)
    cfg = compose(run_dir, cache, *overrides)
    done = []
    for i, kind in zip(chosen, kinds):
        delay = rng.uniform(0.0, 0.5)
        if kind == "tree":
            done.append(_kill_tree(run_dir, cache, overrides, points[i], delay))
        else:
            done.append(_kill_worker(run_dir, cfg, points[i], delay, rng))
    drive(cfg)
    return done


def test_chaos_sequential(tmp_path, cache, seq_run):
    run_dir = tmp_path / "chaos_seq"
    kills = _chaos(run_dir, cache, [], SEQ_POINTS, seed=31)
    print("kills:", *kills, sep="\n  ")
    assert_same_run(run_dir, seq_run)


def test_chaos_parallel(tmp_path, cache, par2_run, bert_classifier):
    run_dir = tmp_path / "chaos_par"
    kills = _chaos(run_dir, cache, par2(bert_classifier), PAR_POINTS, seed=32)
    print("kills:", *kills, sep="\n  ")
    assert_same_run(run_dir, par2_run)


# --- a stopped rank ------------------------------------------------------------------------


def test_a_stopped_oracle_rank_fails_both_sides_naming_it(tmp_path, cache, par2_run,
                                                           bert_classifier):
    """The two sides as two worlds waited for apart (as two Slurm steps are): rank 1 of the
    oracle group is stopped in oracle block 1, while the LM side waits for φ_1. The oracle
    world's rank 0 names it once its beat has not advanced for heartbeat_timeout_s (8 s), and
    the LM side fails on the oracle side's status with the same words; the rerun is the
    uninterrupted run."""
    from nemo_acft.algorithms.phases import PHASES
    from nemo_acft.launch import WorldFailed, start_worlds, wait_worlds
    from nemo_acft.train import run_role

    run_dir = tmp_path / "stopped"
    overrides = [*par2(bert_classifier), *WATCH]
    run_role(compose(run_dir, cache, *overrides, "role=prepare"))
    cfg = compose(run_dir, cache, *overrides, "role=lm")
    logs = str(run_dir / "logs")
    lm = start_worlds({"lm": (1, PHASES["lm"], (cfg,))}, logs=logs)
    oracle = start_worlds({"oracle": (2, PHASES["oracle"], (cfg,))}, logs=logs)
    _wait_for(run_dir / "exchange" / "nado" / "iter_000000" / "manifest.json")
    time.sleep(0.5)
    rank1 = next(p for name, r, p in oracle if r == 1)
    os.kill(rank1.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(WorldFailed) as o:
            wait_worlds(oracle, grace_s=10)
        t_oracle = time.monotonic() - t0
        with pytest.raises(WorldFailed) as m:
            wait_worlds(lm, grace_s=10)
        t_lm = time.monotonic() - t0
    finally:
        if rank1.exitcode is None:
            os.kill(rank1.pid, signal.SIGKILL)
    named = f"rank 1 of the oracle world (host {os.uname().nodename}, pid {rank1.pid}"
    assert named in str(o.value) and "has not run for" in str(o.value), str(o.value)
    assert named in str(m.value) and "the lm world failed" in str(m.value), str(m.value)
    print(f"oracle world failed after {t_oracle:.1f} s: {o.value}\nLM world after {t_lm:.1f} s: "
          f"{m.value}")
    assert t_oracle < 30 and t_lm < 40, (t_oracle, t_lm)
    status = json.loads((run_dir / "exchange" / "status" / "oracle.json").read_text())
    assert status["state"] == "failed" and named in status["error"]
    drive(compose(run_dir, cache, *overrides))
    assert_same_run(run_dir, par2_run)


def _stuck_world(run_dir: str) -> None:
    """Rank 0 blocks in a call that never returns without marking it; rank 1 waits for it."""
    import torch.distributed as dist

    from nemo_acft import progress
    from nemo_acft.algorithms.coordination import Watchdog, world_pids
    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.io_utils import rank_log

    dist.init_process_group("gloo")
    r = dist.get_rank()
    Watchdog(ArtifactStore(Path(run_dir) / "exchange"), "oracle", every_s=0.2, dead_s=3.0,
             stuck_s=2.0, pids=world_pids(), log_file=rank_log(Path(run_dir) / "logs", "oracle", r))
    progress.tick("sampled batch 3")
    if r == 0:
        time.sleep(120)
    else:
        with progress.waiting("rank 0's oracle scores"):
            time.sleep(120)


def test_a_stuck_rank_is_named_and_every_ranks_stacks_are_dumped(tmp_path):
    """A rank alive but not advancing (its beat goes on) past stuck_timeout_s, while its peer
    waits for it: the world fails naming the rank and its last step, and both logs hold every
    thread's stack, the stuck call included."""
    from nemo_acft.launch import WorldFailed, start_worlds, wait_worlds

    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = time.monotonic()
    with pytest.raises(WorldFailed) as e:
        wait_worlds(start_worlds({"oracle": (2, _stuck_world, (str(tmp_path),))},
                                 logs=str(logs)), grace_s=5)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "rank 0 of the oracle world" in msg and "is stuck: no progress for" in msg, msg
    assert "after 'sampled batch 3'" in msg
    mine, theirs = (logs / "oracle.log").read_text(), (logs / "oracle.rank1.log").read_text()
    assert "watchdog (no progress)" in mine and "in _stuck_world" in mine
    assert "watchdog (rank 0 was declared stuck)" in theirs and "in _stuck_world" in theirs


# --- a tokenizer in forked worlds ----------------------------------------------------------


def test_a_classifier_oracle_runs_in_forked_worlds_of_a_hugging_face_llama(tmp_path, cache, nemo,
                                                                           bert_classifier):
    """The configuration that deadlocked when the worlds were forked from the driver: a Llama
    with a Hugging Face tokenizer (its vocabulary is counted in the driver), the parallel
    schedule, the classifier oracle (a fast tokenizer) on rank 0 of an oracle group of TP 2 ×
    DP 2 whose other ranks wait for its scores. The run finishes; were a world to hang again,
    the watchdog would end it within stuck_timeout_s (90 s) naming the stuck rank."""
    run_dir = tmp_path / "forked"
    drive(compose(run_dir, cache, f"model.restore_from_path={nemo}", "model.acft.iterations=1",
                  "model.acft.steps_per_iteration=4", "model.acft.save_every=0",
                  "model.global_batch_size=8", "model.micro_batch_size=4",
                  "model.acft.oracle_block.global_batch_size=8",
                  "model.acft.oracle_block.micro_batch_size=4", "model.acft.oracle_block.steps=4",
                  "model.acft.oracle_block.prompts=32", "model.acft.sampling.batch_size=8",
                  "model.acft.calibration.prompts=0", "model.acft.diagnostics.probe_prompts=0",
                  "eval.prompts=8", "schedule=parallel",
                  "model.acft.oracle_group.tensor_model_parallel_size=2",
                  "model.acft.oracle_group.devices=4", "oracle.name=hf_classifier",
                  f"+oracle.path={bert_classifier}", "+oracle.violating_labels=[toxic]",
                  "~model.acft.domain_lambdas", "+model.acft.domain_lambdas={}",
                  "model.acft.exchange.stuck_timeout_s=90"))
    man = json.loads((run_dir / "exchange" / "nado" / "iter_000001" / "manifest.json").read_text())
    assert man["num_samples"] == 32 and man["layout"]["dp"] == 2 and man["layout"]["tp"] == 2
    assert (run_dir / "summary.json").is_file()


# --- corruption ----------------------------------------------------------------------------


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_one_flipped_byte_in_each_kind_of_artifact_is_found_before_use(tmp_path, seq_run):
    """θ, φ, the oracle block's samples, a rolling checkpoint, a shipped q, an evaluation
    result, the exported .nemo and a manifest, each read the way the run reads it."""
    import torch

    from nemo_acft.algorithms.blocks import _samples
    from nemo_acft.algorithms.exchange import ArtifactStore, DamagedArtifact, save_tensors
    from nemo_acft.algorithms.phases import _export_intact, read_result

    run = copy_run(seq_run, tmp_path / "run")
    ex = ArtifactStore(run / "exchange")
    cases = []

    def expect(what, call, path):
        with pytest.raises(DamagedArtifact) as e:
            r = call()
            if isinstance(r, str):  # _export_intact reports instead of raising
                raise DamagedArtifact(r)
        msg = str(e.value)
        assert str(path) in msg and "delete" in msg, (what, msg)
        cases.append(what)

    theta = sorted((run / "exchange/lm/iter_000002/trunk").glob("*.distcp"))[0]
    _flip(theta)
    expect("θ", lambda: ex.verify("lm", 2), theta)
    phi = sorted((run / "exchange/nado/iter_000002/head").glob("*.distcp"))[0]
    _flip(phi)
    expect("φ", lambda: ex.verify("nado", 2), phi)
    samples = run / "exchange/nado/iter_000001/samples.safetensors"
    _flip(samples, 0.9)
    expect("samples", lambda: _samples(ex, 1), samples)
    ck = ArtifactStore(run / "checkpoints" / "acft")
    it = ck.latest("lm")
    part = sorted(ck.path("lm", it).rglob("*.distcp"))[0]
    _flip(part)
    expect("checkpoint", lambda: ck.verify("lm", it), part)
    ex.publish("q", 1, lambda tmp: save_tensors(tmp / "q.safetensors",
                                                {"rows": torch.arange(4), "ids": torch.ones(4, 3)}),
               {})
    q = ex.path("q", 1) / "q.safetensors"
    _flip(q, 0.95)
    expect("q", lambda: ex.load("q", 1, "q.safetensors"), q)
    result = ArtifactStore(run / "eval").path("acft", 2) / "result.json"
    result.write_text(result.read_text().replace('"violation_rate": 0.', '"violation_rate": 1.', 1))
    expect("eval result", lambda: read_result(ArtifactStore(run / "eval"), "acft", 2), result)
    nemo = run / "export" / "acft_gpt.nemo"
    _flip(nemo)
    paths = {"plain": nemo, "with_head": run / "export" / "acft_with_head.nemo"}
    expect("export", lambda: _export_intact(run / "export", paths), nemo)
    man = ex.path("lm", 1) / "manifest.json"
    man.write_text(man.read_text()[:100])
    expect("manifest", lambda: ex.manifest("lm", 1), man)
    assert len(cases) == 8


def test_a_damaged_result_stops_the_rerun_with_what_to_delete(tmp_path, cache, seq_run):
    """End to end: an edited evaluation result makes the rerun fail naming it (before any
    summary is written from it); deleting what the message says and rerunning gives the
    uninterrupted run's summary."""
    from nemo_acft.launch import WorldFailed

    run = copy_run(seq_run, tmp_path / "run")
    (run / "summary.json").unlink()
    result = run / "eval" / "acft" / "iter_000002" / "result.json"
    row = json.loads(result.read_text())
    row["violation_rate"] = 0.0001
    result.write_text(json.dumps(row))
    cfg = compose(run, cache)
    with pytest.raises(WorldFailed) as e:
        drive(cfg)
    assert str(result) in str(e.value) and f"delete {result.parent}" in str(e.value)
    assert e.value.exit_code == 2 and not (run / "summary.json").exists()
    shutil.rmtree(result.parent)
    drive(cfg)
    assert summary_core(run) == summary_core(seq_run)


# --- a full disk ---------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    return r.returncode == 0


def test_a_full_exchange_fails_clearly_and_the_rerun_after_freeing_space_finishes(
        tmp_path, cache, seq_run):
    """The exchange on a tmpfs too small for the run: the run fails with ENOSPC naming the
    path, no artifact is left half-published (every iteration directory has its manifest,
    no temporary is left), and after the file system grows the rerun is the uninterrupted
    run."""
    from nemo_acft.launch import WorldFailed

    run = tmp_path / "full"
    exchange = run / "exchange"
    need = sum(p.stat().st_size for p in (seq_run / "exchange").rglob("*") if p.is_file())
    if os.geteuid() != 0 or not _mount_tmpfs(exchange, f"{need // 2}"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        cfg = compose(run, cache)
        with pytest.raises(WorldFailed) as e:
            drive(cfg)
        assert "no space left on device writing" in str(e.value), str(e.value)
        assert str(exchange) in str(e.value), str(e.value)
        for d in exchange.glob("*/iter_*"):
            assert (d / "manifest.json").is_file(), f"{d} published without its manifest"
        assert not [p for p in exchange.rglob("*") if ".tmp-" in p.name]
        subprocess.run(["mount", "-o", f"remount,size={need * 4}", str(exchange)], check=True)
        drive(cfg)
        assert_same_run(run, seq_run)
    finally:
        subprocess.run(["umount", "-l", str(exchange)], capture_output=True)
