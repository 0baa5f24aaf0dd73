"""acft-train end to end on a shrunken built-in config, on real gloo worlds:

- the sequential schedule: summary, plot, TensorBoard, manifests, and the ``.nemo`` files (the
  plain one restores in stock ``MegatronGPTModel`` with the LM logits of θ_K; the one with the
  head round-trips the NADO logits);
- the parallel schedule with the LM group at TP = 2 and the oracle group at TP = 1: θ_k written
  at TP = 2 and read at TP = 1 (manifests), the oracle side's LM logits of θ_1 equal to the LM
  side's, and every block recomputed from the artifacts its manifest names;
- the LM group at PP = 2;
- kill -9 with q shipped from the oracle group, then a rerun: the same final weights, bit for
  bit (the chaos tests of both schedules are in tests/test_faults.py);
- SIGUSR1: a checkpoint, exit 143, and the rerun finishes; a side alone fails its handshake
  naming the directory; bad configs and files are rejected before anything is written.

The runs are driven from the test process (tests/run_utils.py: Hydra composes the config from
``conf/`` as the command line does; the worlds are forked), and ``acft-train`` itself runs once
as a subprocess.
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash

from tests.dist_utils import run_workers
from tests.run_utils import cli, compose, drive

PAR = ["schedule=parallel", "model.tensor_model_parallel_size=2", "trainer.devices=2",
       "model.acft.oracle_group.tensor_model_parallel_size=1"]


@pytest.fixture(scope="module")
def par_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("par") / "run"
    drive(compose(run_dir, cache, *PAR))
    return run_dir


def _manifest(run_dir, kind, k, store="exchange"):
    return json.loads((Path(run_dir) / store / kind / f"iter_{k:06d}" / "manifest.json").read_text())


def _checksums_hold(run_dir, kind, k):
    m = _manifest(run_dir, kind, k)
    root = Path(run_dir) / "exchange" / kind / f"iter_{k:06d}"
    return all(xxhash.xxh3_128((root / name).read_bytes()).hexdigest() == meta["xxh3_128"]
               for name, meta in m["files"].items())


def _weights(run_dir, kind, k, store="exchange"):
    """Every tensor of an artifact's distributed checkpoint files, by file and offset."""
    root = Path(run_dir) / store / kind / f"iter_{k:06d}"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.distcp"))}


def test_sequential_run(seq_run):
    summary = json.loads((seq_run / "summary.json").read_text())
    assert summary["schedule"] == "sequential"
    for side in ("baseline", "acft"):
        s = summary[side]
        assert 0.0 <= s["violation_rate"] <= 1.0 and s["ppl"] > 1.0
        assert 0.0 < s["distinct_2"] <= 1.0 and 0.0 <= s["repeat_rate"] < 1.0
    assert len(summary["iterations"]["acft"]) == 3
    assert (seq_run / "iterations.png").stat().st_size > 10_000
    assert list((seq_run / "tb").glob("*/events.out.tfevents.*"))
    for k in (1, 2):  # sequential: LM block k with φ_k; oracle block k from θ_(k−1)
        assert _manifest(seq_run, "lm", k)["based_on"] == {"lm": k - 1, "nado": k}
        assert _manifest(seq_run, "nado", k)["based_on"] == {"lm": k - 1, "nado": k - 1}
        assert _checksums_hold(seq_run, "lm", k) and _checksums_hold(seq_run, "nado", k)
    assert summary["nemo"]["plain"].endswith("acft_gpt.nemo")


