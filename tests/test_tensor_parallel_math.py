"""The math layer split over a real 2-process gloo group equals the single-process values."""

import torch
import torch.distributed as dist

from nemo_acft.nado import closed_form_kl, guided_log_probs, nado_loss, vocab_sum
from tests.dist_utils import run_workers
from tests.test_nado_math import _random_nado_batch

V = 8


def _all_math(z, s, tokens, labels, mask, weights, tp_group):
    """Every public op and its gradients; returns a dict of (possibly vocab-sharded) tensors."""
    z = z.clone().requires_grad_()
    s = s.clone().requires_grad_()
    out = {"log_q": guided_log_probs(z, s, tp_group)}
    kl, log_z = closed_form_kl(z, s, tp_group, return_log_z=True)
    up = torch.linspace(0.5, 1.5, kl.numel(), dtype=kl.dtype).view_as(kl)
    (kl * up).sum().backward()
    out.update(kl=kl.detach(), log_z=log_z, kl_grad_z=z.grad.clone())
    z.grad = None
    loss, parts = nado_loss(z, s, tokens, labels, mask, alpha=0.8, tp_group=tp_group,
                            weights=weights)
    # A loss that also reads the sharded log q through a vocabulary reduction.
    (loss + vocab_sum(out["log_q"], tp_group).sum() * 1e-3).backward()
    out.update(loss=loss.detach(), ce=parts["ce"], cons=parts["cons"],
               loss_grad_z=z.grad.clone(), loss_grad_s=s.grad.clone())
    out["log_q"] = out["log_q"].detach()
    return out


def _tp_worker(rank, world_size):
    dist.init_process_group("gloo")
    z, s, tokens, labels, mask, weights = _random_nado_batch(11, v=V)
    shard = slice(rank * V // world_size, (rank + 1) * V // world_size)
    out = _all_math(z[..., shard], s[..., shard], tokens, labels, mask, weights,
                    dist.group.WORLD)
    dist.destroy_process_group()
    return out


def test_tp2_equals_single_process():
    full = _all_math(*_random_nado_batch(11, v=V), tp_group=None)
    shards = run_workers(_tp_worker, 2)
    sharded_keys = {"log_q", "kl_grad_z", "loss_grad_z", "loss_grad_s"}
    for key, ref in full.items():
        if key in sharded_keys:
            got = torch.cat([shards[0][key], shards[1][key]], dim=-1)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12, msg=key)
        else:
            for r in range(2):  # replicated on every rank
                torch.testing.assert_close(shards[r][key], ref, rtol=1e-6, atol=1e-12, msg=key)
