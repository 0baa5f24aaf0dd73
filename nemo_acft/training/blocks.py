"""The two blocks of an ACFT iteration, as functions of a model and their data.

- Oracle block: sample continuations from the frozen LM ``θ_(k−1)``, label them with the oracle,
  train the NADO head ``φ_k`` (warm-started from ``φ_(k−1)``) with :func:`nado_loss`.
- LM block: fine-tune the trunk on corpus batches with the LM loss plus the per-domain, gated
  closed-form KL toward ``q ∝ p·R_φ`` (:func:`kl_penalty`); ``φ`` frozen.

Loading and publishing weights is the schedule's business (:mod:`nemo_acft.training.run`);
these functions only train. Every batch and every sampling seed is a pure function of
``(seed, block, step)``, so a block restarted from a checkpoint repeats itself exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nemo_acft.nado import kl_penalty, nado_loss
from nemo_acft.data.lm_dataset import LMDataset, batch_indices
from nemo_acft.sampling import Samples


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to ``min_lr``; global-norm clipping."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: Sequence[float] = (0.9, 0.95)

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of 0-based ``step`` out of ``total``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(total - self.warmup_steps, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))

    def make(self, params) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas),
                                 weight_decay=self.weight_decay)


@dataclass
class RegularizerConfig:
    """``L = L_LM + Σ_d λ_d · mean_{i∈d} gate_i · KL_i``; λ_d = ``domain_lambdas.get(d, lam)``."""

    lam: float = 1.0
    domain_lambdas: Dict[str, float] = field(default_factory=dict)
    delta: Optional[float] = None
    min_z: float = 0.0

    def lambdas(self, domains: Sequence[str]) -> torch.Tensor:
        """``[D]`` weights in the order of ``domains``; unknown domain names are an error."""
        unknown = sorted(set(self.domain_lambdas) - set(domains))
        if unknown:
            raise ValueError(f"acft.domain_lambdas names domains {unknown} that the data does "
                             f"not have; domains: {list(domains)}")
        return torch.tensor([float(self.domain_lambdas.get(d, self.lam)) for d in domains])


#: ``(model, global_step) -> (loss term, metrics)``, added to an LM step's loss
ExtraLoss = Callable[[torch.nn.Module, int], Tuple[torch.Tensor, Dict[str, float]]]


def _positions(inputs: torch.Tensor) -> torch.Tensor:
    return torch.arange(inputs.shape[1]).expand_as(inputs)


def _clip(params: List[torch.nn.Parameter], max_norm: float) -> float:
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def lm_step(model, optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter],
            batch: Dict[str, torch.Tensor], lr: float, grad_clip: float,
            lambdas: Optional[torch.Tensor] = None, delta: Optional[float] = None,
            min_z: float = 0.0, extra_loss: Optional[ExtraLoss] = None,
            step: int = 0) -> Dict[str, float]:
    """One optimizer step on a corpus batch.

    With ``lambdas`` None the model may be a plain ``GPTModel`` and the loss is the LM loss alone
    (the baseline fine-tune); otherwise ``model`` is a ``GPTNADOModel`` and the loss adds the
    regularizer. ``extra_loss(model, step) -> (loss, metrics)`` adds a term computed on other
    data (the RL baseline's policy gradient on sampled continuations).
    """
    model.train()
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    out = model(inputs, _positions(inputs), None, labels=targets)
    token_lm = out.lm_loss if lambdas is not None else out
    num_tokens = mask.sum().clamp_min(1.0)
    lm_loss = (token_lm.float() * mask).sum() / num_tokens
    metrics = {"lm_loss": lm_loss.item()}
    loss = lm_loss
    if lambdas is not None:
        penalty, parts = kl_penalty(out.kl, out.log_z, mask, batch["domain_ids"], lambdas, delta,
                                    min_z)
        loss = loss + penalty
        metrics.update(penalty=penalty.item(), **{k: v.item() for k, v in parts.items()})
    if extra_loss is not None:
        term, extra_metrics = extra_loss(model, step)
        model.train()
        loss = loss + term
        metrics.update(extra_metrics)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = _clip(params, grad_clip)
    optimizer.step()
    metrics.update(loss=loss.item(), lr=lr)
    return metrics


def lm_block(model, optimizer: torch.optim.Optimizer, data: LMDataset, *, start: int, end: int,
             total: int, batch_size: int, optim: OptimConfig, seed: int,
             regularizer: Optional[RegularizerConfig] = None,
             extra_loss: Optional[ExtraLoss] = None,
             on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Global steps ``[start, end)`` of LM training; returns the block's mean metrics.

    ``on_step(step, metrics)`` runs after each step (logging, checkpoints). The batch of global
    step t is ``batch_indices(len(data), batch_size, seed, "lm", t)``: the baseline and ACFT see
    the same batches at the same steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lambdas = regularizer.lambdas(data.domains) if regularizer is not None else None
    delta = regularizer.delta if regularizer is not None else None
    min_z = regularizer.min_z if regularizer is not None else 0.0
    sums: Dict[str, float] = {}
    for step in range(start, end):
        batch = data.batch(batch_indices(len(data), batch_size, seed, "lm", step))
        m = lm_step(model, optimizer, params, batch, optim.lr_at(step, total), optim.grad_clip,
                    lambdas, delta, min_z, extra_loss, step)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, m)
    n = max(end - start, 1)
    return {k: v / n for k, v in sums.items()}


def freeze_trunk(model) -> List[torch.nn.Parameter]:
    """Only the NADO head trains; returns its parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("nado_head."))
    return [p for p in model.nado_head.parameters()]


