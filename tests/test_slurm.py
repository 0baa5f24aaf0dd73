"""The sbatch scripts on a real Slurm (Debian's slurm-wlm 22.05, munge) started on this machine:
two slurmd nodes, so that the two components of a heterogeneous job land on different nodes.

- the README's cluster quick start: an HF Llama (tests/hf_utils: tiny, random, offline) through
  ``acft-convert hf-to-nemo``, then acft_hetjob.sbatch with 2 tasks in the LM component (TP = 2:
  one world of two srun tasks) and 1 in the oracle component: completes; both sides ran in their
  own component (node n1 / n2), the LM side's θ_k written at TP = 2 and read at TP = 1, the
  exchange holds every iteration of both, and a .nemo comes out, which eval.sbatch evaluates
  (acft-eval on the .nemo) and ``acft-convert nemo-to-hf`` turns into a folder
  ``AutoModelForCausalLM`` loads and generates from;
- acft_single.sbatch: completes with the sequential schedule and a .nemo;
- scancel of the oracle component mid-run: the LM side fails with the clear error (not a hang),
  the job exits non-zero, and the LM side's last artifacts load with their checksums intact.

Skipped where Slurm is not installed or the tests do not run as root; CI installs it
(scripts/setup.sh) and sets ACFT_REQUIRE_SLURM=1, which turns the skip into a failure."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, available

REPO = Path(__file__).resolve().parents[1]
WHY = available()
if WHY and os.environ.get("ACFT_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"ACFT_REQUIRE_SLURM=1 but no local Slurm can start: {WHY}")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no local Slurm: {WHY}")

#: tiny_cpu, smaller (tests/run_utils.FAST) with the exchange's timeouts for a busy machine
from tests.run_utils import FAST  # noqa: E402

SMALL = [*FAST, "model.acft.exchange.handshake_timeout_s=120",
         "model.acft.exchange.heartbeat_s=1", "model.acft.exchange.heartbeat_timeout_s=15"]
#: the LM component with 2 tasks (TP = 2), the oracle component with 1
HET_SIZES = ["--ntasks=2", ":", "--ntasks=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _env(tmp, run_dir):
    # the test nodes n1/n2 share this host and their names do not resolve: rendezvous here
    return {"ACFT_RUN_DIR": str(run_dir), "ACFT_PYTHON": sys.executable,
            "ACFT_CACHE_DIR": str(tmp.parent / "cache"), "OMP_NUM_THREADS": "1",
            "ACFT_MASTER_ADDR": "127.0.0.1"}


def _submit(cluster, tmp, name, script, overrides, sizes=()):
    run_dir = tmp / name
    out = tmp / f"{name}.out"
    p = cluster.submit_wait(str(REPO / "slurm" / script), overrides, _env(tmp, run_dir),
                            sbatch_args=[f"--output={out}", *sizes])
    return p, run_dir, out


def _job_id(p):
    line = p.stdout.readline()
    m = re.match(r"Submitted batch job (\d+)", line)
    assert m, line
    return m[1]


def _iterations(run_dir, kind):
    d = run_dir / "exchange" / kind
    return sorted(int(x.name.split("_")[1]) for x in d.iterdir()
                  if x.name.startswith("iter_") and (x / "manifest.json").is_file())


def _status(run_dir, side):
    return json.loads((run_dir / "exchange" / "status" / f"{side}.json").read_text())


def _manifest(run_dir, kind, k):
    return json.loads((run_dir / "exchange" / kind / f"iter_{k:06d}" /
                       "manifest.json").read_text())


def test_hetjob_runs_the_parallel_schedule_in_two_components(cluster, tmp_path):
    """The README's cluster quick start, the paths and sizes made small."""
    import subprocess

    from tests.hf_utils import tiny_llama

    convert = str(Path(sys.executable).with_name("acft-convert"))
    hf = tiny_llama(tmp_path / "hf" / "Llama-tiny")
    llama = tmp_path / "ckpt" / "llama.nemo"
    subprocess.run([convert, "hf-to-nemo", "--hf", str(hf), "--out", str(llama),
                    "--tensor-model-parallel-size", "2"], check=True, timeout=600)
    t0 = time.monotonic()
    p, run_dir, out = _submit(cluster, tmp_path, "het", "acft_hetjob.sbatch",
                              SMALL + [f"model.restore_from_path={llama}",
                                       "model.tensor_model_parallel_size=2",
                                       "model.acft.oracle_group.tensor_model_parallel_size=1"],
                              sizes=HET_SIZES)
    _job_id(p)
    rc = p.wait(900)
    log = out.read_text() if out.exists() else ""
    assert rc == 0, log[-3000:] + p.stderr.read()
    print(f"hetjob: {time.monotonic() - t0:.0f} s")
    assert _iterations(run_dir, "lm") == [0, 1, 2]
    assert _iterations(run_dir, "nado") == [0, 1, 2]
    lm, oracle = _status(run_dir, "lm"), _status(run_dir, "oracle")
    assert lm["state"] == oracle["state"] == "done"
    # each side ran on its own component's node, the LM side as a world of 2 srun tasks
    assert {lm["slurm_node"], oracle["slurm_node"]} == {"n1", "n2"}, (lm, oracle)
    assert len(lm["pids"]) == 2 and len(oracle["pids"]) == 1
    assert lm["layout"]["tp"] == 2 and oracle["layout"]["tp"] == 1
    read = _manifest(run_dir, "nado", 2)["read"]["lm"]
    assert read["written_at"]["tp"] == 2 and read["read_at"]["tp"] == 1
    assert _manifest(run_dir, "lm", 2)["writer"]["world_size"] == 2
    nemo = run_dir / "export" / "acft_gpt.nemo"
    assert nemo.is_file() and nemo.stat().st_size > 100_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["schedule"] == "parallel" and summary["nemo"]["plain"] == str(nemo)
    assert summary["layouts"]["lm"]["tp"] == 2
    assert "LM group 2 tasks" in log and "LM group: exit code 0" in log
    # eval.sbatch on that .nemo: acft-eval's toxicity protocol through stock MegatronGPTModel
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("you are\nthe weather is\n")
    eval_dir = tmp_path / "eval"
    q = cluster.submit_wait(str(REPO / "slurm" / "eval.sbatch"),
                            ["--prompts", str(prompts), "--samples-per-prompt", "2",
                             "--max-new-tokens", "8", "--evaluator", "lexicon",
                             "--method", "acft"],
                            {**_env(tmp_path, eval_dir), "ACFT_NEMO": str(nemo)},
                            sbatch_args=[f"--output={tmp_path / 'eval.out'}"])
    _job_id(q)
    assert q.wait(600) == 0, (tmp_path / "eval.out").read_text()[-3000:]
    metrics = json.loads((eval_dir / "eval" / "metrics.json").read_text())
    assert metrics["method"] == "acft" and metrics["num_samples"] + metrics["num_failed"] == 4
    assert len((eval_dir / "eval" / "samples.jsonl").read_text().splitlines()) == 4
    # and out to Hugging Face
    hf_out = tmp_path / "hf" / "llama-acft"
    subprocess.run([convert, "nemo-to-hf", "--nemo", str(nemo), "--out", str(hf_out)],
                   check=True, timeout=600)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_out))
    model = AutoModelForCausalLM.from_pretrained(str(hf_out))
    ids = torch.tensor([tok.encode("the weather is")])
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape[1] > ids.shape[1]


