"""Oracles backed by local HuggingFace models: Detoxify checkpoints and any sequence classifier.

Both load from local files only (no hub download) and unpickle nothing (``torch.load`` with
``weights_only=True``; safetensors where the folder has them). ``check`` finds what the
constructor would refuse without building the model or its tokenizer (a missing folder or
tokenizer, a checkpoint without the expected keys, a label the model does not have, a folder
that is not a sequence classifier or whose classification head is not in its weights, which
transformers would initialise at random), so ``acft-train`` runs it before anything is
written and before any process is forked.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

#: Detoxify renames some Jigsaw class names; the same map as ``detoxify.load_checkpoint``.
_DETOXIFY_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack",
                   "severe_toxic": "severe_toxicity"}


#: files one of which a tokenizer folder has
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _need_tokenizer(folder: Path, what: str) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: {folder} has no tokenizer (expected one of "
                                f"{', '.join(TOKENIZER_FILES)}, e.g. from save_pretrained)")


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


def _weight_names(folder: Path) -> set:
    """The tensor names in a folder's weight files (safetensors headers, an index's weight
    map, or a ``pytorch_model.bin`` read with ``weights_only``)."""
    import json

    names: set = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            names |= set(json.loads((folder / index).read_text()).get("weight_map", {}))
    for f in folder.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            names |= set(fh.keys())
    if not names and (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True,
                        mmap=True)
        names |= set(sd)
    return names


def _need_head(folder: Path, config) -> None:
    """The classification head's tensors are in the weights (the model built on the meta
    device names them: every key outside its base model)."""
    from transformers import AutoModelForSequenceClassification

    present = _weight_names(folder)
    if not present:
        raise FileNotFoundError(f"oracle hf_classifier: {folder} has no weights "
                                "(model.safetensors or pytorch_model.bin)")
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = f"{model.base_model_prefix}."
    head = [k for k in model.state_dict() if not k.startswith(prefix)]
    missing = [k for k in head if k not in present]
    if missing:
        raise ValueError(f"oracle hf_classifier: {folder}'s weights have no classification "
                         f"head ({missing[:3]} missing): transformers would start it at "
                         "random; expected a trained sequence classifier")


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
        ckpt, folder, arch, classes, state_dict = self._read(checkpoint, hf_config_path,
                                                            attribute)
        self.class_names = [_DETOXIFY_NAMES.get(c, c) for c in classes]
        self.column = self.class_names.index(attribute)
        arch["model_type"] = str(folder)  # never the hub name stored in the checkpoint
        self.model, self.tokenizer = get_model_and_tokenizer(
            **arch, state_dict=state_dict, huggingface_config_path=str(folder))
        self.model.eval()
        self.max_length = max_length

    @staticmethod
    def _read(checkpoint, hf_config_path, attribute):
        """The checkpoint's architecture, classes and weights (``weights_only``: nothing
        unpickled), checked."""
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"oracle detoxify: checkpoint file {checkpoint} does not exist")
        folder = _need_dir(hf_config_path, "oracle detoxify: hf_config_path")
        _need_tokenizer(folder, "oracle detoxify: hf_config_path")
        try:
            loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            text = " ".join(str(e).split())
            why = next((s for s in text.split(". ") if "Unsupported global" in s), text[:160])
            raise ValueError(f"oracle detoxify: {ckpt} is not a Detoxify checkpoint that loads "
                             f"with weights_only=True (nothing in it was run: {why})") from None
        try:
            arch = dict(loaded["config"]["arch"]["args"])
            classes = list(loaded["config"]["dataset"]["args"]["classes"])
            state_dict = loaded["state_dict"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"oracle detoxify: {ckpt} is not a Detoxify checkpoint (missing key "
                             f"{e}; expected config.arch.args, config.dataset.args.classes and "
                             "state_dict)") from None
        names = [_DETOXIFY_NAMES.get(c, c) for c in classes]
        if attribute not in names:
            raise ValueError(f"oracle detoxify: attribute {attribute!r} is not a class of {ckpt}; "
                             f"classes: {names}")
        return ckpt, folder, arch, classes, state_dict

    @classmethod
    def check(cls, checkpoint: str, hf_config_path: str, attribute: str = "toxicity") -> None:
        """What the constructor would refuse, without building the model."""
        try:
            import detoxify  # noqa: F401
        except ImportError as e:
            raise ImportError("oracle detoxify needs the detoxify package: "
                              "pip install 'nemo-acft[oracles]'") from e
        cls._read(checkpoint, hf_config_path, attribute)

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
        folder, names, bad = self.check(path, satisfying_labels, violating_labels)
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True, output_loading_info=True)
        if info.get("missing_keys"):
            raise ValueError(f"oracle hf_classifier: {folder}'s weights lack "
                             f"{sorted(info['missing_keys'])[:4]}: transformers would start "
                             "them at random; expected a trained sequence classifier")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model.eval()
        self.max_length = max_length
        self.violating = torch.tensor([names.index(n) for n in bad], dtype=torch.long)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    @staticmethod
    def check(path: str, satisfying_labels: Optional[Sequence[str]] = None,
              violating_labels: Optional[Sequence[str]] = None):
        """What the constructor would refuse, found from the folder's config and the names in
        its weight files, without building the model or the tokenizer. Returns ``(folder,
        label names, violating label names)``."""
        try:
            from transformers import AutoConfig
        except ImportError as e:
            raise ImportError("oracle hf_classifier needs transformers: "
                              "pip install 'nemo-acft[oracles]'") from e
        folder = _need_dir(path, "oracle hf_classifier: path")
        _need_tokenizer(folder, "oracle hf_classifier: path")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"oracle hf_classifier: {folder} is not a sequence classifier "
                             f"(config.json architectures {archs}); expected an "
                             "AutoModelForSequenceClassification folder, not a language model")
        names = [config.id2label[i] for i in range(config.num_labels)]
        if (satisfying_labels is None) == (violating_labels is None):
            raise ValueError("oracle hf_classifier: set exactly one of satisfying_labels and "
                             f"violating_labels; the model's labels are {names}")
        given = list(satisfying_labels if satisfying_labels is not None else violating_labels)
        unknown = [x for x in given if x not in names]
        if unknown or not given:
            raise ValueError(f"oracle hf_classifier: label(s) {unknown or given} not in the "
                             f"model's labels {names} ({folder / 'config.json'}, id2label)")
        _need_head(folder, config)
        bad = given if violating_labels is not None else [n for n in names if n not in given]
        return folder, names, bad

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        logits = self._logits(texts)
        if self.multi_label:
            p_bad = torch.sigmoid(logits[:, self.violating]).max(dim=-1).values
            return (1.0 - p_bad).tolist()
        good = torch.ones(logits.shape[-1], dtype=torch.bool)
        good[self.violating] = False
        log_p = torch.log_softmax(logits, dim=-1)
        return torch.logsumexp(log_p[:, good], dim=-1).exp().tolist()
