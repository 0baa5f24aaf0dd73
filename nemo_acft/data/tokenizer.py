"""A word-level tokenizer built offline from a corpus: lower-cased words and punctuation.

Enough for the built-in default (a closed grammar) and for CPU experiments; a real run uses the
checkpoint's own tokenizer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List

from nemo_acft.io_utils import atomic_write

SPECIALS = ["<pad>", "<eos>", "<unk>"]
_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


class WordTokenizer:
    """``encode(text) -> ids`` / ``decode(ids) -> text``; ids 0, 1, 2 are pad, eos, unk."""

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, vocab: List[str]):
        if vocab[:3] != SPECIALS:
            raise ValueError(f"tokenizer vocabulary must start with {SPECIALS}, got {vocab[:3]}")
        self.vocab = list(vocab)
        self.index: Dict[str, int] = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int = 50_000) -> "WordTokenizer":
        """Vocabulary of the most frequent tokens (ties broken alphabetically)."""
        counts = Counter(t for text in texts for t in _TOKEN.findall(text.lower()))
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))[: max_size - len(SPECIALS)]
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:  # noqa: D102
        return [self.index.get(t, self.unk_id) for t in _TOKEN.findall(text.lower())]

    def decode(self, ids: Iterable[int]) -> str:
        """Join tokens with spaces, no space before punctuation; stops at EOS, drops pads."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.pad_id:
                continue
            tok = self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>"
            if out and not re.match(r"[a-z0-9'<]", tok):
                out[-1] += tok
            else:
                out.append(tok)
        return " ".join(out)

    def save(self, path: str) -> None:
        """JSON, written to a temporary name and renamed."""
        with atomic_write(path) as fh:
            json.dump({"type": "word", "vocab": self.vocab}, fh)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":  # noqa: D102
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist")
        try:
            obj = json.loads(p.read_text())
            vocab = obj["vocab"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"tokenizer file {p}: expected JSON with a 'vocab' list ({e})") from e
        return cls(vocab)


class ByteTokenizer:
    """UTF-8 bytes, with the ids of NeMo's ``byte-level`` tokenizer (``ByteLevelTokenizer``:
    EOS 0, pad 1, a vocabulary of 512), so that a model trained with it exports to a ``.nemo``
    whose tokenizer is self-contained (``tokenizer.library: byte-level``)."""

    eos_id, pad_id = 0, 1
    unk_id = 0x3F  # "?": never produced by encode (every byte has an id)
    vocab_size = 512
    vocab = ["<byte-level-512>"]  # the cache key of a pre-trained model

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:  # noqa: D102
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes up to the first EOS, pads and ids above 255 dropped, invalid UTF-8 ignored."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.pad_id or not 0 <= i < 256:
                continue
            out.append(i)
        return out.decode("utf-8", errors="ignore")

    def save(self, path: str) -> None:  # noqa: D102
        with atomic_write(path) as fh:
            json.dump({"type": "byte-level", "vocab_size": self.vocab_size}, fh)


def build_tokenizer(kind: str, texts: Iterable[str], min_count: int = 1):
    """``word`` (a vocabulary of the tokens seen at least ``min_count`` times in ``texts``; the
    rest become ``<unk>``) or ``byte`` (NeMo's byte-level ids)."""
    if kind == "word":
        return WordTokenizer.build(texts, min_count=min_count)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={kind!r}: expected 'word' or 'byte'")


def load_tokenizer(path: str):
    """A tokenizer saved by ``save`` (word or byte-level)."""
    p = Path(path)
    if p.is_file():
        try:
            if json.loads(p.read_text()).get("type") == "byte-level":
                return ByteTokenizer()
        except (json.JSONDecodeError, AttributeError):
            pass
    return WordTokenizer.load(path)
