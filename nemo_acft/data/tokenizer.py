"""Tokenizers: the model's own NeMo tokenizer behind a small text interface, and the
SentencePiece model the built-in tiny GPT is pre-trained with (trained offline on its corpus,
so that the ``.nemo`` it ends in carries a tokenizer NeMo loads).

Library choice: SentencePiece (the format of NeMo's ``sentencepiece`` tokenizer library, and of
Llama's) rather than a hand-written vocabulary.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, List

from nemo_acft.io_utils import atomic_write

#: ids of the built-in SentencePiece model's special pieces
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextTokenizer:
    """A NeMo tokenizer (``model.tokenizer`` of any ``MegatronGPTModel``: SentencePiece,
    Hugging Face, byte-level) as ``encode(text) -> ids`` / ``decode(ids) -> text`` with
    ``eos_id``, ``pad_id`` (the EOS when the tokenizer has none) and ``vocab_size``."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = int(tok.eos_id)
        pad = getattr(tok, "pad_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else self.eos_id
        self.vocab_size = int(tok.vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:  # noqa: D102
        return [int(i) for i in self.tok.text_to_ids(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first EOS; pads dropped; an id the tokenizer cannot decode
        (e.g. 256..511 of NeMo's byte-level vocabulary of 512, or Megatron's padding) is dropped,
        not an error: a sampled id is not always a text."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id and 0 <= i < self.vocab_size:
                out.append(i)
        try:
            return self.tok.ids_to_text(out)
        except (ValueError, KeyError, IndexError, TypeError):
            ok: List[int] = []
            for i in out:
                try:
                    self.tok.ids_to_text(ok + [i])
                    ok.append(i)
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
            return self.tok.ids_to_text(ok)


def train_sentencepiece(texts: Iterable[str], path, vocab_size: int,
                        model_type: str = "bpe") -> Path:
    """Train a SentencePiece model on ``texts`` and write it to ``path`` (temporary name, then
    renamed). Pieces 0-3 are pad, unk, bos, eos; ``vocab_size`` is an upper bound (a small corpus
    gets the pieces it has)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=int(vocab_size),
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        shuffle_input_sentence=False)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return Path(path)


def sentencepiece_config(model_path) -> dict:
    """``model.tokenizer`` of a MegatronGPTModel for a SentencePiece model file."""
    return {"library": "sentencepiece", "type": None, "model": str(model_path),
            "vocab_file": None, "merge_file": None, "delimiter": None,
            "sentencepiece_legacy": False}


__all__ = ["TextTokenizer", "train_sentencepiece", "sentencepiece_config", "EOS_ID", "PAD_ID"]
