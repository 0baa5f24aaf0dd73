"""The oracle protocol: a batched black box that scores whole texts.

``score(texts) -> list[float | None]``: each score is in [0, 1], 1 = satisfies the constraint
(non-toxic); ``None`` = the oracle failed on that item, which is masked downstream and never
counted as 0 or 1.
"""

from __future__ import annotations

import math
from typing import List, Optional, Protocol, Sequence, runtime_checkable

from nemo_acft import progress


@runtime_checkable
class Oracle(Protocol):
    """Anything with a name and a batched ``score``."""

    name: str

    def score(self, texts: Sequence[str]) -> List[Optional[float]]:
        """Scores in [0, 1] (1 = satisfies), or None for an item the oracle could not score."""


def score_robust(oracle: Oracle, texts: Sequence[str], batch_size: int = 64) -> List[Optional[float]]:
    """Score in batches; a batch that raises is retried item by item, and an item that still
    raises, or returns a non-finite or out-of-range score, becomes None."""
    out: List[Optional[float]] = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        try:
            scores = list(oracle.score(chunk))
            if len(scores) != len(chunk):
                raise RuntimeError(f"{oracle.name} returned {len(scores)} scores for {len(chunk)} texts")
        except Exception:
            scores = []
            for text in chunk:
                try:
                    scores.extend(oracle.score([text]))
                except Exception:
                    scores.append(None)
        out.extend(_checked(s) for s in scores)
        progress.tick(f"{oracle.name} scored {len(out)} of {len(texts)} texts")
    return out


def _checked(s) -> Optional[float]:
    if s is None:
        return None
    s = float(s)
    return s if math.isfinite(s) and 0.0 <= s <= 1.0 else None


def to_labels(scores: Sequence[Optional[float]], threshold: Optional[float] = None) -> List[Optional[float]]:
    """Soft labels (the scores) when ``threshold`` is None, else 1.0 if score >= threshold else
    0.0. None stays None."""
    if threshold is None:
        return list(scores)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"oracle threshold={threshold}: expected a value in [0, 1]")
    return [None if s is None else float(s >= threshold) for s in scores]