def _served_worker(rank, world, run_dir):
    """θ_K and φ_K of the exchange in our model, against the two exported .nemo files restored
    by stock MegatronGPTModel and by MegatronGPTACFTModel."""
    import yaml
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import Run
    from nemo_acft.config import Layout

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    run = Run(cfg, "test", Layout(1, 1, 1))
    ex = ArtifactStore(Path(run_dir) / "exchange")
    K = cfg["model"]["acft"]["iterations"]
    run.model.load_part(ex.path("lm", K) / "trunk", "trunk")
    run.model.load_part(ex.path("nado", K) / "head", "head")
    x = run.data.heldout.tokens[:4, :-1]
    pos = torch.arange(x.shape[1]).expand_as(x)
    with torch.no_grad():
        z, s = run.model.module(x, pos, None)
        stock = MegatronGPTModel.restore_from(str(Path(run_dir) / "export" / "acft_gpt.nemo"),
                                              trainer=run.model.trainer)
        z_stock = stock.model(x, pos, None)
        from nemo_acft.models.build import build_model

        back = build_model(run.model_cfg, tp=1, pp=1, seed=0,
                           trainer_cfg={"devices": 1, "num_nodes": 1, "accelerator": "cpu",
                                        "precision": 32, "gradient_clip_val": None},
                           restore_from=str(Path(run_dir) / "export" / "acft_with_head.nemo"))
        z_back, s_back = back.module(x, pos, None)
        # NeMo's own MegatronGPTModel.generate calls self.cuda() (GPU only: scripts/
        # gpu_check.sh runs it); here the stock model's megatron-core module samples greedily
        # with our decode loop, and its tokenizer decodes
        from nemo_acft.models.generate import SamplingParams, generate

        ids = stock.tokenizer.text_to_ids("you are")
        sample = generate(stock.model, [ids], SamplingParams(max_new_tokens=6, top_k=1),
                          vocab_size=int(stock.tokenizer.vocab_size))
        text = stock.tokenizer.ids_to_text(sample.tokens[0].tolist())
    return {"stock_type": type(stock).__name__, "lm": (z_stock - z).abs().max().item(),
            "head_lm": (z_back - z).abs().max().item(), "head": (s_back - s).abs().max().item(),
            "s_max": s.abs().max().item(), "text": text,
            "tokenizer": stock.cfg.tokenizer.library}


def test_the_default_runs_nemo_files_serve(seq_run):
    """The plain .nemo: stock MegatronGPTModel restores it (SentencePiece tokenizer inside),
    its logits are the LM logits of θ_K exactly, and NeMo's own generate runs on it; the .nemo
    with the head round-trips the NADO logits."""
    (out,) = run_workers(_served_worker, 1, str(seq_run))
    assert out["stock_type"] == "MegatronGPTModel" and out["tokenizer"] == "sentencepiece"
    assert out["lm"] == 0.0 and out["head_lm"] == 0.0 and out["head"] == 0.0
    assert out["s_max"] > 0.0 and out["text"].startswith("you are")


def _theta0_worker(rank, world, run_dir, nemo):
    """θ_0 of a run started from a .nemo, against stock MegatronGPTModel's logits of it."""
    import yaml
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import Run
    from nemo_acft.config import Layout

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    run = Run(cfg, "test", Layout(1, 1, 1))
    run.model.load_part(ArtifactStore(Path(run_dir) / "exchange").path("lm", 0) / "trunk", "trunk")
    x = run.data.heldout.tokens[:3, :-1]
    pos = torch.arange(x.shape[1]).expand_as(x)
    with torch.no_grad():
        z, _ = run.model.module(x, pos, None)
        stock = MegatronGPTModel.restore_from(nemo, trainer=run.model.trainer)
        z_stock = stock.model(x, pos, None)
    return (z - z_stock).abs().max().item(), run.model_cfg.tokenizer.model


def test_a_run_from_a_nemo(seq_run, tmp_path, cache):
    """model.restore_from_path: the .nemo's config is the base (its tokenizer file extracted
    into run_dir/model/), the command line's keys on top, the head fresh; θ_0 is the .nemo's
    trunk exactly."""
    nemo = seq_run / "export" / "acft_gpt.nemo"
    run_dir = tmp_path / "from_nemo"
    drive(compose(run_dir, cache, f"model.restore_from_path={nemo}", "model.acft.iterations=1",
                  "model.acft.lambda=1.0"))
    info = json.loads((run_dir / "model" / "info.json").read_text())
    assert info["restore_from_path"] == str(nemo)
    (diff, tok), = run_workers(_theta0_worker, 1, str(run_dir), str(nemo))
    assert diff == 0.0 and tok.startswith(str(run_dir / "model"))
    assert _manifest(run_dir, "nado", 1)["read"]["nado"]["iteration"] == 0  # a fresh head
    assert (run_dir / "export" / "acft_gpt.nemo").is_file()


