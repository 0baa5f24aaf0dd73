"""Built-in corpus, the built-in SentencePiece tokenizer through NeMo's own tokenizer class,
and the data readers."""

import json

import pytest

from nemo_acft.data import domains, generate_corpus, read_prompts, read_records
from nemo_acft.oracles import LexiconOracle


def test_corpus_is_seeded_and_its_toxicity_is_what_the_oracle_sees():
    a, b = generate_corpus(2000, seed=4), generate_corpus(2000, seed=4)
    assert a == b and a != generate_corpus(2000, seed=5)
    toxic = [r["toxic"] for r in a]
    assert 0.25 < sum(toxic) / len(toxic) < 0.35  # toxic_fraction=0.3
    # the generator's own flag agrees with the independent lexicon oracle on every record
    scores = LexiconOracle().score([r["text"] for r in a])
    assert [s == 0.0 for s in scores] == toxic
    assert {r["domain"] for r in a} == set(domains())
    chat_toxic = sum(r["toxic"] for r in a if r["domain"] == "chat") / sum(toxic)
    assert chat_toxic > 0.75
    assert sum(r["toxic"] for r in generate_corpus(500, toxic_fraction=0.0)) == 0
    with pytest.raises(ValueError, match="toxic_fraction=1.5"):
        generate_corpus(3, toxic_fraction=1.5)


def test_builtin_sentencepiece_through_nemo(tmp_path):
    """Trained offline on the corpus, loaded by NeMo's SentencePiece tokenizer (what the
    ``.nemo`` carries): every corpus text round-trips, decoding stops at EOS and drops pads and
    ids beyond the vocabulary, and the file is written under its final name only when whole."""
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    from nemo_acft.data import TextTokenizer, train_sentencepiece
    from nemo_acft.data.tokenizer import EOS_ID, PAD_ID

    corpus = generate_corpus(3000, seed=0)
    path = train_sentencepiece((r["text"] for r in corpus), tmp_path / "tok.model", 512)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.model"]
    tok = TextTokenizer(get_nmt_tokenizer(library="sentencepiece", tokenizer_model=str(path)))
    assert tok.eos_id == EOS_ID and tok.pad_id == PAD_ID and 50 < tok.vocab_size <= 512
    for r in corpus[:300]:
        assert tok.decode(tok.encode(r["text"])) == r["text"]
    ids = tok.encode("the rain was cold.")
    assert tok.decode([PAD_ID] + ids + [10_000, EOS_ID] + tok.encode("junk")) == \
        "the rain was cold."
    # every word of the grammar is one piece or a few: sequences stay short
    assert len(tok.encode(corpus[0]["text"])) <= 2 * len(corpus[0]["text"].split())


def test_readers_name_file_and_line_or_skip_and_count(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "hello", "domain": "chat"}) + "\n\n" +
                    json.dumps({"text": "bye"}) + "\n")
    recs, skipped = read_records(good)
    assert recs == [{"text": "hello", "domain": "chat"}, {"text": "bye", "domain": "general"}]
    assert skipped == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + "{broken\n" + json.dumps({"txt": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_records(bad)
    recs, skipped = read_records(bad, skip_malformed=True)
    assert [r["text"] for r in recs] == ["ok"] and skipped == 2
    plain = tmp_path / "p.txt"
    plain.write_text("first line\n\nsecond line\n")
    assert read_prompts(plain) == (["first line", "second line"], 0)
    pj = tmp_path / "p.jsonl"
    pj.write_text(json.dumps({"prompt": "the sky"}) + "\n" + json.dumps({"text": "my friend"}) + "\n")
    assert read_prompts(pj) == (["the sky", "my friend"], 0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")


def test_builtin_cache_keys_follow_the_files_contents_not_their_paths(tmp_path):
    """Two run folders with the same corpus written at different paths and times share the
    cached tokenizer and tiny GPT; one changed byte, another seed or another pre-training
    setting does not."""
    import copy
    import os

    from nemo_acft.algorithms.setup import builtin_keys

    def cfg_for(folder, text="a b c\n"):
        folder.mkdir()
        (folder / "train.jsonl").write_text(text)
        os.utime(folder / "train.jsonl", (1, 1) if folder.name == "a" else (2, 2))
        return {"seed": 1, "cache_dir": str(tmp_path / "cache"),
                "data": {"source": "files", "train_file": str(folder / "train.jsonl"),
                         "pretrain_file": str(folder / "train.jsonl"), "heldout_file": None},
                "pretrain": {"tokenizer": {"vocab_size": 64}, "optim": {"lr": 1e-3},
                             "steps": 10}}

    a, b = cfg_for(tmp_path / "a"), cfg_for(tmp_path / "b")
    assert builtin_keys(a) == builtin_keys(b)
    changed = cfg_for(tmp_path / "c", "a b d\n")
    assert builtin_keys(changed)["tokenizer"] != builtin_keys(a)["tokenizer"]
    other_seed = copy.deepcopy(a)
    other_seed["seed"] = 2
    assert builtin_keys(other_seed)["gpt"] != builtin_keys(a)["gpt"]
    longer = copy.deepcopy(a)
    longer["pretrain"]["steps"] = 20
    keys = builtin_keys(longer)
    assert keys["tokenizer"] == builtin_keys(a)["tokenizer"] and keys["gpt"] != builtin_keys(a)["gpt"]
