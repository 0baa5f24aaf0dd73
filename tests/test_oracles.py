"""Oracles: the protocol, the lexicon by hand, the TF-IDF oracle on real labelled data, errors."""

import json

import pytest

from nemo_acft.oracles import (LexiconOracle, SklearnTextOracle, build_oracle, read_labelled,
                               score_robust, to_labels)


def test_lexicon_matches_words_and_phrases_on_boundaries():
    oracle = build_oracle({"name": "lexicon"})
    texts = ["What a lovely day.", "You are an IDIOT!", "Stupidity is not a word we list.",
             "Please shut up now.", "shut the door", "clowns at the fair"]
    assert oracle.score(texts) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    custom = LexiconOracle(words=["bad apple"])
    assert custom.score(["one bad apple", "bad apples", "a bad"]) == [0.0, 1.0, 1.0]


def test_labels_threshold_and_none():
    assert to_labels([0.2, None, 0.9]) == [0.2, None, 0.9]
    assert to_labels([0.2, None, 0.5], threshold=0.5) == [0.0, None, 1.0]
    with pytest.raises(ValueError, match="threshold=1.5"):
        to_labels([0.1], threshold=1.5)


class _Flaky:
    """An oracle that fails on texts containing 'boom' and returns junk for 'nan'."""

    name = "flaky"

    def score(self, texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("service error")
        return [float("nan") if t == "nan" else 0.25 for t in texts]


def test_failed_items_become_none_not_zero():
    out = score_robust(_Flaky(), ["a", "boom", "b", "nan", "c"], batch_size=2)
    assert out == [0.25, None, 0.25, None, 0.25]


def test_sklearn_oracle_on_davidson(data_dir, tmp_path):
    """Trained on 80% of the Davidson tweets ('neither' satisfies), scored on the other 20%:
    far better than the majority rate, and it survives a save/load round trip."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    texts, labels = read_labelled(data_dir / "davidson_hate_offensive" / "labeled_data.csv",
                                  "csv", "tweet", "class", [2])
    assert len(texts) == 24783 and 0.1 < sum(labels) / len(labels) < 0.25
    tr_x, te_x, tr_y, te_y = train_test_split(texts, labels, test_size=0.2, random_state=0,
                                              stratify=labels)
    oracle = SklearnTextOracle.train(tr_x, tr_y)
    scores = oracle.score(te_x)
    auc = roc_auc_score(te_y, scores)
    acc = sum((s >= 0.5) == bool(y) for s, y in zip(scores, te_y)) / len(te_y)
    assert auc > 0.95, auc
    assert acc > 0.88, acc  # the majority class alone gives ~0.83
    oracle.save(tmp_path / "oracle.pkl")
    again = build_oracle({"name": "sklearn_text", "model_path": str(tmp_path / "oracle.pkl")})
    assert again.score(te_x[:50]) == scores[:50]


def test_sklearn_oracle_on_toxigen_seeds(data_dir):
    texts, labels = read_labelled(data_dir / "toxigen_seeds", "toxigen_dir")
    assert len(texts) > 600 and 0 < sum(labels) < len(labels)
    oracle = build_oracle({"name": "sklearn_text", "path": str(data_dir / "toxigen_seeds"),
                           "format": "toxigen_dir"})
    s = oracle.score(texts)
    train_acc = sum((x >= 0.5) == bool(y) for x, y in zip(s, labels)) / len(labels)
    assert train_acc > 0.9


def test_bad_oracle_configs_name_what_is_wrong(tmp_path, data_dir):
    with pytest.raises(ValueError, match="oracle.name='perspective'.*available"):
        build_oracle({"name": "perspective"})
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_oracle({"name": "sklearn_text", "path": str(tmp_path / "nope.csv")})
    with pytest.raises(ValueError, match="no column 'text'"):
        build_oracle({"name": "sklearn_text",
                      "path": str(data_dir / "davidson_hate_offensive" / "labeled_data.csv")})
    with pytest.raises(ValueError, match=r"satisfying_labels=\['7'\]"):
        read_labelled(data_dir / "davidson_hate_offensive" / "labeled_data.csv", "csv",
                      "tweet", "class", [7])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi", "label": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_labelled(bad, "jsonl")
    with pytest.raises(FileNotFoundError, match="words.txt"):
        build_oracle({"name": "lexicon", "path": str(tmp_path / "words.txt")})
    with pytest.raises(ValueError, match="oracle.path"):
        build_oracle({"name": "sklearn_text"})