def freeze_head(model) -> List[torch.nn.Parameter]:
    """Only the trunk trains (the LM block); returns the trunk's parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("nado_head."))
    return [p for n, p in model.named_parameters() if not n.startswith("nado_head.")]


# --- oracle block ---------------------------------------------------------------------------


def nado_targets(samples: Samples):
    """Inputs, next-token targets and the loss mask of the NADO loss: the generated positions,
    from the last prompt token to the token before the last generated one."""
    tokens = samples.tokens
    inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
    j = torch.arange(targets.shape[1]).unsqueeze(0) + 1  # index of the target token
    mask = (j >= samples.prompt_lengths.unsqueeze(1)) & (j < samples.lengths.unsqueeze(1))
    return inputs, targets, mask.float()


def train_nado(model, labelled: Samples, labels: torch.Tensor, *, steps: int, batch_size: int,
               optim: OptimConfig, alpha: float, seed: int, stream: str,
               on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Train the NADO head on labelled samples, the trunk frozen; returns the last 10% mean
    metrics. ``labels``: ``[n]`` in [0, 1], NaN = unlabelled."""
    params = freeze_trunk(model)
    optimizer = optim.make(params)
    inputs, targets, mask = nado_targets(labelled)
    n = inputs.shape[0]
    batch_size = min(batch_size, n)
    tail: List[Dict[str, float]] = []
    model.train()
    for step in range(steps):
        idx = batch_indices(n, batch_size, seed, stream, step)
        x = inputs[idx]
        lm_logits, nado_logits = model(x, _positions(x), None)
        loss, parts = nado_loss(lm_logits.detach(), nado_logits, targets[idx], labels[idx],
                                mask[idx], alpha=alpha)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip(params, optim.grad_clip)
        optimizer.step()
        m = {"nado_loss": loss.item(), "nado_ce": parts["ce"].item(),
             "nado_cons": parts["cons"].item(), "grad_norm": grad_norm}
        if step >= steps - max(steps // 10, 1):
            tail.append(m)
        if on_step is not None:
            on_step(step, m)
    return {k: sum(m[k] for m in tail) / len(tail) for k in tail[0]} if tail else {}
