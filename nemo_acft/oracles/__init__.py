"""Oracles: batched scorers of whole texts, 1 = satisfies the constraint (non-toxic).

``build_oracle(cfg)`` makes one from a config mapping with a ``name`` key; ``check_oracle(cfg)``
checks the same mapping without building the model (files, formats, labels, that a classifier
is a classifier), which is what ``acft-train`` runs before a run writes anything: it starts no
thread pool (no tokenizer, no model), so the processes forked afterwards inherit none. A key the
oracle does not know, a bad name, path or label is an error naming it.
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_acft.oracles.base import Oracle, score_robust, to_labels
from nemo_acft.oracles.lexicon import LexiconOracle, load_lexicon
from nemo_acft.oracles.sklearn_text import SklearnTextOracle, read_labelled

#: keys every oracle section has (``conf/acft.yaml``)
COMMON_KEYS = ("name", "threshold", "batch_size")
#: each oracle's own keys
KEYS = {
    "lexicon": ("path",),
    "sklearn_text": ("path", "format", "text_column", "label_column", "satisfying_labels",
                     "seed", "model_path"),
    "detoxify": ("checkpoint", "hf_config_path", "attribute", "max_length"),
    "hf_classifier": ("path", "satisfying_labels", "violating_labels", "max_length"),
}


def _lexicon(cfg, build):
    return LexiconOracle(path=cfg.get("path"))


def _sklearn_text(cfg, build):
    if cfg.get("model_path"):
        return SklearnTextOracle.load(cfg["model_path"]) if build else \
            SklearnTextOracle.check_saved(cfg["model_path"])
    if not cfg.get("path"):
        raise ValueError("oracle sklearn_text: set oracle.path (labelled training data) "
                         "or oracle.model_path (a saved model)")
    args = (cfg["path"], cfg.get("format", "csv"), cfg.get("text_column", "text"),
            cfg.get("label_column", "label"), cfg.get("satisfying_labels", ("1",)))
    if not build:
        return read_labelled(*args)
    return SklearnTextOracle.from_file(*args, seed=int(cfg.get("seed", 0)))


def _detoxify(cfg, build):
    from nemo_acft.oracles.hf import DetoxifyOracle

    args = (cfg.get("checkpoint"), cfg.get("hf_config_path"))
    kw = {"attribute": cfg.get("attribute", "toxicity")}
    if not build:
        return DetoxifyOracle.check(*args, **kw)
    return DetoxifyOracle(*args, **kw, max_length=int(cfg.get("max_length", 512)))


def _hf_classifier(cfg, build):
    from nemo_acft.oracles.hf import HFClassifierOracle

    kw = {"satisfying_labels": cfg.get("satisfying_labels"),
          "violating_labels": cfg.get("violating_labels")}
    if not build:
        return HFClassifierOracle.check(cfg.get("path"), **kw)
    return HFClassifierOracle(cfg.get("path"), **kw, max_length=int(cfg.get("max_length", 512)))


ORACLES = {"lexicon": _lexicon, "sklearn_text": _sklearn_text, "detoxify": _detoxify,
           "hf_classifier": _hf_classifier}


def _check_keys(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("name")
    if name not in ORACLES:
        raise ValueError(f"oracle.name={name!r}: unknown oracle; available: {sorted(ORACLES)}")
    unknown = sorted(set(cfg) - set(COMMON_KEYS) - set(KEYS[name]))
    if unknown:
        raise ValueError(f"oracle.{unknown[0]}: not a key of the {name} oracle; its keys: "
                         f"{sorted(KEYS[name] + COMMON_KEYS)}")
    return name


def build_oracle(cfg: Mapping[str, Any]) -> Oracle:
    """Build the oracle named by ``cfg["name"]`` from the rest of ``cfg``."""
    return ORACLES[_check_keys(cfg)](cfg, True)


def check_oracle(cfg: Mapping[str, Any]) -> None:
    """What :func:`build_oracle` would refuse, found without building the model (see the
    module docstring)."""
    ORACLES[_check_keys(cfg)](cfg, False)


__all__ = ["Oracle", "LexiconOracle", "SklearnTextOracle", "build_oracle", "check_oracle",
           "load_lexicon", "read_labelled", "score_robust", "to_labels", "ORACLES", "KEYS"]
