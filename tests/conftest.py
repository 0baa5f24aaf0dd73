import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (ACFT_DATA_DIR, default ../shared/data beside the checkout)."""
    path = Path(os.environ.get("ACFT_DATA_DIR",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (path / "davidson_hate_offensive").is_dir():
        pytest.skip(f"real data not found at {path} (set ACFT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """The built-in tokenizer and tiny GPT's cache, shared by every run of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def seq_run(tmp_path_factory, cache) -> Path:
    """The shrunken built-in default (tests/run_utils.py's FAST), sequential schedule, run
    uninterrupted: the reference of the training and fault tests."""
    from tests.run_utils import compose, drive

    run_dir = tmp_path_factory.mktemp("seq") / "run"
    drive(compose(run_dir, cache))
    return run_dir


@pytest.fixture(scope="session")
def bert_classifier(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier folder (labels benign / toxic, a ``vocab.txt`` that
    transformers turns into a fast tokenizer)."""
    pytest.importorskip("transformers")
    from tests.hf_utils import tiny_bert

    import transformers

    folder = tmp_path_factory.mktemp("bert") / "clf"
    model, _ = tiny_bert(folder, 2, id2label={0: "benign", 1: "toxic"})
    model.save_pretrained(folder)
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random Hugging Face Llama folder (tests/hf_utils.py: BPE tokenizer.json)."""
    pytest.importorskip("transformers")
    from tests.hf_utils import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def nemo(hf_dir, tmp_path_factory) -> Path:
    """That Llama as a .nemo for TP up to 2, by ``acft-convert hf-to-nemo`` (its tokenizer is
    NeMo's ``huggingface`` one, in a folder beside it)."""
    from tests.run_utils import convert

    out = tmp_path_factory.mktemp("nemo") / "tiny-llama.nemo"
    r = convert("hf-to-nemo", "--hf", hf_dir, "--out", out, "--tensor-model-parallel-size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {out}" in r.stdout
    return out
