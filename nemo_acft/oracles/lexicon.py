"""Lexicon oracle: a text violates the constraint iff it contains a listed word or phrase."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Iterable, List, Optional, Sequence


def load_lexicon(path: Optional[str] = None) -> List[str]:
    """Words/phrases from ``path`` (one per line, ``#`` comments), or the built-in list."""
    if path is None:
        text = resources.files("nemo_acft.oracles").joinpath("lexicon_en.txt").read_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"lexicon oracle: word list {p} does not exist")
        text = p.read_text()
    words = [w.strip().lower() for w in text.splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"lexicon oracle: word list {path or 'built-in'} is empty")
    return words


class LexiconOracle:
    """Score 0 if any lexicon entry occurs (case-insensitive, on word boundaries), else 1."""

    name = "lexicon"

    def __init__(self, words: Optional[Iterable[str]] = None, path: Optional[str] = None):
        self.words = sorted(set(w.lower() for w in words)) if words is not None else load_lexicon(path)
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        return [0.0 if self._pattern.search(t) else 1.0 for t in texts]