def test_parallel_run_manifests_tp2_to_tp1(par_run):
    summary = json.loads((par_run / "summary.json").read_text())
    assert summary["layouts"]["lm"]["tp"] == 2 and summary["layouts"]["oracle"]["tp"] == 1
    # LM block 1 as sequential (φ_1), then LM block k uses φ_(k−1); oracle block k samples θ_(k−1)
    assert _manifest(par_run, "lm", 1)["based_on"] == {"lm": 0, "nado": 1}
    assert _manifest(par_run, "lm", 2)["based_on"] == {"lm": 1, "nado": 1}
    assert _manifest(par_run, "nado", 2)["based_on"] == {"lm": 1, "nado": 1}
    lm1, nado2 = _manifest(par_run, "lm", 1), _manifest(par_run, "nado", 2)
    assert lm1["layout"]["tp"] == 2 and lm1["writer"]["world_size"] == 2
    assert nado2["read"]["lm"]["written_at"]["tp"] == 2
    assert nado2["read"]["lm"]["read_at"]["tp"] == 1
    assert _manifest(par_run, "lm", 2)["read"]["nado"]["written_at"]["tp"] == 1
    assert _manifest(par_run, "lm", 2)["read"]["nado"]["read_at"]["tp"] == 2
    status = {s: json.loads((par_run / "exchange" / "status" / f"{s}.json").read_text())
              for s in ("lm", "oracle")}
    assert all(st["state"] == "done" for st in status.values())
    assert len(status["lm"]["pids"]) == 2 and len(status["oracle"]["pids"]) == 1
    assert not set(status["lm"]["pids"]) & set(status["oracle"]["pids"])
    for kind in ("lm", "nado"):
        assert _checksums_hold(par_run, kind, 2)


def _theta1_logits_worker(rank, world, run_dir, tp, k=1):
    import yaml

    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import Run
    from nemo_acft.config import Layout
    from nemo_acft.models.generate import _gather_vocab
    from nemo_acft.models.parallel import tp_group

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    run = Run(cfg, "test", Layout(tp, 1, 1))
    run.model.load_part(ArtifactStore(Path(run_dir) / "exchange").path("lm", k) / "trunk",
                        "trunk")
    x = run.data.heldout.tokens[:4, :-1]
    with torch.no_grad():
        z, _ = run.model.module(x, torch.arange(x.shape[1]).expand_as(x), None)
    return _gather_vocab(z, tp_group())


def test_the_oracle_sides_logits_of_theta1_equal_the_lm_sides(par_run):
    """θ_1 in the LM group's layout (TP = 2, where it was trained) and in the oracle group's
    (TP = 1, resharded on load): the same LM logits within 1e-5 of their largest."""
    lm_side = run_workers(_theta1_logits_worker, 2, str(par_run), 2)[0]
    (oracle_side,) = run_workers(_theta1_logits_worker, 1, str(par_run), 1)
    torch.testing.assert_close(oracle_side, lm_side, rtol=1e-5,
                               atol=1e-5 * float(lm_side.abs().max()))


