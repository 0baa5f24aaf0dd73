"""The paper's baselines (METHOD.md, "Baselines the paper compares"), as training modes that share
the data, the batches and the step budget of ACFT:

- ``baseline``: fine-tune with the LM loss alone;
- ``filtering``: the same, on the training records the oracle does not mark as violating
  (:func:`filter_by_oracle`);
- ``rl``: the LM loss plus ``coef`` × a REINFORCE term on continuations sampled from the model
  being trained, reward = oracle score, leave-one-out baseline (:class:`Reinforce`);
- ``nado_decoding``: no LM update; a NADO head is trained for the baseline's final θ (the oracle
  blocks of ACFT with θ held fixed) and text is decoded from ``q ∝ p·R^β`` (β =
  ``nado_decoding.guidance``).

"Ours" with one λ and with the adaptive regularizer (per-domain λ, δ gate) are ACFT itself with
``acft.domain_lambdas`` / ``acft.delta`` set (:class:`~nemo_acft.training.blocks.RegularizerConfig`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from nemo_acft.data.lm_dataset import LMDataset, batch_indices
from nemo_acft.oracles import score_robust

log = logging.getLogger("nemo_acft")

#: training modes of an LM side; ``acft`` is the method itself
LM_MODES = ("baseline", "filtering", "rl", "acft")
#: what ``baselines:`` in a run config may list (the plain fine-tune always runs)
BASELINES = ("filtering", "rl", "nado_decoding")


def record_texts(data: LMDataset, tokenizer) -> list:
    """The text of each record of ``data``, decoded from its tokens (what an oracle would see of
    a generated text with the same tokens)."""
    return [tokenizer.decode(data.tokens[i].tolist()) for i in range(len(data))]


def filter_by_oracle(data: LMDataset, tokenizer, oracle, threshold: float,
                     batch_size: int = 256) -> Tuple[LMDataset, Dict[str, object]]:
    """The records of ``data`` that the oracle does not mark as violating (score ≥ ``threshold``).

    A record the oracle could not score is kept (no label is not a violation, as everywhere in
    the method). Returns the kept subset and ``{"kept", "dropped", "unscored", "dropped_by_domain"}``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"filtering.threshold={threshold}: expected a number in [0, 1]")
    scores = score_robust(oracle, record_texts(data, tokenizer), batch_size=batch_size)
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


@dataclass
class RLConfig:
    """The REINFORCE term: ``coef`` × −(1/n) Σ_i A_i · Σ_t log p(y_i,t) / ``max_new_tokens``."""

    coef: float = 1.0
    batch_size: int = 32          # prompts sampled (one continuation each) per LM step
    max_new_tokens: int = 20

    def __post_init__(self):
        if not self.coef >= 0:
            raise ValueError(f"rl.coef={self.coef}: expected a number >= 0")
        if self.batch_size < 2:
            raise ValueError(f"rl.batch_size={self.batch_size}: expected >= 2 (the baseline of "
                             "each sample is the mean reward of the others)")
        if self.max_new_tokens < 1:
            raise ValueError(f"rl.max_new_tokens={self.max_new_tokens}: expected >= 1")


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


def sequence_log_probs(model, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                       lengths: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``Σ_t log p(y_t | y_<t)`` over each sample's generated tokens (differentiable), with p
    the model's distribution over the real vocabulary (what the sampler draws from)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    logits = model(inputs, positions, None)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    j = torch.arange(targets.shape[1]).unsqueeze(0) + 1  # index of each target token
    mask = (j >= prompt_lengths.unsqueeze(1)) & (j < lengths.unsqueeze(1))
    return (token_logp * mask).sum(-1)


class Reinforce:
    """The policy-gradient term of the RL baseline, called once per LM step.

    Each call samples one continuation (p itself: temperature 1, no top-k/top-p) for each of
    ``cfg.batch_size`` training prompts drawn by ``(seed, "rl", step)``, scores the whole texts
    with the oracle (reward = score, 1 = satisfies), and returns
    ``coef · −(1/n) Σ_i A_i · log p(y_i) / max_new_tokens`` with leave-one-out advantages.
    Every draw is a function of the step, so a resumed block repeats itself.
    """

    def __init__(self, cfg: RLConfig, tokenizer, prompts: Sequence[str], oracle, *,
                 vocab_size: int, seed: int, oracle_batch_size: int = 256):
        if len(prompts) < cfg.batch_size:
            raise ValueError(f"rl.batch_size={cfg.batch_size} is larger than the "
                             f"{len(prompts)} training prompts")
        self.cfg, self.tokenizer, self.prompts, self.oracle = cfg, tokenizer, list(prompts), oracle
        self.vocab_size, self.seed, self.oracle_batch_size = vocab_size, seed, oracle_batch_size

    def __call__(self, model, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        from nemo_acft.sampling import SamplingParams, generate_batched

        idx = batch_indices(len(self.prompts), self.cfg.batch_size, self.seed, "rl", step)
        chosen = [self.prompts[i] for i in idx.tolist()]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens,
                                eos_id=self.tokenizer.eos_id,
                                seed=(self.seed * 7919 + step) % (2 ** 62))
        s = generate_batched(model, self.tokenizer, chosen, params, vocab_size=self.vocab_size,
                             batch_size=len(chosen))
        texts = [self.tokenizer.decode(s.tokens[i, :s.lengths[i]].tolist())
                 for i in range(len(chosen))]
        scores = score_robust(self.oracle, texts, batch_size=self.oracle_batch_size)
        rewards = torch.tensor([math.nan if x is None else float(x) for x in scores])
        adv = leave_one_out_advantages(rewards).float()
        logp = sequence_log_probs(model, s.tokens, s.prompt_lengths, s.lengths, self.vocab_size)
        n = max(int((~torch.isnan(rewards)).sum()), 1)
        loss = -(adv * logp).sum() / (n * self.cfg.max_new_tokens)
        scored = rewards[~torch.isnan(rewards)]
        return self.cfg.coef * loss, {
            "rl_loss": loss.item(), "reward": float(scored.mean()) if len(scored) else math.nan,
            "rl_violation_rate": float((scored < 0.5).float().mean()) if len(scored) else math.nan}


__all__ = ["LM_MODES", "BASELINES", "RLConfig", "Reinforce", "filter_by_oracle",
           "leave_one_out_advantages", "record_texts", "sequence_log_probs"]