def test_single_job_runs_the_sequential_schedule(cluster, tmp_path):
    p, run_dir, out = _submit(cluster, tmp_path, "single", "acft_single.sbatch", SMALL)
    _job_id(p)
    rc = p.wait(900)
    assert rc == 0, (out.read_text() if out.exists() else "") + p.stderr.read()
    assert _iterations(run_dir, "lm") == [0, 1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["schedule"] == "sequential"
    assert (run_dir / "export" / "acft_gpt.nemo").is_file()


def test_cancelling_the_oracle_component_fails_the_lm_side_cleanly(cluster, tmp_path):
    from nemo_acft.algorithms.exchange import ArtifactStore

    p, run_dir, out = _submit(cluster, tmp_path, "cancel", "acft_hetjob.sbatch",
                              SMALL + ["model.acft.iterations=8"])
    job = _job_id(p)
    deadline = time.monotonic() + 600
    while not (run_dir / "exchange" / "nado" / "iter_000002" / "manifest.json").is_file():
        assert p.poll() is None, "the job ended before oracle block 2: " + out.read_text()[-3000:]
        assert time.monotonic() < deadline, "oracle block 2 never appeared"
        time.sleep(0.5)
    cluster.run(["scancel", f"{job}+1"])  # the oracle component only
    t_cancel = time.monotonic()
    rc = p.wait(300)
    took = time.monotonic() - t_cancel
    log = out.read_text()
    print(f"after scancel: job ended in {took:.0f} s with exit code {rc}")
    assert rc != 0
    assert took < 120, "the job should end soon, not wait for the exchange timeout"
    lm, oracle = _status(run_dir, "lm"), _status(run_dir, "oracle")
    assert oracle["state"] == "stopped", oracle  # SIGTERM from scancel, handled
    assert lm["state"] == "failed", lm
    # the LM side failed within seconds of the oracle side stopping (sbatch --wait itself
    # polls with a back-off, so `took` is an upper bound)
    print(f"LM side failed {lm['time'] - oracle['time']:.1f} s after the oracle side stopped")
    assert lm["time"] - oracle["time"] < 30
    assert "the oracle side" in lm["error"] and "nado iteration" in lm["error"], lm["error"]
    assert "the oracle group failed first" in log or "the LM group failed first" in log, log
    lm_log = (run_dir / "logs" / "lm.log").read_text()
    assert "the oracle side" in lm_log
    # the LM side's last artifacts are intact: the newest θ and its newest in-block checkpoint
    # load with their checksums verified
    ex = ArtifactStore(run_dir / "exchange")
    last = ex.iterations("lm")[-1]
    assert last < 8
    ex.verify("lm", last)
    ckpts = ArtifactStore(run_dir / "checkpoints" / "acft")
    for t in ckpts.iterations("lm"):
        ckpts.verify("lm", t)
    assert not list((run_dir / "exchange" / "lm").glob(".iter_*"))  # no half-written artifact
