"""The megatron-core GPT + NADO head on real TP/PP process groups over gloo.

References are independent runs: TP=1 for TP=2, PP=1 for PP=2 (with the same weights), and a
plain megatron-core GPTModel for the base-weights loading.
"""

import functools

import torch

from tests.dist_utils import run_workers

CFG = dict(vocab_size=200, seq_length=16, num_layers=2, hidden_size=64, num_attention_heads=4,
           make_vocab_size_divisible_by=64, nado={"num_layers": 1})
B, S = 4, 16


def _batch(vocab=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(S).expand(B, S),
        "seq_labels": torch.tensor([1.0, 0.0, 1.0, float("nan")]),
        "loss_mask": torch.cat([torch.zeros(B, 4), torch.ones(B, S - 4)], dim=1),
    }


def _randomize_head(model, tp_rank, tp_size, seed=17):
    """Give the zero-initialised head output layer non-zero weights: one full matrix from a
    fixed seed, sliced by tensor-parallel rank, so TP=1 and TP=2 hold the same weights."""
    w = model.nado_head.output_layer.weight
    full = 0.5 * torch.randn(w.shape[0] * tp_size, w.shape[1],
                             generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        w.copy_(full[tp_rank * w.shape[0]:(tp_rank + 1) * w.shape[0]])


def _acft_loss(batch, output):
    """LM cross-entropy + 0.5 · KL on the corpus tokens + NADO loss on the labelled samples."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_acft.models import tp_group
    from nemo_acft.nado import closed_form_kl, nado_loss

    lm_logits, nado_logits = output
    ce = vocab_parallel_cross_entropy(lm_logits.float(), batch["labels"]).mean()
    kl = closed_form_kl(lm_logits, nado_logits.detach(), tp_group()).mean()
    nado, _ = nado_loss(lm_logits.detach(), nado_logits, batch["labels"], batch["seq_labels"],
                        batch["loss_mask"], alpha=1.0, tp_group=tp_group())
    loss = ce + 0.5 * kl + nado
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                  "nado": nado.detach()}


def _tp_worker(rank, world_size):
    from nemo_acft.models import GPTConfig, build_gpt_nado, init_distributed

    init_distributed(tp=world_size, pp=1, seed=123)
    model = build_gpt_nado(GPTConfig(**CFG), tp=world_size)
    _randomize_head(model, rank, world_size)
    batch = _batch()
    lm, nado = model(batch["input_ids"], batch["position_ids"], None)
    losses = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
    loss, _ = _acft_loss(batch, (lm, nado))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"lm": lm.detach(), "nado": nado.detach(), "loss": loss.detach(),
            "token_lm_loss": losses.lm_loss.detach(), "token_kl": losses.kl.detach(),
            "log_z": losses.log_z, "grads": grads}


def test_tp2_equals_tp1():
    (ref,) = run_workers(_tp_worker, 1)
    tp = run_workers(_tp_worker, 2)
    assert ref["token_kl"].abs().max() > 1e-4, "head is non-zero, so the KL must be too"
    for key in ("lm", "nado"):  # vocab-parallel: concatenate the shards
        got = torch.cat([tp[0][key], tp[1][key]], dim=-1)
        torch.testing.assert_close(got, ref[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in ("loss", "token_lm_loss", "token_kl", "log_z"):
        for r in range(2):
            torch.testing.assert_close(tp[r][key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    # a vocab-sharded weight: the TP=2 gradient shards are the TP=1 gradient's rows
    name = "output_layer.weight"
    got = torch.cat([tp[0]["grads"][name], tp[1]["grads"][name]], dim=0)
    torch.testing.assert_close(got, ref["grads"][name], rtol=1e-4, atol=1e-6)
    name = "nado_head.output_layer.weight"
    got = torch.cat([tp[0]["grads"][name], tp[1]["grads"][name]], dim=0)
    torch.testing.assert_close(got, ref["grads"][name], rtol=1e-4, atol=1e-6)


def _forward_step(batch, data_iterator, model):
    micro = next(data_iterator)
    output = model(micro["input_ids"], micro["position_ids"], None)
    return output, functools.partial(_acft_loss, micro)


def _microbatches(batch, n):
    keys = list(batch)
    return [{k: batch[k][i::n] for k in keys} for i in range(n)]


def _pp_worker(rank, world_size, state_dict):
    """PP=world_size stage of the model with the weights of a PP=1 state dict; runs megatron's
    pipelined forward-backward on 2 microbatches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_acft.models import GPTConfig, build_gpt_nado, init_distributed

    init_distributed(tp=1, pp=world_size, seed=123)
    cfg = GPTConfig(**CFG)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    model = build_gpt_nado(cfg, pp=world_size, pre_process=first, post_process=last)
    per_stage = cfg.num_layers // world_size
    offset = parallel_state.get_pipeline_model_parallel_rank() * per_stage

    def global_name(name):
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(i) + offset}.{rest}"
        return name

    local = {k: state_dict[global_name(k)] for k in model.state_dict()}
    model.load_state_dict(local, strict=True)
    batch = _batch()
    n_micro = 2
    fwd_bwd = get_forward_backward_func()
    stats = fwd_bwd(forward_step_func=functools.partial(_forward_step, batch),
                    data_iterator=iter(_microbatches(batch, n_micro)), model=[model],
                    num_microbatches=n_micro, seq_length=S, micro_batch_size=B // n_micro,
                    forward_only=False)
    grads = {global_name(n): p.grad for n, p in model.named_parameters()}
    losses = torch.stack([s["loss"] for s in stats]) if last else None
    return {"losses": losses, "grads": grads}