def _recompute_worker(rank, world, run_dir, what):
    """Recompute oracle block 2's samples (TP = 1) or LM block 2 (TP = 2) from the artifacts
    the manifests name, and from the wrong ones."""
    import yaml

    from nemo_acft.algorithms.blocks import regularizer
    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import Run
    from nemo_acft.config import Layout
    from nemo_acft.data import batch_indices
    from nemo_acft.models.generate import SamplingParams
    from nemo_acft.sampling import generate_batched

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    a = cfg["model"]["acft"]
    ex = ArtifactStore(Path(run_dir) / "exchange")
    out = {}
    if what == "samples":
        run = Run(cfg, "test", Layout(1, 1, 1))
        s = a["sampling"]
        pool = run.data.train_prompts
        idx = batch_indices(len(pool), a["oracle_block"]["prompts"], cfg["seed"], "prompts", 2)
        for lm_it in (1, 0):
            run.model.load_part(ex.path("lm", lm_it) / "trunk", "trunk")
            params = SamplingParams(max_new_tokens=s["max_new_tokens"], eos_id=run.tokenizer.eos_id,
                                    seed=cfg["seed"] * 1000 + 2)
            out[lm_it] = generate_batched(run.model, run.tokenizer, [pool[i] for i in idx],
                                          params, batch_size=s["batch_size"]).tokens
        return out
    run = Run(cfg, "test", Layout(2, 1, 1))
    m = run.model
    reg = regularizer(run, run.data.domains)
    S = a["steps_per_iteration"]
    for nado_it in (1, 2):
        m.configure_training("trunk", cfg["model"]["optim"], max_steps=a["iterations"] * S)
        m.load_part(ex.path("lm", 1) / "trunk", "trunk", with_optimizer=True)
        m.load_part(ex.path("nado", nado_it) / "head", "head")
        # q from the frozen reference: θ_1 with the same φ (model.acft.reference: frozen)
        m.set_reference(ex.path("lm", 1) / "trunk", ex.path("nado", nado_it) / "head")
        for step in range(S, 2 * S):
            batch = run.data.train.batch(batch_indices(len(run.data.train),
                                                       cfg["model"]["global_batch_size"],
                                                       cfg["seed"], "lm", step))
            m.lm_step(batch, reg, micro_batch_size=cfg["model"]["micro_batch_size"])
        out[nado_it] = {k: v.clone() for k, v in m.module.state_dict().items()
                        if torch.is_tensor(v) and not k.startswith("nado_head.")}
    m.load_part(ex.path("lm", 2) / "trunk", "trunk")
    out["theta2"] = {k: v.clone() for k, v in m.module.state_dict().items()
                     if torch.is_tensor(v) and not k.startswith("nado_head.")}
    return out


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_blocks_used_what_their_manifests_say(par_run):
    (s,) = run_workers(_recompute_worker, 1, str(par_run), "samples")
    from safetensors.torch import load_file

    samples = load_file(par_run / "exchange" / "nado" / "iter_000002" /
                        "samples.safetensors")["tokens"]
    assert torch.equal(s[1][:, :samples.shape[1]], samples)
    assert not torch.equal(s[0][:, :samples.shape[1]], samples)
    lm = run_workers(_recompute_worker, 2, str(par_run), "lm")[0]
    assert _same(lm[1], lm["theta2"])  # LM block 2 used φ_1, bit for bit
    assert not _same(lm[2], lm["theta2"])


def test_reference_base_and_kl_on_both(tmp_path, cache):
    """reference=base: every oracle block samples from θ_0 and every LM block's q comes from
    θ_0 (manifests); kl_on=both: the KL on the oracle block's samples is in the step's
    metrics; the calibration report and the collapse diagnostics are written and summarised."""
    run_dir = tmp_path / "base"
    drive(compose(run_dir, cache, "model.acft.reference=base", "model.acft.kl_on=both",
                  "model.acft.sample_lambda=3.0"))
    for k in (1, 2):
        assert _manifest(run_dir, "nado", k)["based_on"]["lm"] == 0
        lm = _manifest(run_dir, "lm", k)
        assert lm["read"]["reference"]["iteration"] == 0
        assert lm["metrics"]["samples_kl"] > 0 and lm["metrics"]["samples_penalty"] > 0
        calib = _manifest(run_dir, "nado", k)["calibration"]
        report = json.loads((run_dir / "diagnostics" / f"calibration_iter_{k}.json").read_text())
        assert calib["ece"] == pytest.approx(report["ece"]) and 0 <= calib["ece"] <= 1
        assert len(report["z"]) == report["prompts"] == 8
        assert all(0 <= z <= 1 for z in report["z"])
    assert (run_dir / "diagnostics" / "calibration_iter_2.png").stat().st_size > 5_000
    assert (run_dir / "diagnostics" / "collapse.png").stat().st_size > 5_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference"] == "base" and summary["kl_on"] == "both"
    diag = summary["diagnostics"]
    assert [r["iteration"] for r in diag] == [1, 2]
    for r in diag:
        assert r["reference_iteration"] == 0 and r["entropy_p"] > 0 and r["delta_z"] >= 0
        assert 0 < r["distinct_2"] <= 1
    assert set(summary["checks"]) >= {"violation_at_most_half", "distinct_2_at_least_0.9x"}


