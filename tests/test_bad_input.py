"""Bad input, as a user gives it: each case runs an entry point's ``main`` (in this process: the
same function the console scripts call) and must exit 2 with one line on stderr, ``error: ...``,
naming the offending file, key or value, no traceback, and leave the run directory (or output)
exactly as it was. Two cases run the commands themselves in a subprocess."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.run_utils import FAST, REPO

PAR = ["schedule=parallel", "model.tensor_model_parallel_size=2", "trainer.devices=2",
       "model.acft.oracle_group.tensor_model_parallel_size=1"]


class Payload:
    """A pickle that runs code when it is loaded: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def tree(root: Path) -> dict:
    """Every path under ``root`` with its size and modification time (empty: it does not
    exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} | {".": "exists"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, bert_classifier, seq_run):
    """The inputs the cases point at."""
    d = tmp_path_factory.mktemp("inputs")
    f = {"d": d, "bert": bert_classifier, "nemo_ok": seq_run / "export" / "acft_gpt.nemo"}
    (d / "empty.txt").write_text("")
    (d / "blank.jsonl").write_text("\n \n\n")
    (d / "latin1.txt").write_bytes("one line\ntwo line\ncaf\xe9 three\n".encode("latin-1"))
    (d / "bad.jsonl").write_text('{"text": "fine", "domain": "x"}\n{"text": 5}\n')
    (d / "good.txt").write_text("a sentence of held out text\nanother one\n")
    (d / "not_a.nemo").write_bytes(b"\x89PNG not a tar at all" * 50)
    data = f["nemo_ok"].read_bytes()
    (d / "truncated.nemo").write_bytes(data[: len(data) // 3])
    with tarfile.open(d / "no_weights.nemo", "w") as tar:
        cfg = d / "model_config.yaml"
        cfg.write_text("num_layers: 2\n")
        tar.add(cfg, arcname="./model_config.yaml")
    lm = d / "causal_lm"
    from tests.hf_utils import tiny_llama

    tiny_llama(lm, vocab=300)
    (d / "clf_no_head").mkdir()
    import shutil

    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (bert_classifier / name).exists():
            shutil.copy(bert_classifier / name, d / "clf_no_head" / name)
    from safetensors.torch import load_file, save_file

    sd = load_file(bert_classifier / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("classifier")},
              d / "clf_no_head" / "model.safetensors")
    with open(d / "oracle.pkl", "wb") as fh:
        pickle.dump(Payload(str(d / "pickle_ran")), fh)
    import torch

    torch.save({"config": Payload(str(d / "pickle_ran")), "state_dict": {}}, d / "detox.ckpt")
    (d / "out_full").mkdir()
    (d / "out_full" / "mine.txt").write_text("the user's file")
    (d / "hf_no_config").mkdir()
    return f


def _files_data(f, train: str) -> list:
    return ["data.source=files", f"data.train_file={train}",
            f"data.heldout_file={f['d'] / 'good.txt'}"]


def _hf_oracle(path, labels: str) -> list:
    return ["oracle.name=hf_classifier", f"+oracle.path={path}",
            f"+oracle.violating_labels=[{labels}]"]


#: (id, entry point, its arguments from (inputs, run_dir), what the error line must say);
#: acft-train's arguments come after run_dir=, cache_dir= and tests/run_utils.py's FAST
CASES = [
    ("unknown key", "train", lambda f, r: ["model.acft.lamda=1"],
     "Could not override 'model.acft.lamda'"),
    ("unknown key added with +", "train", lambda f, r: ["+model.acft.iteratons=3"],
     "config model.acft.iteratons: not a key of acft-train's config"),
    ("unknown section key", "train", lambda f, r: ["+data.shuffle=true"],
     "config data.shuffle: not a key"),
    ("unknown trainer key", "train", lambda f, r: ["+trainer.max_steps=5"],
     "config trainer.max_steps: not a key"),
    ("bad schedule", "train", lambda f, r: ["schedule=sideways"],
     "config schedule='sideways': expected one of"),
    ("unknown oracle", "train", lambda f, r: ["oracle.name=perspective"],
     "config oracle.name='perspective': expected one of"),
    ("zero iterations", "train", lambda f, r: ["model.acft.iterations=0"],
     "config model.acft.iterations=0: expected a positive integer"),
    ("delta out of range", "train", lambda f, r: ["model.acft.delta=1.5"],
     "config model.acft.delta=1.5: expected null or a number in (0, 1]"),
    ("batch not a multiple of DP", "train",
     lambda f, r: ["model.global_batch_size=15", "trainer.devices=2"],
     "config model.global_batch_size=15: expected a multiple of the LM group's data parallel"),
    ("TP does not divide the heads", "train",
     lambda f, r: ["model.tensor_model_parallel_size=3", "trainer.devices=3"],
     "tensor_model_parallel_size=3 does not divide model.num_attention_heads=4"),
    ("heartbeat bound", "train", lambda f, r: ["model.acft.exchange.heartbeat_timeout_s=1"],
     "heartbeat_timeout_s: expected at least 3 x"),
    ("q shipped with the KL on samples", "train",
     lambda f, r: ["model.acft.reference_on=oracle", "model.acft.kl_on=both"],
     "config model.acft.kl_on='both': expected corpus"),
    ("role lm of a sequential run", "train", lambda f, r: ["role=lm"],
     "config schedule='sequential': expected parallel with role=lm"),
    ("role finish before prepare", "train", lambda f, r: ["role=finish"],
     "holds no prepared run"),
    ("role lm before prepare", "train", lambda f, r: ["role=lm", *PAR],
     "run role=prepare first"),
    ("config file that does not exist", "train", lambda f, r: ["--config-name", "nope"],
     "--config-name nope: no nope.yaml"),
    ("missing train file", "train", lambda f, r: _files_data(f, "/nonexistent/train.jsonl"),
     "config data.train_file='/nonexistent/train.jsonl': expected an existing file"),
    ("train file is a folder", "train", lambda f, r: _files_data(f, f["d"]),
     "data.train_file="),
    ("train file not UTF-8", "train", lambda f, r: _files_data(f, f["d"] / "latin1.txt"),
     "latin1.txt:3: not UTF-8 (byte 0xe9"),
    ("malformed JSONL line", "train", lambda f, r: _files_data(f, f["d"] / "bad.jsonl"),
     "bad.jsonl:2: malformed data line"),
    ("train file without a record", "train",
     lambda f, r: _files_data(f, f["d"] / "blank.jsonl"), "blank.jsonl has no records"),
    ("empty prompts file", "train", lambda f, r: [f"data.prompts_file={f['d'] / 'empty.txt'}"],
     "empty.txt has no records"),
    ("missing prompts file of a built-in run", "train",
     lambda f, r: ["data.prompts_file=/nonexistent/prompts.txt"],
     "config data.prompts_file='/nonexistent/prompts.txt': expected null or an existing file"),
    ("unknown domain for λ", "train", lambda f, r: ["+model.acft.domain_lambdas.sport=1.0"],
     "model.acft.domain_lambdas names domains ['sport']"),
    (".nemo that is not a tar", "train",
     lambda f, r: [f"model.restore_from_path={f['d'] / 'not_a.nemo'}"],
     "not_a.nemo: not a readable .nemo"),
    ("truncated .nemo", "train",
     lambda f, r: [f"model.restore_from_path={f['d'] / 'truncated.nemo'}"],
     "truncated.nemo: not a readable .nemo"),
    (".nemo without weights", "train",
     lambda f, r: [f"model.restore_from_path={f['d'] / 'no_weights.nemo'}"],
     "no_weights.nemo: the .nemo holds no weights"),
    ("classifier oracle on a causal LM", "train",
     lambda f, r: _hf_oracle(f["d"] / "causal_lm", "LABEL_1"), "is not a sequence classifier"),
    ("classifier without its head", "train",
     lambda f, r: _hf_oracle(f["d"] / "clf_no_head", "toxic"),
     "weights have no classification head"),
    ("classifier label that does not exist", "train",
     lambda f, r: _hf_oracle(f["bert"], "hateful"),
     "label(s) ['hateful'] not in the model's labels"),
    ("misspelled oracle key", "train", lambda f, r: ["+oracle.pathh=/x"],
     "oracle.pathh: not a key of the lexicon oracle"),
    ("lexicon file missing", "train", lambda f, r: ["+oracle.path=/nonexistent/words.txt"],
     "words.txt"),
    ("pickled sklearn oracle", "train",
     lambda f, r: ["oracle.name=sklearn_text", f"+oracle.model_path={f['d'] / 'oracle.pkl'}"],
     "oracle.pkl: not a skops file"),
    ("pickled Detoxify checkpoint", "train",
     lambda f, r: ["oracle.name=detoxify", f"+oracle.checkpoint={f['d'] / 'detox.ckpt'}",
                   f"+oracle.hf_config_path={f['bert']}"], "loads with weights_only=True"),
    ("nemo-to-hf of a file that is not a .nemo", "convert",
     lambda f, r: ["nemo-to-hf", "--nemo", f["d"] / "not_a.nemo", "--out", r / "hf"],
     "not_a.nemo: not a readable .nemo"),
    ("nemo-to-hf into a folder with files", "convert",
     lambda f, r: ["nemo-to-hf", "--nemo", f["nemo_ok"], "--out", f["d"] / "out_full"],
     "out_full exists and is not empty; pass --overwrite"),
    ("hf-to-nemo of a folder without config.json", "convert",
     lambda f, r: ["hf-to-nemo", "--hf", f["d"] / "hf_no_config", "--out", r / "m.nemo"],
     "hf_no_config"),
    ("acft-eval of a folder that is not a run", "eval",
     lambda f, r: ["--run-dir", f["d"], "--out", r / "ev"], "no config.yaml"),
    ("acft-eval into a folder with files", "eval",
     lambda f, r: ["--nemo", f["nemo_ok"], "--out", f["d"] / "out_full"],
     "out_full exists and is not empty"),
    ("acft-eval of a truncated .nemo", "eval",
     lambda f, r: ["--nemo", f["d"] / "truncated.nemo", "--prompts", f["d"] / "good.txt",
                   "--out", r / "ev"], "truncated.nemo: not a readable .nemo"),
    ("acft-eval --compare of a folder without metrics", "eval",
     lambda f, r: ["--compare", f["d"], "--out", r / "cmp"], "no metrics.json"),
    ("acft-export of a plain GPT .nemo", "export",
     lambda f, r: ["--nemo", f["nemo_ok"], "--out", r / "x.nemo"], "not an ACFT .nemo"),
]


def _main(entry: str):
    from nemo_acft.cli.convert import main as convert
    from nemo_acft.cli.eval import main as evaluate
    from nemo_acft.cli.export import main as export
    from nemo_acft.train import main as train

    return {"train": train, "convert": convert, "eval": evaluate, "export": export}[entry]


@pytest.mark.parametrize("name, entry, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(name, entry, args, expected, files,
                                                          tmp_path, cache, capsys):
    run_dir = tmp_path / "run"
    argv = [str(a) for a in args(files, run_dir)]
    if entry == "train":
        argv = [f"run_dir={run_dir}", f"cache_dir={cache}", *FAST, *argv]
    watched = [run_dir, files["d"]]
    before = [tree(p) for p in watched]
    with pytest.raises(SystemExit) as e:
        _main(entry)(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert e.value.code == 2, err[-3000:]
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], lines[-3:]
    assert "Traceback" not in err, err[-3000:]
    assert [tree(p) for p in watched] == before, "something was written"
    assert not (files["d"] / "pickle_ran").exists(), "a pickle handed over ran code"


def test_the_case_table_is_big_enough():
    assert len(CASES) >= 30


def test_the_command_prints_one_line_and_the_traceback_only_under_acft_debug(tmp_path):
    """The console script itself: the error is the whole of stderr; ACFT_DEBUG=1 adds the
    traceback."""
    import os

    cmd = [sys.executable, "-m", "nemo_acft.train", f"run_dir={tmp_path / 'run'}",
           "+model.acft.iteratons=3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config model.acft.iteratons: not a key of acft-train's config (acft.yaml holds "
        "every key); did you mean model.acft.iterations or model.acft.calibration.bins?"], r.stderr
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ACFT_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert not (tmp_path / "run").exists()


def _loads(path: Path):
    """``(line, call)`` of every ``torch.load(...)``, ``pickle.load(s)``, ``joblib.load`` and
    ``dill.load`` call in a source file."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                node.func.value, ast.Name) and node.func.attr in ("load", "loads"):
            if node.func.value.id in ("torch", "pickle", "joblib", "dill"):
                yield node.lineno, node


def test_source_loads_no_pickle_it_was_handed():
    """Every torch.load in the package and the benchmarks passes weights_only=True; nothing
    calls pickle, joblib or dill to load."""
    bad = []
    sources = sorted((REPO / "nemo_acft").rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    for path in sources:
        for line, call in _loads(path):
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            safe = (call.func.value.id == "torch" and weights_only
                    and getattr(weights_only[0].value, "value", None) is True)
            if not safe:
                bad.append(f"{path.relative_to(REPO)}:{line}")
    assert not bad, bad
    planted = REPO / "tests" / "test_bad_input.py"  # the checker itself finds one
    assert [ln for ln, _ in _loads(planted)] == [PLANTED_LINE]


def _planted():
    return pickle.loads(b"")  # noqa: S301 - never called: what the checker must find


PLANTED_LINE = _planted.__code__.co_firstlineno + 1
