"""Oracles: batched scorers of whole texts, 1 = satisfies the constraint (non-toxic).

``build_oracle(cfg)`` makes one from a config mapping with a ``name`` key; every bad name, path
or key is reported before any training starts.
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_acft.oracles.base import Oracle, score_robust, to_labels
from nemo_acft.oracles.lexicon import LexiconOracle, load_lexicon
from nemo_acft.oracles.sklearn_text import SklearnTextOracle, read_labelled


def _lexicon(cfg):
    return LexiconOracle(path=cfg.get("path"))


def _sklearn_text(cfg):
    if cfg.get("model_path"):
        return SklearnTextOracle.load(cfg["model_path"])
    if not cfg.get("path"):
        raise ValueError("oracle sklearn_text: set oracle.path (labelled training data) "
                         "or oracle.model_path (a saved model)")
    return SklearnTextOracle.from_file(
        cfg["path"], cfg.get("format", "csv"), cfg.get("text_column", "text"),
        cfg.get("label_column", "label"), cfg.get("satisfying_labels", ("1",)),
        seed=int(cfg.get("seed", 0)))


def _detoxify(cfg):
    from nemo_acft.oracles.hf import DetoxifyOracle

    return DetoxifyOracle(cfg.get("checkpoint"), cfg.get("hf_config_path"),
                          attribute=cfg.get("attribute", "toxicity"),
                          max_length=int(cfg.get("max_length", 512)))


def _hf_classifier(cfg):
    from nemo_acft.oracles.hf import HFClassifierOracle

    return HFClassifierOracle(cfg.get("path"), satisfying_labels=cfg.get("satisfying_labels"),
                              violating_labels=cfg.get("violating_labels"),
                              max_length=int(cfg.get("max_length", 512)))


ORACLES = {"lexicon": _lexicon, "sklearn_text": _sklearn_text, "detoxify": _detoxify,
           "hf_classifier": _hf_classifier}


def build_oracle(cfg: Mapping[str, Any]) -> Oracle:
    """Build the oracle named by ``cfg["name"]`` from the rest of ``cfg``."""
    name = cfg.get("name")
    if name not in ORACLES:
        raise ValueError(f"oracle.name={name!r}: unknown oracle; available: {sorted(ORACLES)}")
    return ORACLES[name](cfg)


__all__ = ["Oracle", "LexiconOracle", "SklearnTextOracle", "build_oracle", "load_lexicon",
           "read_labelled", "score_robust", "to_labels", "ORACLES"]