def test_lm_group_at_pp2(tmp_path, cache):
    run_dir = tmp_path / "pp2"
    drive(compose(run_dir, cache, "schedule=parallel", "model.pipeline_model_parallel_size=2",
                  "trainer.devices=2", "model.acft.iterations=1"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layouts"]["lm"]["pp"] == 2
    assert _manifest(run_dir, "lm", 1)["layout"]["pp"] == 2
    assert _manifest(run_dir, "lm", 1)["read"]["nado"]["read_at"]["pp"] == 2
    assert 0.0 <= summary["acft"]["violation_rate"] <= 1.0


class _Killer(threading.Thread):
    """Waits for ``path_glob`` under ``root``, sleeps a random 0-0.4 s (seeded), then SIGKILLs
    every process of the ``world`` the test process forked (multiprocessing's children named
    ``<world>-<rank>``) or sends ``sig`` to this process."""

    def __init__(self, root, path_glob, world=None, sig=None, seed=0):
        super().__init__(daemon=True)
        self.root, self.glob, self.world, self.sig = Path(root), path_glob, world, sig
        self.delay = random.Random(seed).uniform(0.0, 0.4)
        self.done = False
        self.start()

    def run(self):
        import multiprocessing as mp

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(self.root.glob(self.glob)):
            time.sleep(0.02)
        time.sleep(self.delay)
        if self.sig is not None:
            os.kill(os.getpid(), self.sig)
        else:
            for p in mp.active_children():
                if p.name.startswith(f"{self.world}-"):
                    os.kill(p.pid, signal.SIGKILL)
        self.done = True


def _kill_then_rerun(run_dir, cfg, kills) -> None:
    """For each ``(world, path_glob)`` of ``kills``: run ``cfg`` and SIGKILL that world once the
    path appears (the run must fail), then a run to the end."""
    for i, (world, point) in enumerate(kills):
        killer = _Killer(run_dir, point, world=world, seed=i)
        with pytest.raises((RuntimeError, SystemExit)):
            drive(cfg)
        killer.join(5)
        assert killer.done, f"{point} never appeared"
    drive(cfg)


def test_sigusr1_checkpoints_and_stops_then_resumes(tmp_path, cache):
    """Slurm's time-limit signal: the LM block writes a checkpoint at the current step, the
    worlds exit 143, and the same command then finishes the run."""
    run_dir = tmp_path / "usr1"
    cfg = compose(run_dir, cache, "model.acft.save_every=0", "model.acft.steps_per_iteration=40")
    killer = _Killer(run_dir, "exchange/lm/iter_000001/manifest.json", sig=signal.SIGUSR1)
    with pytest.raises(SystemExit) as e:
        drive(cfg)
    killer.join(5)
    assert e.value.code == 143
    assert not (run_dir / "exchange" / "lm" / "iter_000002").exists()
    drive(cfg)
    assert (run_dir / "summary.json").is_file()


def test_acft_train_command_line(tmp_path, cache):
    """The entry point itself: Hydra's override errors before anything is written. (That a
    rerun of a finished run trains nothing again, prints ``done:`` and leaves the .nemo files
    in place: tests/test_run_lock.py, whose first driver is such a rerun.)"""
    run_dir = tmp_path / "cli"
    p = cli(run_dir, cache, "model.acft.lamda=1", timeout=120)
    assert p.returncode == 2 and "Could not override 'model.acft.lamda'" in p.stderr + p.stdout
    assert not run_dir.exists()


def test_bad_configs_fail_before_anything_is_written(tmp_path, cache):
    from nemo_acft.train import start

    run_dir = tmp_path / "bad"
    for extra, message in [
        (["schedule=sideways"], "config schedule='sideways': expected one of"),
        (["oracle.name=perspective"], "config oracle.name='perspective': expected one of"),
        (["+model.acft.domain_lambdas.sport=1.0"],
         "model.acft.domain_lambdas names domains ['sport']"),
        (["data.source=files", "data.train_file=/nonexistent.jsonl"],
         "config data.train_file='/nonexistent.jsonl': expected an existing file"),
        (["model.acft.delta=1.5"], "config model.acft.delta=1.5: expected null or a number"),
        (["model.acft.delta=0.95", "model.acft.min_z=0.99"],
         "config model.acft.min_z=0.99: expected a number in [0, "),
        (["model.global_batch_size=15", "trainer.devices=2"],
         "config model.global_batch_size=15: expected a multiple of the LM group's data "
         "parallel size 2"),
        (["model.tensor_model_parallel_size=3", "trainer.devices=3"],
         "tensor_model_parallel_size=3 does not divide model.num_attention_heads=4"),
        (["model.pipeline_model_parallel_size=2", "trainer.devices=2"],
         "the sequential schedule samples in the LM group's layout"),
        (["model.acft.oracle_group.tensor_model_parallel_size=2",
          "model.acft.oracle_group.devices=2", "pretrain.model.make_vocab_size_divisible_by=1",
          "pretrain.tokenizer.vocab_size=301"],  # an odd vocabulary: 301 and 302
         "pads to different sizes in the two groups (TP 1: "),
        (["model.acft.reference=current", "model.acft.reference_on=oracle"],
         "config model.acft.reference='current': expected frozen or base with "
         "model.acft.reference_on=oracle"),
        (["model.acft.reference_on=oracle", "model.acft.kl_on=both"],
         "config model.acft.kl_on='both': expected corpus with model.acft.reference_on=oracle"),
        (["model.acft.reference_on=gpu"], "config model.acft.reference_on='gpu': expected one"),
        (["model.restore_from_path=/nonexistent.nemo"],
         "config model.restore_from_path='/nonexistent.nemo': expected null or an existing"),
    ]:
        with pytest.raises(ValueError) as e:
            start(compose(run_dir, cache, *extra))
        assert message in str(e.value), (extra, str(e.value))
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "model").exists()


def test_rerun_with_a_different_config_is_refused(tmp_path, cache):
    """Once anything was computed with a run's config, a different one is refused; before (a
    first attempt that failed before θ_0), the new config replaces it."""
    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import write_run_config

    cfg = compose(tmp_path / "r", cache)
    write_run_config(cfg)
    write_run_config({**cfg, "progress": True})  # volatile keys may change
    other = compose(tmp_path / "r", cache, "model.acft.lambda=3.0")
    write_run_config(other)  # nothing computed yet: replaced
    assert "lambda: 3.0" in (tmp_path / "r" / "config.yaml").read_text()
    ArtifactStore(tmp_path / "r" / "exchange").publish("lm", 0, lambda tmp: None, {})
    with pytest.raises(ValueError, match=r"different config \(keys: model.acft.lambda\)"):
        write_run_config(cfg)


def test_malformed_data_file_is_named(tmp_path, cache):
    from nemo_acft.train import start

    good = tmp_path / "train.jsonl"
    good.write_text('{"text": "a b c", "domain": "x"}\n{"text": 5}\n')
    held = tmp_path / "held.txt"
    held.write_text("some held out text\n")
    files = ["data.source=files", f"data.train_file={good}", f"data.heldout_file={held}"]
    with pytest.raises(ValueError, match=r"train.jsonl:2: malformed data line"):
        start(compose(tmp_path / "m", cache, *files))
    from nemo_acft.data.run_data import records

    cfg = compose(tmp_path / "m", cache, *files, "data.skip_malformed=true")
    pre, train, _, _, names = records(cfg["data"], 0)
    assert len(train) == 1 and names == ["general", "x"]


def test_a_side_alone_fails_the_handshake_with_the_directory_named(tmp_path, cache):
    """The LM side without an oracle side (a group that cannot see the run directory looks
    the same): a clear error after the handshake timeout, status 'failed'."""
    from nemo_acft.train import run_role, start

    run_dir = tmp_path / "alone"
    base = compose(run_dir, cache, *PAR)
    start(base)
    run_role(compose(run_dir, cache, *PAR, "role=prepare"))
    t0 = time.monotonic()
    cfg = compose(run_dir, cache, *PAR, "role=lm", "model.acft.exchange.handshake_timeout_s=3",
                  "model.acft.exchange.heartbeat_s=0.5",
                  "model.acft.exchange.heartbeat_timeout_s=2")
    with pytest.raises(RuntimeError, match="the lm world failed"):
        run_role(cfg)
    assert time.monotonic() - t0 < 60
    status = json.loads((run_dir / "exchange" / "status" / "lm.json").read_text())
    assert status["state"] == "failed" and "did not report" in status["error"]
    assert str((run_dir / "exchange").resolve()) in status["error"]


def test_liveness_from_status_and_heartbeat(tmp_path):
    """Dead on 'failed'/'stopped' at once, or once the beat stops advancing for stale_s; an old
    status file does not pass the handshake, an advancing one does."""
    from nemo_acft.algorithms.coordination import Heartbeat, Liveness, handshake, write_status
    from nemo_acft.algorithms.exchange import ArtifactStore

    store = ArtifactStore(tmp_path / "exchange")
    alive = Liveness(store, "oracle", stale_s=0.6)
    assert alive()  # no status yet: the timeouts cover a side that never starts
    write_status(store, "oracle", "running", beat=1)  # a dead process's last word
    assert alive()
    time.sleep(0.8)
    assert not alive() and "has not advanced" in alive.reason
    with pytest.raises(RuntimeError, match="did not advance"):
        handshake(store, "lm", "oracle", timeout_s=0.5)
    beat = Heartbeat(store, "oracle", every_s=0.1)
    try:
        alive = Liveness(store, "oracle", stale_s=0.6)
        for _ in range(10):
            assert alive()
            time.sleep(0.1)
        handshake(store, "lm", "oracle", timeout_s=5)
    finally:
        beat.finish("failed", error="boom")
    assert not alive() and "reported 'failed'" in alive.reason and "boom" in alive.reason


def test_the_llama_config_composes_for_files_data(tmp_path):
    """conf/llama7b_tp4pp2.yaml with a user's files data validates: no domain of the built-in
    corpus is left in model.acft.domain_lambdas (Hydra merges mappings; the built-in's
    {chat: 4.0} lives in tiny_cpu.yaml), and its layouts are the documented ones."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_acft.config import lm_layout, oracle_layout, validate
    from tests.run_utils import REPO

    nemo = tmp_path / "llama.nemo"
    nemo.write_bytes(b"")
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a b c", "domain": "wiki"}\n')
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="llama7b_tp4pp2", overrides=[
            f"model.restore_from_path={nemo}", f"data.train_file={train}",
            f"data.heldout_file={train}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    validate(plain)
    assert plain["model"]["acft"]["domain_lambdas"] == {}
    assert (lm_layout(plain).tp, lm_layout(plain).pp) == (4, 2)
    assert oracle_layout(plain).tp == 4


SHIPPED = [*PAR, "model.acft.reference_on=oracle", "model.acft.reference_top_k=100000"]


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("shipped") / "run"
    drive(compose(run_dir, cache, *SHIPPED))
    return run_dir


def test_parallel_run_with_q_from_the_oracle_group(shipped_run, par_run):
    """reference_on=oracle, LM group TP 2, oracle group TP 1, q of the whole vocabulary
    (top_k above it): the oracle side publishes each LM step's q (and deletes those of finished
    blocks), the LM block runs no reference, and the run is the in-step reference's
    (``par_run``, reference_on=lm) up to rounding: the blocks' metrics and θ_2's logits."""
    run_dir = shipped_run
    q = sorted((run_dir / "exchange" / "q").glob("iter_*"))
    assert [p.name for p in q] == [f"iter_{t:06d}" for t in range(13, 25)]  # block 2's
    man = json.loads((q[0] / "manifest.json").read_text())
    assert man["based_on"] == {"lm": 1, "nado": 1} and man["block"] == 2
    for k in (1, 2):
        mine, theirs = _manifest(run_dir, "lm", k), _manifest(par_run, "lm", k)
        assert "q" in mine["read"]["reference"] and "lm" not in mine["read"]["reference"]
        assert "nado" not in mine["read"] and mine["based_on"]["nado"] == 1
        for key in ("lm_loss", "kl", "penalty", "mean_z"):
            assert mine["metrics"][key] == pytest.approx(theirs["metrics"][key], rel=2e-3,
                                                         abs=1e-5), (k, key)
    a, b = (run_workers(_theta1_logits_worker, 1, str(d), 1, 2)[0] for d in (run_dir, par_run))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)


def test_kill_9_with_q_from_the_oracle_group_resumes_bit_for_bit(tmp_path, cache, shipped_run):
    """reference_on=oracle: the oracle group killed while it publishes LM block 1's q (the LM
    block waiting on it), then the LM group inside LM block 2; the reruns recompute the missing
    q in the same groups and end with the uninterrupted run's θ_2 and φ_2, bit for bit."""
    run_dir = tmp_path / "killed"
    _kill_then_rerun(run_dir, compose(run_dir, cache, *SHIPPED),
                     [("oracle", "exchange/q/iter_000003/manifest.json"),
                      ("lm", "checkpoints/acft/lm/iter_000016/manifest.json")])
    for kind in ("lm", "nado"):
        assert _weights(shipped_run, kind, 2) == _weights(run_dir, kind, 2), kind
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["acft"] == json.loads((shipped_run / "summary.json").read_text())["acft"]
    assert not list((run_dir / "exchange").glob("*/.iter_*tmp*"))
