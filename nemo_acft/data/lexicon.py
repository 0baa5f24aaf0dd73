"""The built-in word list of insults: what the built-in corpus appends to its toxic records and
what the lexicon oracle looks for."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Optional


def load_lexicon(path: Optional[str] = None) -> List[str]:
    """Words/phrases from ``path`` (one per line, ``#`` comments), or the built-in list."""
    if path is None:
        text = resources.files("nemo_acft.data").joinpath("lexicon_en.txt").read_text()
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
