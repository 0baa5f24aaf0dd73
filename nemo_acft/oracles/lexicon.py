"""Lexicon oracle: a text violates the constraint iff it contains a listed word or phrase."""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence

from nemo_acft.data.lexicon import load_lexicon


class LexiconOracle:
    """Score 0 if any lexicon entry occurs (case-insensitive, on word boundaries), else 1."""

    name = "lexicon"

    def __init__(self, words: Optional[Iterable[str]] = None, path: Optional[str] = None):
        self.words = sorted(set(w.lower() for w in words)) if words is not None else load_lexicon(path)
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:  # noqa: D102
        return [0.0 if self._pattern.search(t) else 1.0 for t in texts]
