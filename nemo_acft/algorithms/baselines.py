"""The paper's baselines (METHOD.md, "Baselines the paper compares") as compositions of the
blocks, sharing the data, the batches and the step budget of ACFT:

- ``baseline``: LM blocks with the LM loss alone;
- ``filtering``: a data choice, the training records the oracle does not mark as violating
  (:func:`filter_by_oracle`), then LM blocks;
- ``rl``: an extra loss term, REINFORCE with a leave-one-out baseline on continuations sampled
  from the model being trained, reward = oracle score (:class:`RLTerm`), added to each LM step;
- ``nado_decoding``: a decoding, no LM update: the oracle blocks train a head for the plain
  fine-tune's θ_K (:func:`train_nado_decoding`), and text is decoded from ``q ∝ p·R^β``.

"Ours" with one λ and with the adaptive regularizer (per-domain λ, gates) are ACFT itself with
``model.acft.domain_lambdas`` / ``delta`` / ``min_z`` set.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Tuple

import torch

from nemo_acft.algorithms.blocks import oracle_block, publish_initial_head
from nemo_acft.algorithms.exchange import ArtifactStore
from nemo_acft.data import LMDataset, batch_indices
from nemo_acft.models.objectives import Reinforce
from nemo_acft.models.generate import SamplingParams
from nemo_acft.sampling import generate_batched, generated_mask, score, texts

log = logging.getLogger("nemo_acft")


def record_texts(data: LMDataset, tokenizer) -> list:
    """The text of each record of ``data``, decoded from its tokens (what an oracle would see of
    a generated text with the same tokens)."""
    return [tokenizer.decode(data.tokens[i].tolist()) for i in range(len(data))]


def filter_by_oracle(data: LMDataset, tokenizer, oracle, threshold: float,
                     batch_size: int = 256) -> Tuple[LMDataset, Dict[str, object]]:
    """The records of ``data`` that the oracle does not mark as violating (score ≥ ``threshold``).
    Collective (the oracle scores on global rank 0).

    A record the oracle could not score is kept (no label is not a violation, as everywhere in
    the method). Returns the kept subset and ``{"kept", "dropped", "unscored", "dropped_by_domain"}``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"filtering.threshold={threshold}: expected a number in [0, 1]")
    scores = score(oracle, record_texts(data, tokenizer), batch_size=batch_size)
    keep = torch.tensor([s is None or s >= threshold for s in scores], dtype=torch.bool)
    if not bool(keep.any()):
        raise ValueError(f"filtering.threshold={threshold}: the oracle marks every one of the "
                         f"{len(data)} training records as violating; nothing is left to train on")
    dropped = (~keep).nonzero().squeeze(-1)
    by_domain = {d: int((data.domain_ids[dropped] == i).sum()) for i, d in enumerate(data.domains)}
    subset = LMDataset(data.tokens[keep], data.loss_mask[keep], data.domain_ids[keep],
                       list(data.domains), data.truncated)
    stats = {"kept": int(keep.sum()), "dropped": int((~keep).sum()),
             "unscored": sum(s is None for s in scores), "threshold": threshold,
             "dropped_by_domain": by_domain}
    return subset, stats


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A_i = r_i − mean_{j≠i, r_j scored} r_j``; NaN rewards (unscored) get advantage 0 and do
    not enter the others' baselines."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    n = int(valid.sum())
    if n < 2:
        return torch.zeros_like(r)
    baseline = (r.sum() - r) / (n - 1)
    return torch.where(valid, r - baseline, torch.zeros_like(r))


class RLTerm:
    """The RL baseline's extra loss term, one batch per LM step.

    Each call samples one continuation (p itself: temperature 1, no top-k/top-p) for each of
    ``rl.batch_size`` training prompts drawn by ``(seed, "rl", step)`` from the model being
    trained, scores the whole texts with the oracle (reward = score, 1 = satisfies), and returns
    the batch for :class:`~nemo_acft.models.acft_model.Reinforce` with leave-one-out advantages.
    Every draw is a function of the step, so a resumed block repeats itself.
    """

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg["rl"]
        self.prompts = list(run.data.train_prompts)
        if len(self.prompts) < self.cfg["batch_size"]:
            raise ValueError(f"rl.batch_size={self.cfg['batch_size']} is larger than the "
                             f"{len(self.prompts)} training prompts")

    def __call__(self, step: int):
        run, c = self.run, self.cfg
        idx = batch_indices(len(self.prompts), c["batch_size"], run.seed, "rl", step)
        chosen = [self.prompts[i] for i in idx.tolist()]
        params = SamplingParams(max_new_tokens=c["max_new_tokens"], eos_id=run.tokenizer.eos_id,
                                seed=(run.seed * 7919 + step) % (2 ** 62))
        s = generate_batched(run.model, run.tokenizer, chosen, params, batch_size=len(chosen))
        scores = score(run.oracle, texts(s, run.tokenizer), run.cfg["oracle"]["batch_size"])
        rewards = torch.tensor([math.nan if x is None else float(x) for x in scores])
        batch = {"inputs": s.tokens[:, :-1], "targets": s.tokens[:, 1:].contiguous(),
                 "loss_mask": generated_mask(s), "rewards": rewards,
                 "advantages": leave_one_out_advantages(rewards).float()}
        scored = rewards[~torch.isnan(rewards)]
        metrics = {"reward": float(scored.mean()) if len(scored) else math.nan,
                   "rl_violation_rate": float((scored < 0.5).float().mean())
                   if len(scored) else math.nan}
        return [(batch, Reinforce(float(c["coef"]), int(c["max_new_tokens"])))], metrics


def train_nado_decoding(run, plain: ArtifactStore, store: ArtifactStore) -> None:
    """The NADO decoding baseline's head: K oracle blocks (ACFT's prompts and sample budget)
    with the LM held at the plain fine-tune's θ_K; φ_K in ``store`` then guides decoding."""
    from nemo_acft.algorithms.blocks import log_block
    import time

    if not plain.exists("lm", run.K):
        raise RuntimeError(f"NADO decoding needs the plain fine-tune's θ_K: "
                           f"{plain.path('lm', run.K)} is missing (role=prepare)")
    publish_initial_head(run, store)
    todo = [k for k in range(1, run.K + 1) if not store.exists("nado", k)]
    t0 = time.perf_counter()
    for done, k in enumerate(todo, 1):
        m = oracle_block(run, k, store, (plain, run.K), run.data.train_prompts)
        log_block(run, "NADO decoding: oracle block", k, m, t0, done, len(todo))


__all__ = ["RLTerm", "filter_by_oracle", "leave_one_out_advantages", "record_texts",
           "train_nado_decoding"]
