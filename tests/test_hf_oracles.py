"""The Detoxify and HF-classifier oracles on tiny models the tests build (nothing downloaded).

The reference is the classifier run directly with transformers on the same weights; a loader
that left weights at random init, or read the wrong class column, gives other scores.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("detoxify")

from nemo_acft.oracles import build_oracle  # noqa: E402

from tests.hf_utils import tiny_bert as _tiny_bert  # noqa: E402

TEXTS = ["you are a nice person", "what a stupid idiot", "good day", "idiot"]


def _reference_logits(model, tokenizer, texts):
    with torch.no_grad():
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        return model(**inputs).logits.float()


def test_tokenizer_saved_by_the_test_is_not_all_unknown(tmp_path):
    _, tok = _tiny_bert(tmp_path / "m", 2)
    assert tok.convert_tokens_to_ids(["idiot", "nice"]) == [9, 8]


def test_detoxify_oracle_loads_a_local_checkpoint(tmp_path):
    model, tok = _tiny_bert(tmp_path / "hf", 3)
    ckpt = tmp_path / "detox.ckpt"
    torch.save({"config": {"arch": {"args": {
        "model_type": "bert-base-uncased",  # the hub name a real checkpoint stores
        "model_name": "BertForSequenceClassification", "tokenizer_name": "BertTokenizer",
        "num_classes": 3}}, "dataset": {"args": {"classes": ["obscene", "toxic", "insult"]}}},
        "state_dict": model.state_dict()}, ckpt)
    oracle = build_oracle({"name": "detoxify", "checkpoint": str(ckpt),
                           "hf_config_path": str(tmp_path / "hf")})
    expected = 1.0 - torch.sigmoid(_reference_logits(model, tok, TEXTS)[:, 1])  # "toxic" column
    got = torch.tensor(oracle.score(TEXTS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.std() > 0.05  # the texts really score differently
    insult = build_oracle({"name": "detoxify", "checkpoint": str(ckpt), "attribute": "insult",
                           "hf_config_path": str(tmp_path / "hf")})
    expected = 1.0 - torch.sigmoid(_reference_logits(model, tok, TEXTS)[:, 2])
    torch.testing.assert_close(torch.tensor(insult.score(TEXTS)), expected, rtol=1e-5, atol=1e-6)


def test_detoxify_oracle_errors(tmp_path):
    model, _ = _tiny_bert(tmp_path / "hf", 2)
    with pytest.raises(FileNotFoundError, match="checkpoint file .*nope.ckpt does not exist"):
        build_oracle({"name": "detoxify", "checkpoint": str(tmp_path / "nope.ckpt"),
                      "hf_config_path": str(tmp_path / "hf")})
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": model.state_dict()}, bad)
    with pytest.raises(ValueError, match="bad.ckpt is not a Detoxify checkpoint.*'config'"):
        build_oracle({"name": "detoxify", "checkpoint": str(bad),
                      "hf_config_path": str(tmp_path / "hf")})
    ok = tmp_path / "ok.ckpt"
    torch.save({"config": {"arch": {"args": {
        "model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
        "tokenizer_name": "BertTokenizer", "num_classes": 2}},
        "dataset": {"args": {"classes": ["toxic", "obscene"]}}},
        "state_dict": model.state_dict()}, ok)
    with pytest.raises(ValueError, match=r"attribute 'threat' is not a class.*'toxicity'"):
        build_oracle({"name": "detoxify", "checkpoint": str(ok), "attribute": "threat",
                      "hf_config_path": str(tmp_path / "hf")})
    with pytest.raises(FileNotFoundError, match="folder .*missing does not exist"):
        build_oracle({"name": "detoxify", "checkpoint": str(ok),
                      "hf_config_path": str(tmp_path / "missing")})


def test_hf_classifier_single_label(tmp_path):
    labels = {0: "benign", 1: "toxic"}
    model, tok = _tiny_bert(tmp_path / "clf", 2, id2label=labels)
    model.save_pretrained(tmp_path / "clf")
    oracle = build_oracle({"name": "hf_classifier", "path": str(tmp_path / "clf"),
                           "violating_labels": ["toxic"]})
    expected = torch.softmax(_reference_logits(model, tok, TEXTS), -1)[:, 0]
    got = torch.tensor(oracle.score(TEXTS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    same = build_oracle({"name": "hf_classifier", "path": str(tmp_path / "clf"),
                         "satisfying_labels": ["benign"]})
    torch.testing.assert_close(torch.tensor(same.score(TEXTS)), expected, rtol=1e-5, atol=1e-6)


def test_hf_classifier_multi_label_and_soft_sum(tmp_path):
    labels = {0: "ok", 1: "insult", 2: "threat"}
    model, tok = _tiny_bert(tmp_path / "ml", 3, id2label=labels,
                            problem_type="multi_label_classification", seed=1)
    model.save_pretrained(tmp_path / "ml")
    oracle = build_oracle({"name": "hf_classifier", "path": str(tmp_path / "ml"),
                           "violating_labels": ["insult", "threat"]})
    sig = torch.sigmoid(_reference_logits(model, tok, TEXTS))
    expected = 1.0 - torch.maximum(sig[:, 1], sig[:, 2])
    torch.testing.assert_close(torch.tensor(oracle.score(TEXTS)), expected, rtol=1e-5, atol=1e-6)
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in oracle.score(TEXTS))


def test_hf_classifier_errors(tmp_path):
    model, _ = _tiny_bert(tmp_path / "clf", 2, id2label={0: "benign", 1: "toxic"})
    model.save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match=r"label\(s\) \['hateful'\] not in the model's labels "
                                         r"\['benign', 'toxic'\]"):
        build_oracle({"name": "hf_classifier", "path": str(tmp_path / "clf"),
                      "violating_labels": ["hateful"]})
    with pytest.raises(ValueError, match="exactly one of satisfying_labels and violating_labels"):
        build_oracle({"name": "hf_classifier", "path": str(tmp_path / "clf")})
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        (tmp_path / "empty").mkdir()
        build_oracle({"name": "hf_classifier", "path": str(tmp_path / "empty"),
                      "violating_labels": ["toxic"]})
