"""TF-IDF + logistic-regression oracle trained from a labelled file: a real offline oracle.

Training data formats:

- ``csv``: a header row; ``text_column`` and ``label_column`` name the columns (e.g. the
  Davidson tweets: ``text_column=tweet, label_column=class, satisfying_labels=[2]``);
- ``jsonl``: one object per line with ``text_column`` and ``label_column`` keys;
- ``toxigen_dir``: a folder of ``hate_<group>.txt`` / ``neutral_<group>.txt`` files, one
  statement per line; the label is the file-name prefix and ``neutral`` satisfies.

``satisfying_labels`` lists the label values that satisfy the constraint (compared as strings);
every other label violates it. The score is the classifier's probability of "satisfies".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from nemo_acft.io_utils import atomic_write

FORMATS = ("csv", "jsonl", "toxigen_dir")


def read_labelled(path: str, fmt: str, text_column: str = "text", label_column: str = "label",
                  satisfying_labels: Sequence = ("1",)) -> Tuple[List[str], List[int]]:
    """Texts and 0/1 labels (1 = satisfies) from a labelled file; errors name file and key."""
    try:
        return _read_labelled(Path(path), fmt, text_column, label_column, satisfying_labels)
    except UnicodeDecodeError as e:
        raise ValueError(f"sklearn_text oracle: {path}: not UTF-8 (byte 0x{e.object[e.start]:02x} "
                         f"at offset {e.start}); expected a UTF-8 text file") from None


def _read_labelled(p: Path, fmt: str, text_column: str, label_column: str,
                   satisfying_labels: Sequence) -> Tuple[List[str], List[int]]:
    if fmt not in FORMATS:
        raise ValueError(f"sklearn_text oracle: format={fmt!r}: expected one of {FORMATS}")
    if not p.exists():
        raise FileNotFoundError(f"sklearn_text oracle: training data {p} does not exist")
    sat = {str(v) for v in satisfying_labels}
    texts, raw = [], []
    if fmt == "toxigen_dir":
        files = sorted(p.glob("hate_*.txt")) + sorted(p.glob("neutral_*.txt"))
        if not files:
            raise ValueError(f"sklearn_text oracle: {p} has no hate_*.txt / neutral_*.txt files")
        for f in files:
            label = f.name.split("_", 1)[0]
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.append(line.strip())
                    raw.append(label)
        sat = {"neutral"}
    elif fmt == "csv":
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for key in (text_column, label_column):
                if key not in (reader.fieldnames or []):
                    raise ValueError(f"sklearn_text oracle: {p} has no column {key!r} "
                                     f"(columns: {reader.fieldnames})")
            for row in reader:
                texts.append(row[text_column])
                raw.append(str(row[label_column]))
    else:
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"sklearn_text oracle: {p}:{n}: not valid JSON ({e})") from e
                for key in (text_column, label_column):
                    if key not in obj:
                        raise ValueError(f"sklearn_text oracle: {p}:{n}: no key {key!r}")
                texts.append(str(obj[text_column]))
                raw.append(str(obj[label_column]))
    seen = sorted(set(raw))
    if not sat & set(seen):
        raise ValueError(f"sklearn_text oracle: none of satisfying_labels={sorted(sat)} occurs in "
                         f"{p} (labels seen: {seen[:20]})")
    if len(seen) < 2:
        raise ValueError(f"sklearn_text oracle: {p} has a single label {seen}; need both classes")
    return texts, [int(r in sat) for r in raw]


class SklearnTextOracle:
    """Word and character n-gram TF-IDF features + logistic regression."""

    name = "sklearn_text"

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence[int], seed: int = 0,
              max_features: int = 50_000) -> "SklearnTextOracle":
        """Fit on texts with 0/1 labels (1 = satisfies)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline

        features = FeatureUnion([
            ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                     max_features=max_features)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2,
                                     sublinear_tf=True, max_features=max_features)),
        ])
        pipe = make_pipeline(features, LogisticRegression(C=4.0, max_iter=2000,
                                                         class_weight="balanced",
                                                         random_state=seed))
        pipe.fit(list(texts), list(labels))
        return cls(pipe)

    @classmethod
    def from_file(cls, path: str, format: str, text_column: str = "text",
                  label_column: str = "label", satisfying_labels: Sequence = ("1",),
                  seed: int = 0) -> "SklearnTextOracle":
        """Train from a labelled file (see the module docstring for the formats)."""
        texts, labels = read_labelled(path, format, text_column, label_column, satisfying_labels)
        return cls.train(texts, labels, seed=seed)

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        if not texts:
            return []
        classes = list(self.pipeline.classes_)
        proba = self.pipeline.predict_proba(list(texts))[:, classes.index(1)]
        return [float(x) for x in proba]

    def save(self, path: str) -> None:
        """Write the fitted pipeline with skops (``skops.io``: a format that lists the types it
        holds and executes nothing on load), to a temporary name and renamed."""
        import skops.io as sio

        with atomic_write(path, "wb") as fh:
            fh.write(sio.dumps(self.pipeline))

    @classmethod
    def check_saved(cls, path: str) -> None:
        """A file :meth:`load` accepts: it exists and holds only types skops trusts (scikit-
        learn's estimators, numpy, scipy); nothing is loaded."""
        import skops.io as sio

        if not Path(path).is_file():
            raise FileNotFoundError(f"sklearn_text oracle: model file {path} does not exist")
        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as e:  # not a skops archive (a pickle, a truncated file)
            raise ValueError(f"sklearn_text oracle: model_path={path}: not a skops file "
                             f"written by SklearnTextOracle.save ({type(e).__name__}: {e}); "
                             "pickles are not loaded") from None
        if untrusted:
            raise ValueError(f"sklearn_text oracle: model_path={path} holds types that are not "
                             f"trusted ({untrusted[:5]}); only scikit-learn pipelines are "
                             "loaded")

    @classmethod
    def load(cls, path: str) -> "SklearnTextOracle":
        """Load a pipeline written by :meth:`save` (skops, trusted types only: a file handed
        over runs no code)."""
        import skops.io as sio

        cls.check_saved(path)
        return cls(sio.load(path))
