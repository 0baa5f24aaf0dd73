"""The training entry point end to end on a shrunken built-in config: the parallel schedule's
manifests checked against recomputation, kill -9 and resume equal to an uninterrupted run, and
bad configs and files rejected before anything is written.

These tests launch ``python -m nemo_acft.train`` (Hydra) as real processes; the parallel
schedule starts its two sides as two more processes.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.dist_utils import run_workers

FAST = [
    "acft.iterations=2", "finetune.steps_per_iteration=12", "finetune.save_every=4",
    "finetune.batch_size=16", "pretrain.steps=30", "acft.nado.steps=10", "acft.nado.prompts=64",
    "acft.nado.batch_size=32", "sampling.max_new_tokens=12", "sampling.batch_size=64",
    "eval.prompts=32", "eval.samples_per_prompt=1", "eval.ppl_records=64",
    "data.builtin.pretrain_records=600", "data.builtin.train_records=300",
    "data.builtin.heldout_records=100", "model.hidden_size=32", "progress=false",
]


def _cmd(run_dir, cache, *extra):
    return [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}",
            f"cache_dir={cache}", *FAST, *extra]


def _run(run_dir, cache, *extra, timeout=300):
    p = subprocess.run(_cmd(run_dir, cache, *extra), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _final_weights(run_dir, k=2):
    ex = Path(run_dir) / "exchange"
    lm = torch.load(ex / "lm" / f"iter_{k:06d}" / "model.pt", weights_only=False)
    nado = torch.load(ex / "nado" / f"iter_{k:06d}" / "head.pt", weights_only=False)
    return lm, nado


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None:
            assert b[key] is None
            continue
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("par") / "run"
    _run(run_dir, cache, "schedule=parallel")
    return run_dir


def test_parallel_run_writes_summary_plot_and_manifests(parallel_run):
    summary = json.loads((parallel_run / "summary.json").read_text())
    assert summary["schedule"] == "parallel"
    for side in ("baseline", "acft"):
        assert 0.0 <= summary[side]["violation_rate"] <= 1.0 and summary[side]["ppl"] > 1.0
    assert summary["wall_s"] > 0
    assert (parallel_run / "iterations.png").stat().st_size > 10_000
    assert list((parallel_run / "tb").glob("*/events.out.tfevents.*"))
    ex = parallel_run / "exchange"

    def manifest(kind, k):
        return json.loads((ex / kind / f"iter_{k:06d}" / "manifest.json").read_text())

    # LM block 1 as sequential (φ_1), then LM block k uses φ_(k−1); oracle block k samples θ_(k−1)
    assert manifest("lm", 1)["based_on"] == {"lm": 0, "nado": 1}
    assert manifest("lm", 2)["based_on"] == {"lm": 1, "nado": 1}
    assert manifest("nado", 1)["based_on"] == {"lm": 0, "nado": 0}
    assert manifest("nado", 2)["based_on"] == {"lm": 1, "nado": 1}
    # the two sides were separate processes
    assert manifest("lm", 2)["writer"]["pid"] != manifest("nado", 2)["writer"]["pid"]
    for kind in ("lm", "nado"):
        status = json.loads((ex / "status" / f"{'lm' if kind == 'lm' else 'oracle'}.json").read_text())
        assert status["state"] == "done"
    # every file is what its manifest says
    import hashlib
    for kind, k in (("lm", 2), ("nado", 2)):
        m = manifest(kind, k)
        for name, meta in m["files"].items():
            data = (ex / kind / f"iter_{k:06d}" / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == meta["sha256"]


def _recompute_worker(rank, world_size, run_dir):
    """Recompute oracle block 2's samples and LM block 2 from the artifacts the manifests name."""
    from nemo_acft.data import batch_indices
    from nemo_acft.sampling import SamplingParams, generate
    from nemo_acft.training.blocks import OptimConfig, freeze_head, lm_block
    from nemo_acft.training.exchange import ArtifactStore
    from nemo_acft.training.setup import (build_data, build_model, gpt_config, init_process,
                                          regularizer_config, sampling_kwargs)

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    init_process(cfg)
    data = build_data(cfg)
    ex = ArtifactStore(Path(run_dir) / "exchange")
    model = build_model(gpt_config(cfg, len(data.tokenizer)), cfg["seed"])
    tok = data.tokenizer
    # oracle block 2: its samples come from θ_1 (and φ_1 loaded but unused: unguided sampling)
    out = {}
    for lm_it in (1, 0):
        model.load_base_state_dict(ex.load("lm", lm_it, "model.pt"))
        idx = batch_indices(len(data.train_prompts), cfg["acft"]["nado"]["prompts"], cfg["seed"],
                            "prompts", 2)
        prompts = [tok.encode(data.train_prompts[i]) for i in idx.tolist()]
        params = SamplingParams(**sampling_kwargs(cfg["sampling"]), eos_id=tok.eos_id,
                                seed=cfg["seed"] * 1000 + 2)
        out[f"samples_from_lm{lm_it}"] = generate(model, prompts, params,
                                                  vocab_size=len(tok)).tokens
    # LM block 2 from θ_1 and its optimizer state, with φ_1 (expected) and φ_2 (not used)
    f = cfg["finetune"]
    for nado_it in (1, 2):
        model.load_base_state_dict(ex.load("lm", 1, "model.pt"))
        model.load_head_state_dict(ex.load("nado", nado_it, "head.pt"))
        optim = OptimConfig(**f["optim"])
        opt = optim.make(freeze_head(model))
        opt.load_state_dict(ex.load("lm", 1, "optimizer.pt"))
        S = f["steps_per_iteration"]
        lm_block(model, opt, data.train, start=S, end=2 * S, total=2 * S,
                 batch_size=f["batch_size"], optim=optim, seed=cfg["seed"],
                 regularizer=regularizer_config(cfg))
        out[f"theta2_with_nado{nado_it}"] = {k: None if v is None else v.clone()
                                             for k, v in model.base_state_dict().items()}
    return out


