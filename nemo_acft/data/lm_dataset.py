"""Token tensors for training, and the deterministic batch and prompt slices of each step.

Every batch is a pure function of ``(seed, stream, step)``: a resumed run draws exactly the
batches an uninterrupted run would have drawn, with no sampler state to checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch


@dataclass
class LMDataset:
    """Encoded records: each row is ``text + <eos>``, right-padded to ``seq_length + 1``.

    Attributes:
        tokens: ``[N, S+1]`` int64; inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
        loss_mask: ``[N, S]`` 1 where the target is a real token (the EOS included).
        domain_ids: ``[N]`` index into ``domains``.
        domains: domain names.
        truncated: how many records were longer than the sequence and cut.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    domain_ids: torch.Tensor
    domains: List[str]
    truncated: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Rows ``index`` as ``{inputs, targets, loss_mask, domain_ids}``."""
        t = self.tokens[index]
        return {"inputs": t[:, :-1], "targets": t[:, 1:].contiguous(),
                "loss_mask": self.loss_mask[index], "domain_ids": self.domain_ids[index]}


def encode_records(records: Sequence[Dict[str, str]], tokenizer, seq_length: int,
                   domains: Sequence[str]) -> LMDataset:
    """Encode ``{"text", "domain"}`` records; a domain not in ``domains`` is a ValueError."""
    index = {d: i for i, d in enumerate(domains)}
    n = len(records)
    tokens = torch.full((n, seq_length + 1), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_length)
    dom = torch.zeros(n, dtype=torch.long)
    truncated = 0
    for i, rec in enumerate(records):
        ids = tokenizer.encode(rec["text"]) + [tokenizer.eos_id]
        if len(ids) > seq_length + 1:
            ids, truncated = ids[: seq_length + 1], truncated + 1
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids) - 1] = 1.0
        if rec["domain"] not in index:
            raise ValueError(f"record {i}: domain {rec['domain']!r} is not one of {list(domains)}")
        dom[i] = index[rec["domain"]]
    return LMDataset(tokens, mask, dom, list(domains), truncated)


def batch_indices(n: int, batch_size: int, seed: int, stream: str, step: int) -> torch.Tensor:
    """Indices of the batch of ``step`` in ``stream``: a seeded draw without replacement,
    independent of every other step (so resuming at any step is exact)."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} records available")
    key = [seed, sum(ord(c) * 131 ** i for i, c in enumerate(stream)) % (2 ** 31), step]
    rng = np.random.default_rng(key)
    return torch.from_numpy(rng.choice(n, size=batch_size, replace=False)).long()


def make_prompts(texts: Sequence[str], min_words: int, max_words: int, seed: int) -> List[str]:
    """Openings of ``texts``: the first 2..k words (seeded), never the whole text."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"prompt words [{min_words}, {max_words}]: expected 1 <= min <= max")
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        k = min(rng.randint(min_words, max_words), max(len(words) - 1, 1))
        out.append(" ".join(words[:k]))
    return out
