"""Interim main command: a short TP=2 forward/backward of the GPT + NADO model on CPU.

    torchrun --nproc-per-node=2 -m nemo_acft.demo [--steps 5]

It builds the tiny model split over two tensor-parallel ranks (gloo), and takes a few AdamW
steps on random tokens with the method's three terms: LM cross-entropy, λ · closed-form KL
toward the NADO-guided q, and the NADO loss on random sequence labels (which moves the head off
zero, so the KL becomes non-zero). It stands in for the training entry point until that lands.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.5, help="weight of the KL term")
    args = parser.parse_args(argv)

    import torch.distributed as dist
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_acft.models import (GPTConfig, NADOHeadConfig, build_gpt_nado, destroy_distributed,
                                  init_distributed, tp_group)
    from nemo_acft.nado import closed_form_kl, nado_loss

    torch.set_num_threads(1)
    init_distributed(tp=int(os.environ.get("WORLD_SIZE", 1)), pp=1, seed=1234)
    tp = dist.get_world_size()
    cfg = GPTConfig(vocab_size=500, seq_length=32, num_layers=2, hidden_size=64,
                    num_attention_heads=4, nado=NADOHeadConfig(num_layers=1))
    model = build_gpt_nado(cfg, tp=tp)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)  # same data on every rank
    rank0 = dist.get_rank() == 0
    if rank0:
        n = sum(p.numel() for p in model.parameters()) * tp
        print(f"GPT+NADO, TP={tp}, ~{n / 1e3:.0f}k parameters; {args.steps} steps on random tokens")
        print(f"{'step':>4} {'loss':>8} {'lm_ce':>8} {'kl':>9} {'nado':>8} {'s/step':>7}")
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        tokens = torch.randint(0, cfg.vocab_size, (8, cfg.seq_length + 1), generator=g)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
        positions = torch.arange(cfg.seq_length).expand_as(inputs)
        seq_labels = torch.randint(0, 2, (8,), generator=g).float()
        lm_logits, nado_logits = model(inputs, positions, None)
        ce = vocab_parallel_cross_entropy(lm_logits.float(), targets).mean()
        kl = closed_form_kl(lm_logits, nado_logits.detach(), tp_group()).mean()
        nado, _ = nado_loss(lm_logits.detach(), nado_logits, targets, seq_labels,
                            torch.ones_like(targets), tp_group=tp_group())
        loss = ce + args.lam * kl + nado
        optim.zero_grad()
        loss.backward()
        optim.step()
        if rank0:
            print(f"{step:>4} {loss.item():8.4f} {ce.item():8.4f} {kl.item():9.2e} "
                  f"{nado.item():8.4f} {time.perf_counter() - t0:7.3f}")
    destroy_distributed()


if __name__ == "__main__":
    main()
