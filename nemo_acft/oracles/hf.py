"""Oracles backed by local HuggingFace models: Detoxify checkpoints and any sequence classifier.

Both load from local files only (no hub download): a missing folder, a checkpoint without the
expected keys, or a label name the model does not have is a clear error at construction, before
any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

#: Detoxify renames some Jigsaw class names; the same map as ``detoxify.load_checkpoint``.
_DETOXIFY_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack",
                   "severe_toxic": "severe_toxicity"}


def _need_dir(path: Optional[str], what: str) -> Path:
    if not path:
        raise ValueError(f"{what}: set the path of a local folder")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: folder {p} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {p} has no config.json (expected a HuggingFace "
                                "config/tokenizer folder, e.g. from save_pretrained)")
    return p


class _Batched:
    """Shared scoring: tokenize a batch, run the classifier, map logits to a satisfaction score."""

    max_length = 512

    @torch.no_grad()
    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(list(texts), return_tensors="pt", truncation=True, padding=True,
                                max_length=self.max_length)
        return self.model(**inputs)[0].float()


class DetoxifyOracle(_Batched):
    """A Detoxify checkpoint (``{"config": ..., "state_dict": ...}``, as Detoxify's releases)
    with a local HF config/tokenizer folder. Score = 1 − P(``attribute``), by default
    ``toxicity``.

    Detoxify's own ``Detoxify(checkpoint=...)`` resolves the checkpoint's ``model_type`` (e.g.
    ``bert-base-uncased``) on the hub; here the architecture is built by Detoxify's
    ``get_model_and_tokenizer`` from the local folder instead, with ``local_files_only``.
    """

    name = "detoxify"

    def __init__(self, checkpoint: str, hf_config_path: str, attribute: str = "toxicity",
                 max_length: int = 512):
        try:
            from detoxify.detoxify import get_model_and_tokenizer
        except ImportError as e:
            raise ImportError("oracle detoxify needs the detoxify package: "
                              "pip install 'nemo-acft[oracles]'") from e
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"oracle detoxify: checkpoint file {checkpoint} does not exist")
        folder = _need_dir(hf_config_path, "oracle detoxify: hf_config_path")
        loaded = torch.load(ckpt, map_location="cpu", weights_only=False)
        try:
            arch = dict(loaded["config"]["arch"]["args"])
            classes = list(loaded["config"]["dataset"]["args"]["classes"])
            state_dict = loaded["state_dict"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"oracle detoxify: {ckpt} is not a Detoxify checkpoint (missing key "
                             f"{e}; expected config.arch.args, config.dataset.args.classes and "
                             "state_dict)") from None
        self.class_names = [_DETOXIFY_NAMES.get(c, c) for c in classes]
        if attribute not in self.class_names:
            raise ValueError(f"oracle detoxify: attribute {attribute!r} is not a class of {ckpt}; "
                             f"classes: {self.class_names}")
        self.column = self.class_names.index(attribute)
        arch["model_type"] = str(folder)  # never the hub name stored in the checkpoint
        self.model, self.tokenizer = get_model_and_tokenizer(
            **arch, state_dict=state_dict, huggingface_config_path=str(folder))
        self.model.eval()
        self.max_length = max_length

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        p = torch.sigmoid(self._logits(texts)[:, self.column])
        return (1.0 - p).tolist()


class HFClassifierOracle(_Batched):
    """Any local ``AutoModelForSequenceClassification`` folder (e.g. ToxiGen-RoBERTa).

    Score = the probability of the satisfying labels: the sum of their softmax probabilities
    (single-label models), or 1 − max sigmoid of the violating labels (multi-label models).
    Give either ``satisfying_labels`` or ``violating_labels`` (names from the model's
    ``id2label``); the other set is the rest.
    """

    name = "hf_classifier"

    def __init__(self, path: str, satisfying_labels: Optional[Sequence[str]] = None,
                 violating_labels: Optional[Sequence[str]] = None, max_length: int = 512):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise ImportError("oracle hf_classifier needs transformers: "
                              "pip install 'nemo-acft[oracles]'") from e
        folder = _need_dir(path, "oracle hf_classifier: path")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model.eval()
        self.max_length = max_length
        names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        if (satisfying_labels is None) == (violating_labels is None):
            raise ValueError("oracle hf_classifier: set exactly one of satisfying_labels and "
                             f"violating_labels; the model's labels are {names}")
        given = list(satisfying_labels if satisfying_labels is not None else violating_labels)
        unknown = [x for x in given if x not in names]
        if unknown or not given:
            raise ValueError(f"oracle hf_classifier: label(s) {unknown or given} not in the "
                             f"model's labels {names} ({folder / 'config.json'}, id2label)")
        bad = given if violating_labels is not None else [n for n in names if n not in given]
        self.violating = torch.tensor([names.index(n) for n in bad], dtype=torch.long)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        logits = self._logits(texts)
        if self.multi_label:
            p_bad = torch.sigmoid(logits[:, self.violating]).max(dim=-1).values
            return (1.0 - p_bad).tolist()
        good = torch.ones(logits.shape[-1], dtype=torch.bool)
        good[self.violating] = False
        log_p = torch.log_softmax(logits, dim=-1)
        return torch.logsumexp(log_p[:, good], dim=-1).exp().tolist()