def _pp1_reference(rank, world_size):
    from nemo_acft.models import GPTConfig, build_gpt_nado, init_distributed

    init_distributed(tp=1, pp=1, seed=123)
    model = build_gpt_nado(GPTConfig(**CFG))
    _randomize_head(model, 0, 1)
    return {k: v if v is None else v.clone() for k, v in model.state_dict().items()}


def test_pp2_schedule_equals_pp1():
    (state_dict,) = run_workers(_pp1_reference, 1)
    (ref,) = run_workers(_pp_worker, 1, state_dict)
    stages = run_workers(_pp_worker, 2, state_dict)
    torch.testing.assert_close(stages[1]["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    assert (ref["losses"] > 0).all()
    seen = set()
    for stage in stages:
        for name, grad in stage["grads"].items():
            assert grad is not None and torch.count_nonzero(grad) > 0, f"no gradient: {name}"
            torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-4, atol=1e-6,
                                       msg=name)
            seen.add(name)
    assert seen == set(ref["grads"]), "every parameter lives on exactly one stage"
    assert any(n.startswith("nado_head.layers.") for n in seen)


def _base_loading_worker(rank, world_size, tmp_dir):
    from nemo_acft.models import GPTConfig, build_gpt_nado, init_distributed

    init_distributed(tp=1, pp=1, seed=5)
    cfg = GPTConfig(**CFG)
    plain = build_gpt_nado(cfg, with_head=False)  # a megatron-core GPTModel, no head
    torch.manual_seed(99)  # the NADO model's own init differs from the base's
    model = build_gpt_nado(cfg)
    batch = _batch()
    before = model(batch["input_ids"], batch["position_ids"], None)[0]
    model.load_base_state_dict(plain.state_dict())
    lm, nado = model(batch["input_ids"], batch["position_ids"], None)
    plain_logits = plain(batch["input_ids"], batch["position_ids"], None)
    out = {"base_changed_logits": not torch.equal(before, lm),
           "lm_equal": torch.equal(lm, plain_logits),
           "head_zero": torch.count_nonzero(model.nado_head.output_layer.weight).item() == 0,
           "nado_zero": torch.count_nonzero(nado).item() == 0}
    # The head alone: save, load into a fresh model, same NADO logits; trunk untouched.
    _randomize_head(model, 0, 1)
    nado_before = model(batch["input_ids"], batch["position_ids"], None)[1]
    torch.save(model.head_state_dict(), f"{tmp_dir}/head.pt")
    assert all(not k.startswith("nado_head.") for k in model.base_state_dict())
    fresh = build_gpt_nado(cfg)
    fresh.load_base_state_dict(model.base_state_dict())
    fresh.load_head_state_dict(torch.load(f"{tmp_dir}/head.pt"))
    out["head_round_trip"] = torch.equal(
        fresh(batch["input_ids"], batch["position_ids"], None)[1], nado_before)
    # A state dict of another shape is refused with the key named.
    bad = dict(plain.state_dict())
    bad.pop("decoder.final_layernorm.weight")
    try:
        fresh.load_base_state_dict(bad)
        out["bad_refused"] = ""
    except KeyError as e:
        out["bad_refused"] = str(e)
    return out


def test_base_weights_load_with_fresh_head(tmp_path):
    (out,) = run_workers(_base_loading_worker, 1, str(tmp_path))
    assert out["base_changed_logits"]
    assert out["lm_equal"] and out["head_zero"] and out["nado_zero"]
    assert out["head_round_trip"]
    assert "decoder.final_layernorm.weight" in out["bad_refused"]


def _fp32_head_worker(rank, world_size):
    from nemo_acft.models import GPTConfig, NADOHeadConfig, build_gpt_nado, init_distributed

    init_distributed(tp=1, pp=1, seed=5)
    cfg = GPTConfig(**{**CFG, "params_dtype": "bfloat16",
                       "nado": NADOHeadConfig(num_layers=1, fp32=True)})
    model = build_gpt_nado(cfg)
    batch = _batch()
    lm, nado = model(batch["input_ids"], batch["position_ids"], None)
    losses = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
    return {"lm": lm.dtype, "nado": nado.dtype, "kl": losses.kl.dtype,
            "head": {p.dtype for n, p in model.named_parameters() if n.startswith("nado_head.")},
            "trunk_linear": model.decoder.layers[0].mlp.linear_fc1.weight.dtype}


def test_fp32_head_on_bf16_trunk():
    (out,) = run_workers(_fp32_head_worker, 1)
    assert out["trunk_linear"] == torch.bfloat16 and out["lm"] == torch.bfloat16
    assert out["head"] == {torch.float32} and out["nado"] == torch.float32
    assert out["kl"] == torch.float32