def test_parallel_blocks_used_what_their_manifests_say(parallel_run):
    """Independent check of the manifests: recompute from the named artifacts and compare."""
    (out,) = run_workers(_recompute_worker, 1, str(parallel_run))
    ex = parallel_run / "exchange"
    samples = torch.load(ex / "nado" / "iter_000002" / "samples.pt", weights_only=False)
    width = samples["tokens"].shape[1]
    assert torch.equal(out["samples_from_lm1"][:, :width], samples["tokens"])
    assert not torch.equal(out["samples_from_lm0"][:, :width], samples["tokens"])
    theta2 = torch.load(ex / "lm" / "iter_000002" / "model.pt", weights_only=False)
    _assert_same(out["theta2_with_nado1"], theta2)
    with pytest.raises(AssertionError):
        _assert_same(out["theta2_with_nado2"], theta2)


def _kill_when(cmd, path_glob, root, timeout=240):
    """Start ``cmd`` in its own session, SIGKILL the whole group when ``path_glob`` appears."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(Path(root).glob(path_glob)):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True
        if p.poll() is not None:
            raise AssertionError("finished before the kill point: " + p.stderr.read()[-2000:])
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError(f"{path_glob} never appeared")


@pytest.mark.parametrize("schedule,kill_points", [
    # after oracle block 2 is published, then inside LM block 2 (its checkpoint at step 16)
    ("sequential", ["exchange/nado/iter_000002/manifest.json", "checkpoints/acft/lm/iter_000016/manifest.json"]),
    # while the two sides run at once: after φ_1, then inside LM block 2
    ("parallel", ["exchange/nado/iter_000001/manifest.json", "checkpoints/acft/lm/iter_000016/manifest.json"]),
])
def test_kill_9_and_resume_equals_uninterrupted(tmp_path, cache, parallel_run, schedule,
                                                kill_points):
    if schedule == "sequential":
        reference = tmp_path / "ref"
        _run(reference, cache)
    else:
        reference = parallel_run
    run_dir = tmp_path / "killed"
    cmd = _cmd(run_dir, cache, f"schedule={schedule}")
    for point in kill_points:
        _kill_when(cmd, point, run_dir)
    # the kill lands a few ms after the checkpoint appears: LM block 2 is still unfinished
    # unless the machine stalled the test process for the rest of the block
    block_done = (run_dir / "exchange" / "lm" / "iter_000002" / "manifest.json").exists()
    p = _run(run_dir, cache, f"schedule={schedule}")
    # (a checkpoint at step 16, or 20 if block 2 ran on for a few ms before the kill)
    assert block_done or re.search(r"resuming from the checkpoint at step (16|20)", p.stdout)
    for a, b in zip(_final_weights(reference), _final_weights(run_dir)):
        _assert_same(a, b)
    ref = json.loads((reference / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["acft"] == ref["acft"] and got["baseline"] == ref["baseline"]
    assert not list((run_dir / "exchange").glob("*/.iter_*tmp*"))  # no half-written artifact


def test_bad_overrides_fail_before_anything_is_written(tmp_path, cache):
    run_dir = tmp_path / "bad"
    for extra, message in [
        (["acft.lamda=1"], "Could not override 'acft.lamda'"),
        (["schedule=sideways"], "config schedule='sideways': expected one of"),
        (["oracle.name=perspective"], "oracle.name='perspective': unknown oracle"),
        (["+acft.domain_lambdas.sport=1.0"], "acft.domain_lambdas names domains ['sport']"),
        (["data.source=files", "data.train_file=/nonexistent.jsonl"],
         "config data.train_file='/nonexistent.jsonl': expected an existing file"),
    ]:
        p = subprocess.run(_cmd(run_dir, cache, *extra), capture_output=True, text=True,
                           timeout=120)
        assert p.returncode != 0
        assert message in p.stdout + p.stderr, (extra, p.stderr[-2000:])
        assert not (run_dir / "config.yaml").exists()


def test_validate_names_key_and_expectation():
    from omegaconf import OmegaConf

    from nemo_acft.training.setup import validate

    base = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent.parent / "conf" /
                                                 "tiny_cpu.yaml"), resolve=False)
    base.pop("hydra")
    base["cache_dir"] = "/tmp"
    validate(base)
    cases = [
        (("acft", "delta"), 1.5, "config acft.delta=1.5: expected null or a number in (0, 1]"),
        (("acft", "min_z"), 0.99, "config acft.min_z=0.99: expected a number in [0, acft.delta)"),
        (("finetune", "batch_size"), 0, "config finetune.batch_size=0: expected a positive"),
        (("sampling", "top_p"), 0.0, "top_p=0.0: expected in (0, 1]"),
        (("oracle", "threshold"), 2, "config oracle.threshold=2"),
        (("data", "prompt_words"), [3, 2], "data.prompt_words=[3, 2]"),
    ]
    for (section, key), value, message in cases:
        cfg = json.loads(json.dumps(base))
        cfg[section][key] = value
        with pytest.raises(ValueError) as e:
            validate(cfg)
        assert message in str(e.value)


def test_rerun_with_a_different_config_is_refused(tmp_path):
    from nemo_acft.training.driver import write_config

    cfg = {"seed": 1, "acft": {"lambda": 1.0}, "progress": True}
    write_config(cfg, tmp_path)
    write_config({**cfg, "progress": False}, tmp_path)  # volatile keys may change
    with pytest.raises(ValueError, match=r"different config \(keys: acft.lambda\)"):
        write_config({**cfg, "acft": {"lambda": 2.0}}, tmp_path)


def test_malformed_data_file_is_named(tmp_path):
    from nemo_acft.training.setup import build_data

    good = tmp_path / "train.jsonl"
    good.write_text('{"text": "a b c", "domain": "x"}\n{"text": 5}\n')
    held = tmp_path / "held.txt"
    held.write_text("some held out text\n")
    cfg = {"seed": 0, "model": {"seq_length": 16}, "eval": {"ppl_records": 10, "prompts": 10},
           "data": {"source": "files", "train_file": str(good), "heldout_file": str(held),
                    "pretrain_file": None, "prompts_file": None, "skip_malformed": False,
                    "prompt_words": [1, 2]}}
    with pytest.raises(ValueError, match=r"train.jsonl:2: malformed data line"):
        build_data(cfg)
    cfg["data"]["skip_malformed"] = True
    data = build_data(cfg)
    assert len(data.train) == 1 and data.domains == ["general", "x"]


def test_a_side_alone_fails_the_handshake_with_the_directory_named(tmp_path, cache):
    """The LM side without an oracle side (a group that cannot see the run directory looks
    the same): a clear error after acft.handshake_timeout_s, status 'failed'."""
    run_dir = tmp_path / "alone"
    t0 = time.monotonic()
    p = subprocess.run(_cmd(run_dir, cache, "role=lm", "acft.handshake_timeout_s=3",
                            "acft.heartbeat_s=0.5", "acft.heartbeat_timeout_s=2"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 60
    err = p.stdout + p.stderr
    assert "the oracle side did not report in" in err, err[-2000:]
    assert str((run_dir / "exchange").resolve()) in err
    status = json.loads((run_dir / "exchange" / "status" / "lm.json").read_text())
    assert status["state"] == "failed" and "did not report" in status["error"]


def test_liveness_from_status_and_heartbeat(tmp_path):
    """Dead on 'failed'/'stopped' at once, or once the beat stops advancing for stale_s; an old
    status file does not pass the handshake, an advancing one does."""
    import threading

    from nemo_acft.training.exchange import ArtifactStore
    from nemo_acft.training.run import Heartbeat, handshake, other_alive, write_status

    store = ArtifactStore(tmp_path / "exchange")
    alive = other_alive(store, "oracle", stale_s=0.6)
    assert alive()  # no status yet: the timeouts cover a side that never starts
    write_status(store, "oracle", "running", beat=1)  # a dead process's last word
    assert alive()
    time.sleep(0.8)
    assert not alive() and "has not advanced" in alive.reason
    with pytest.raises(RuntimeError, match="did not advance"):
        handshake(store, "lm", "oracle", timeout_s=0.5)
    beat = Heartbeat(store, "oracle", every_s=0.1)
    try:
        alive = other_alive(store, "oracle", stale_s=0.6)
        for _ in range(10):
            assert alive()
            time.sleep(0.1)
        handshake(store, "lm", "oracle", timeout_s=5)
    finally:
        beat.finish("failed", error="boom")
    assert not alive() and "reported 'failed'" in alive.reason and "boom" in alive.reason
    assert threading.active_count() >= 1


def test_sigusr1_checkpoints_and_stops_then_resumes(tmp_path, cache):
    """Slurm's time-limit signal: the LM block writes a checkpoint at the current step, the run
    exits 143, and the same command then finishes the run."""
    run_dir = tmp_path / "usr1"
    # only the signal writes a checkpoint; blocks long enough for the signal to land inside one
    extra = ("finetune.save_every=0", "finetune.steps_per_iteration=60", "acft.nado.steps=40")
    cmd = _cmd(run_dir, cache, *extra)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "exchange" / "lm" / "iter_000001" / "manifest.json").is_file():
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # inside oracle block 2 (or LM block 2)
    assert p.wait(120) == 143, p.stderr.read()[-2000:]
    assert "rerun the same command to resume" in p.stderr.read()
    assert not (run_dir / "exchange" / "lm" / "iter_000002").exists()
    _run(run_dir, cache, *extra)
    assert (run_dir / "summary.json").is_file()
