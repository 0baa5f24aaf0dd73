"""The model interface (MegatronGPTACFTModel built by NeMo, stepped inside megatron-core's
forward-backward schedule) on real gloo worlds:

- an LM step (LM loss + per-domain KL) and a NADO step give the same loss, metrics and
  gradients at TP=2, PP=2 and DP=2 as at TP=1 on the same global batch;
- the step's loss and gradient equal a float64 reference written from the raw logits;
- θ and φ saved as distributed checkpoints at TP=2 (or PP=2) load at TP=1 with the same logits;
- optimizer and scheduler state round-trip bit for bit (a resumed run equals an uninterrupted one);
- ``token_log_probs`` against log-softmax of the raw logits (guided, padded ids masked), and
  ``generate`` at TP=2 equal to TP=1;
- ``.nemo`` in (a stock GPT's, resharded to TP=2 by NeMo, head at zero) and out (the plain
  ``.nemo`` that stock ``MegatronGPTModel`` restores with identical logits; the one with the head);
- the fp32 head on a bf16 trunk, the CPU gradient clipping, the version check;
- ``nado_head.kind: separate`` (a NADO model reading tokens) against the LM it copies.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_workers
from tests.engine_utils import build, corpus_batch, same_weights_for_any_split

LAMBDAS = [1.0, 3.0]


def _gathered_grads(model):
    """Every parameter's gradient as the full (TP-gathered) tensor, keyed by global name (PP
    stages' layers by their layer number); the head's output layer's too."""
    import re

    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    m = model.module
    for name, p in m.named_parameters():
        if p.grad is None:
            continue
        key = name
        mt = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if mt:
            key = f"layer{m.decoder.layers[int(mt[1])].layer_number}.{mt[2]}"
        g = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=parallel_state.get_tensor_model_parallel_group())
            g = torch.cat(parts, p.partition_dim)
        out[key] = g
    return out


def _steps_worker(rank, world, tp, pp):
    from nemo_acft.models.objectives import LMLoss, Regularizer
    from nemo_acft.nado import fused

    # 24 tokens a chunk at TP 1 (× TP above): micro-batches of 64 tokens cross chunk boundaries
    m = build(tp=tp, pp=pp, world=world, acft={"nado_head": {
        "num_layers": 1, "fp32": False, "loss_chunk_tokens": 24, "kind": "head"}})
    same_weights_for_any_split(m.module, tp)
    out = {"chunks": set()}
    apply = fused._apply

    def spy(lm_logits, targets, tp_group, chunk_tokens, *a, **k):
        out["chunks"].add(chunk_tokens)
        return apply(lm_logits, targets, tp_group, chunk_tokens, *a, **k)

    fused._apply = spy
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    reg = Regularizer(torch.tensor(LAMBDAS), None, 0.0)
    lm = [m.lm_step(corpus_batch(seed=i), reg, micro_batch_size=2) for i in range(2)]
    out["lm"] = lm
    m._optimizer.zero_grad()
    m._fwd_bwd(corpus_batch(seed=5), LMLoss(reg), 2)
    m._grad_reductions()
    out["lm_grads"] = _gathered_grads(m)
    if pp == 1:
        m.configure_training("head", m.cfg.optim, max_steps=10)
        b = corpus_batch(seed=7)
        b["labels"] = torch.tensor([1., 0., float("nan"), 1., 0., 1., 1., 0.])
        out["nado"] = [m.nado_step(b, alpha=0.7, micro_batch_size=2) for _ in range(2)]
    return out


@pytest.fixture(scope="module")
def tp1_steps():
    return run_workers(_steps_worker, 1, 1, 1)[0]


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)])
def test_layouts_step_like_tp1(tp1_steps, tp, pp, world):
    """TP=2, PP=2 and data parallelism 2 (tp=pp=1 in a world of 2): the same losses, metrics and
    gradients as one process on the same global batch (micro-batches of 2 rows), with the fused
    pass cut into 24 × TP-token chunks (other boundaries at TP 2 than at TP 1)."""
    results = run_workers(_steps_worker, world, tp, pp)
    assert tp1_steps["chunks"] == {24}
    for r in results:
        if r["chunks"]:  # the last pipeline stage: a chunk of 24 × TP tokens
            assert r["chunks"] == {24 * tp}, (tp, pp, r["chunks"])
        for ref, got in zip(tp1_steps["lm"], r["lm"]):
            for key in ("loss", "lm_loss", "penalty", "kl", "mean_z", "grad_norm", "lr"):
                assert got[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-7), (tp, pp, key)
            assert got["kl_by_domain"] == pytest.approx(ref["kl_by_domain"], rel=2e-5)
        if pp == 1:
            for ref, got in zip(tp1_steps["nado"], r["nado"]):
                for key in ("nado_loss", "nado_ce", "nado_cons", "grad_norm"):
                    assert got[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-7), (tp, key)
    grads = {}
    for r in results:
        grads.update(r["lm_grads"])  # PP: each stage has its own layers
    assert grads.keys() == tp1_steps["lm_grads"].keys()
    for key, g in tp1_steps["lm_grads"].items():  # fp32 sums in another order: 2e-5 of the max
        torch.testing.assert_close(grads[key], g, rtol=1e-4, atol=2e-5 * float(g.abs().max()),
                                   msg=key)


def _reference_worker(rank, world, compile_loss=False):
    """The step's loss and gradient against float64 from the raw logits."""
    from nemo_acft.models.objectives import LMLoss, Regularizer
    from nemo_acft.nado.fused import _COMPILED

    _COMPILED.clear()  # this worker's compiles only (a fork inherits the test process's)

    m = build(acft={"nado_head": {"num_layers": 1, "fp32": False, "loss_chunk_tokens": 256,
                                  "compile_loss": compile_loss}})
    assert m.module.nado_config.compile_loss is compile_loss
    same_weights_for_any_split(m.module, 1)
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    b = corpus_batch(seed=3)
    reg = Regularizer(torch.tensor(LAMBDAS), 0.52, 0.48)
    pos = torch.arange(b["inputs"].shape[1]).expand_as(b["inputs"])
    with torch.no_grad():
        z, s = m.module(b["inputs"], pos, None)
    z, s = z.double().requires_grad_(), s.double()
    mask = b["loss_mask"].double()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(z.detach() + F.logsigmoid(s), -1)
    ce = -log_p.gather(-1, b["targets"].unsqueeze(-1)).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # gradient p − q through log_p
    log_z = torch.logsumexp(log_p.detach() + F.logsigmoid(s), -1)
    gate = ((log_z < math.log(0.52)) & (log_z >= math.log(0.48))).double()
    loss = (ce * mask).sum() / mask.sum()
    for d, lam in enumerate(LAMBDAS):
        rows = (b["domain_ids"] == d).double().unsqueeze(-1)
        loss = loss + lam * (kl * gate * mask * rows).sum() / (mask * rows).sum()
    loss.backward()
    m._optimizer.zero_grad()
    out_metrics = m._fwd_bwd(b, LMLoss(reg), 2)
    # dL/dz through the output layer: compare the output layer's weight gradient
    w_grad = m.module.output_layer.weight.grad.detach().clone()
    with torch.no_grad():
        hidden = {}
        handle = m.module.output_layer.register_forward_hook(
            lambda mod, inp, out: hidden.__setitem__("h", inp[0].detach()))
        m.module(b["inputs"], pos, None)
        handle.remove()
    h = hidden["h"].transpose(0, 1).double()  # [b, s, hidden]
    ref_w = torch.einsum("bsv,bsh->vh", z.grad, h)
    return {"loss": out_metrics["lm_loss"] + out_metrics["penalty"], "ref": float(loss),
            "compiled": len(_COMPILED),
            "gated_share": out_metrics["gated_share"],
            "ref_gated": float(((1 - gate) * mask).sum() / mask.sum()),
            "w_grad": w_grad, "ref_w_grad": ref_w}


@pytest.mark.parametrize("compile_loss", [False, True])
def test_lm_step_equals_float64_reference(compile_loss):
    """The model's step (the fused pass; with ``compile_loss`` its torch.compile-d chunks)."""
    (out,) = run_workers(_reference_worker, 1, compile_loss)
    assert out["compiled"] == (2 if compile_loss else 0)  # forward and backward chunk
    assert out["loss"] == pytest.approx(out["ref"], rel=1e-5)
    assert out["gated_share"] == pytest.approx(out["ref_gated"], abs=1e-6)
    assert 0.0 < out["ref_gated"] < 1.0  # both gates act on some positions, not all
    torch.testing.assert_close(out["w_grad"].double(), out["ref_w_grad"], rtol=1e-4, atol=1e-7)


def _logits(m, x):
    """Full-vocabulary (TP-gathered) LM and NADO logits of the last stage."""
    from nemo_acft.models.generate import _gather_vocab
    from nemo_acft.models.parallel import tp_group

    with torch.no_grad():
        z, s = m.module(x, torch.arange(x.shape[1]).expand_as(x), None)
    return _gather_vocab(z, tp_group()), _gather_vocab(s, tp_group())


def _save_worker(rank, world, tp, pp, path):
    from megatron.core import parallel_state

    from nemo_acft.models.objectives import Regularizer

    m = build(tp=tp, pp=pp, world=world)
    same_weights_for_any_split(m.module, tp)
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    m.lm_step(corpus_batch(seed=1), Regularizer(torch.tensor(LAMBDAS)), micro_batch_size=4)
    m.save_part(f"{path}/trunk", "trunk", with_optimizer=True)
    m.save_part(f"{path}/head", "head")
    x = corpus_batch(seed=2)["inputs"][:3]
    if pp == 1:
        return _logits(m, x)
    # PP: the last stage's logits of the whole pipeline, by a forward-only schedule pass
    lp = m.token_log_probs(corpus_batch(seed=2)["inputs"][:3])
    return {"lp": lp, "last": parallel_state.is_pipeline_last_stage()}


def _load_worker(rank, world, path):
    m = build()
    m.load_part(f"{path}/trunk", "trunk")
    m.load_part(f"{path}/head", "head")
    x = corpus_batch(seed=2)["inputs"][:3]
    return _logits(m, x), m.token_log_probs(x)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parts_saved_at_tp2_or_pp2_load_at_tp1(tmp_path, tp, pp):
    saved = run_workers(_save_worker, 2, tp, pp, str(tmp_path))
    (got,) = run_workers(_load_worker, 1, str(tmp_path))
    (z1, s1), lp1 = got
    if pp == 1:
        z2, s2 = saved[0]
        for a, b in ((z1, z2), (s1, s2)):  # fp32 sums over TP shards: 1e-5 of the largest
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        assert s1.abs().max() > 0.1  # a non-trivial head crossed too
    else:
        torch.testing.assert_close(lp1, saved[0]["lp"], rtol=1e-5, atol=2e-5)


def _in_process_worker(rank, world, path):
    """Save and load a part with megatron's forking caller made to fail and its MSC switch on:
    the write happens in this process, the files are read without MSC, the switch is back on
    after, and the weights round-trip into a model whose every weight was moved first."""
    from megatron.core.dist_checkpointing.strategies import async_utils
    from megatron.core.msc_utils import MultiStorageClientFeature as msc

    def forked(*_a, **_k):
        raise AssertionError("a save forked megatron's TemporalAsyncCaller")

    async_utils.TemporalAsyncCaller.schedule_async_call = forked
    seen = []
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    reader = mcore_torch._get_filesystem_reader
    mcore_torch._get_filesystem_reader = lambda *a, **k: (seen.append(msc.is_enabled()),
                                                           reader(*a, **k))[1]
    msc._enabled = True  # as megatron sets it when the package is installed
    m = build()
    same_weights_for_any_split(m.module, 1)  # a non-zero head too
    m.save_part(f"{path}/head", "head")
    m.save_part(f"{path}/trunk", "trunk")
    fresh = build()
    with torch.no_grad():
        for q in fresh.module.parameters():
            q.add_(1.0)
    a = {k: v for k, v in m.module.state_dict().items() if torch.is_tensor(v)}
    before = {k: v.clone() for k, v in fresh.module.state_dict().items() if torch.is_tensor(v)}
    fresh.load_part(f"{path}/head", "head")
    fresh.load_part(f"{path}/trunk", "trunk")
    b = fresh.module.state_dict()
    flags = {"after": msc._enabled, "during_load": seen}
    return (flags, all(torch.equal(a[k], b[k]) for k in a),
            all(not torch.equal(a[k], before[k]) for k in a if a[k].is_floating_point()))


def test_parts_are_written_in_this_process_and_read_without_msc(tmp_path):
    ((flags, same, differs),) = run_workers(_in_process_worker, 1, str(tmp_path))
    assert differs  # every weight differed before the load: the round trip is not trivial
    assert same
    assert flags["during_load"] and not any(flags["during_load"])
    assert flags["after"] is True


def _resume_worker(rank, world, path, mode):
    """4 steps straight, or 2 steps + save with the optimizer + a fresh model that loads and
    takes 2 more."""
    from nemo_acft.models.objectives import Regularizer

    reg = Regularizer(torch.tensor(LAMBDAS))
    m = build()
    same_weights_for_any_split(m.module, 1)
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    steps = range(4) if mode == "straight" else range(2)
    for i in steps:
        m.lm_step(corpus_batch(seed=i), reg, micro_batch_size=4)
    if mode == "straight":
        return {k: v.clone() for k, v in m.module.state_dict().items() if torch.is_tensor(v)}
    m.save_part(f"{path}/trunk", "trunk", with_optimizer=True)
    m.save_part(f"{path}/head", "head")
    fresh = build(seed=99)
    fresh.configure_training("trunk", fresh.cfg.optim, max_steps=10)
    fresh.load_part(f"{path}/trunk", "trunk", with_optimizer=True)
    fresh.load_part(f"{path}/head", "head")
    for i in range(2, 4):
        fresh.lm_step(corpus_batch(seed=i), reg, micro_batch_size=4)
    return {k: v.clone() for k, v in fresh.module.state_dict().items() if torch.is_tensor(v)}


def test_optimizer_and_scheduler_state_resume_bit_exact(tmp_path):
    (straight,) = run_workers(_resume_worker, 1, str(tmp_path), "straight")
    (resumed,) = run_workers(_resume_worker, 1, str(tmp_path), "resume")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def _log_probs_worker(rank, world, tp):
    from nemo_acft.models.generate import SamplingParams

    m = build(tp=tp, world=tp, make_vocab_size_divisible_by=96)
    same_weights_for_any_split(m.module, tp)
    x = corpus_batch(rows=3, seq=12, seed=4)["inputs"]
    z, s = _logits(m, x)
    out = {"lp": m.token_log_probs(x), "lq": m.token_log_probs(x, guidance=2.0),
           "lp_max": m.token_log_probs(x, return_max=True)[1], "z": z, "s": s,
           "vocab": m.vocab_size}
    params = SamplingParams(max_new_tokens=6, seed=3, top_k=20, top_p=0.9)
    prompts = [[5, 6, 7], [8, 9], [10]]
    out["gen"] = m.generate(prompts, params).tokens
    out["gen_guided"] = m.generate(prompts, params, guided=True).tokens
    return out


def test_token_log_probs_and_generate():
    (one,) = run_workers(_log_probs_worker, 1, 1)
    z, s, v = one["z"].double(), one["s"].double(), one["vocab"]
    x = corpus_batch(rows=3, seq=12, seed=4)["inputs"]
    targets = x[:, 1:]
    real = z[:, :-1, :v]  # padded ids have probability 0
    want = torch.log_softmax(real, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(one["lp"].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one["lp_max"].double(), torch.log_softmax(real, -1).amax(-1),
                               rtol=1e-5, atol=1e-5)
    q = torch.log_softmax(real + 2.0 * F.logsigmoid(s[:, :-1, :v]), -1)
    torch.testing.assert_close(one["lq"].double(), q.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                               rtol=1e-5, atol=1e-5)
    assert z.shape[-1] > v  # the vocabulary is padded, so the masking matters
    two = run_workers(_log_probs_worker, 2, 2)
    for r in two:
        torch.testing.assert_close(r["lp"], one["lp"], rtol=1e-5, atol=1e-5)
        assert torch.equal(r["gen"], one["gen"]) and torch.equal(r["gen_guided"], one["gen_guided"])
    assert not torch.equal(one["gen"], one["gen_guided"])


def _pp_generate_worker(rank, world):
    from nemo_acft.models.generate import SamplingParams

    m = build(pp=2, world=2)
    try:
        m.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    except ValueError as e:
        return str(e)
    return None


def test_generate_at_pp2_is_a_clear_error():
    msgs = run_workers(_pp_generate_worker, 2)
    assert all(m and "pipeline_model_parallel_size=2" in m and "oracle_group" in m for m in msgs)


def _nemo_io_worker(rank, world, tmp):
    """A plain GPT .nemo saved by stock MegatronGPTModel at TP=1 -> MegatronGPTACFTModel at TP
    ``world`` (resharded by NeMo; trunk loaded, head at zero) -> the plain .nemo out, restored by
    stock MegatronGPTModel -> the .nemo with the head, restored by our class."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from omegaconf import open_dict

    from nemo_acft.models.export import export_plain_gpt, export_with_head
    from nemo_acft.models.generate import _gather_vocab
    from nemo_acft.models.parallel import tp_group

    x = corpus_batch(rows=2, seq=16, seed=0)["inputs"]
    pos = torch.arange(16).expand_as(x)
    if world == 1:  # the plain .nemo, written once by a stock model at TP=1
        m = build()
        cfg = m.cfg.copy()
        with open_dict(cfg):
            cfg.pop("acft")
        plain = MegatronGPTModel(cfg, m.trainer)
        same_weights_for_any_split(plain.model, 1)
        plain.save_to(f"{tmp}/plain.nemo")
        with torch.no_grad():
            torch.save(plain.model(x, pos, None), f"{tmp}/plain_logits.pt")
    ref = torch.load(f"{tmp}/plain_logits.pt")
    acft = build(tp=world, restore_from=f"{tmp}/plain.nemo")
    out = {"base_only": acft.acft_restored_base_only}
    z, s = _logits(acft, x)
    out["restore_lm"] = (z - ref).abs().max().item()
    out["restore_head"] = s.abs().max().item()
    with torch.no_grad():
        w = acft.module.nado_head.output_layer.weight
        w.normal_(generator=torch.Generator().manual_seed(rank))
    z, s = _logits(acft, x)
    export_plain_gpt(acft, f"{tmp}/served{world}.nemo")
    export_with_head(acft, f"{tmp}/with_head{world}.nemo")
    served = MegatronGPTModel.restore_from(f"{tmp}/served{world}.nemo", trainer=acft.trainer)
    with torch.no_grad():
        zs = _gather_vocab(served.model(x, pos, None), tp_group())
    out["served_type"] = type(served.model).__name__
    out["served_lm"] = (zs - z).abs().max().item()
    back = build(tp=world, restore_from=f"{tmp}/with_head{world}.nemo")
    z2, s2 = _logits(back, x)
    out["back_lm"] = (z2 - z).abs().max().item()
    out["back_head"] = (s2 - s).abs().max().item()
    out["head_nonzero"] = s.abs().max().item()
    import os
    out["no_temporaries"] = not [p for p in os.listdir(tmp) if ".tmp" in p]
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_nemo_in_and_out(tmp_path_factory, world):
    tmp = tmp_path_factory.getbasetemp() / "nemo_io"
    tmp.mkdir(exist_ok=True)
    if world == 2 and not (tmp / "plain.nemo").is_file():
        run_workers(_nemo_io_worker, 1, str(tmp))
    for out in run_workers(_nemo_io_worker, world, str(tmp)):
        assert out["base_only"]
        assert out["restore_lm"] < 1e-5 and out["restore_head"] == 0.0
        assert out["served_type"] == "GPTModel" and out["served_lm"] == 0.0
        assert out["head_nonzero"] > 0.1
        assert out["back_lm"] == 0.0 and out["back_head"] == 0.0
        assert out["no_temporaries"]


def _fp32_head_worker(rank, world):
    """The head's own dtype: an fp32 head on a bf16 trunk config (megatron_amp_O2 on GPU)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_acft.models.gpt_nado import NADOHead, NADOHeadConfig

    m = build()
    cfg = dataclasses.replace(m.transformer_config, params_dtype=torch.bfloat16, bf16=True)
    head = NADOHead(cfg, NADOHeadConfig(num_layers=1, fp32=True), get_gpt_layer_local_spec(),
                    512, first_layer_number=3)
    h = torch.randn(5, 2, cfg.hidden_size, dtype=torch.bfloat16)
    out = head(h)
    return {p.dtype for p in head.parameters()}, out.dtype


def test_fp32_head_on_bf16_trunk():
    ((dtypes, out),) = run_workers(_fp32_head_worker, 1)
    assert dtypes == {torch.float32} and out == torch.float32


def _separate_worker(rank, world, tp, path, position_embedding_type):
    """``nado_head.kind: separate`` built, warm-started from the trunk and, with the trunk's
    final norm and output layer copied in too, made into a copy of the LM; saved as a part."""
    from nemo_acft.models.generate import SamplingParams

    m = build(tp=tp, world=tp, head_layers=2, head_kind="separate",
              position_embedding_type=position_embedding_type)
    trunk, head = m.module, m.module.nado_head
    if path is not None and tp == 1:  # the part saved at TP 2, resharded
        m.load_part(f"{path}/head", "head")
        m.load_part(f"{path}/trunk", "trunk")
        x = corpus_batch(rows=3, seq=12, seed=4)["inputs"]
        z, s = _logits(m, x)
        return {"z": z, "s": s}
    same_weights_for_any_split(trunk, tp)  # the head's embedding and layers get other values
    head.warm_start_from(trunk)
    with torch.no_grad():
        head.final_layernorm.load_state_dict(trunk.decoder.final_layernorm.state_dict())
        head.output_layer.weight.copy_(trunk.output_layer.weight)
    x = corpus_batch(rows=3, seq=12, seed=4)["inputs"]
    z, s = _logits(m, x)
    g = m.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=5, seed=3), guided=True)
    out = {"z": z, "s": s, "gen": g, "lq": m.token_log_probs(g.tokens, guidance=1.0)}
    if path is not None:
        m.save_part(f"{path}/head", "head")
        m.save_part(f"{path}/trunk", "trunk")
    with torch.no_grad():  # the trunk moves; a separate NADO model does not see it
        for p in trunk.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out["z_moved"], out["s_moved"] = _logits(m, x)
    return out


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_separate_nado_model_reads_tokens(tmp_path, position_embedding_type):
    """The prototypes' design: R from a NADO model of its own over the tokens. A copy of the LM
    (the trunk's embedding and layers by warm_start_from, its norm and output layer by hand)
    gives the LM's logits exactly, at TP 2; R does not move with the trunk; KV-cached guided
    sampling reads the separate model at the decoded positions (its log-probs equal the full
    forward's); the part saved at TP 2 loads at TP 1 with the same logits."""
    two = run_workers(_separate_worker, 2, 2, str(tmp_path), position_embedding_type)
    r = two[0]
    z, s = r["z"], r["s"]
    torch.testing.assert_close(s, z, rtol=1e-5, atol=1e-5 * float(z.abs().max()))
    assert (r["z_moved"] - z).abs().max() > 1e-2  # the trunk did move
    torch.testing.assert_close(r["s_moved"], s, rtol=0, atol=0)
    g = r["gen"]
    for i in range(g.tokens.shape[0]):
        lo, hi = int(g.prompt_lengths[i]), int(g.lengths[i])
        torch.testing.assert_close(g.logprobs[i, lo:hi], r["lq"][i, lo - 1:hi - 1],
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two[1]["s"], s, rtol=1e-5, atol=1e-5 * float(s.abs().max()))
    (one,) = run_workers(_separate_worker, 1, 1, str(tmp_path), position_embedding_type)
    torch.testing.assert_close(one["s"], s, rtol=1e-5, atol=1e-5 * float(s.abs().max()))
    torch.testing.assert_close(one["z"], z, rtol=1e-5, atol=1e-5 * float(z.abs().max()))


def test_separate_nado_config_errors():
    from nemo_acft.models.gpt_nado import NADOHeadConfig

    with pytest.raises(ValueError, match="kind='sidecar'"):
        NADOHeadConfig(kind="sidecar")
    with pytest.raises(ValueError, match="num_layers=0"):
        NADOHeadConfig(kind="separate", num_layers=0)


def _clip_worker(rank, world_size):
    from nemo_acft.cpu_compat import _clip_grad_norm_fp32_cpu
    from nemo_acft.models import init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape, generator=g) * 3
        y.grad = x.grad.clone()
    ours = float(_clip_grad_norm_fp32_cpu(a, 1.5))
    ref = float(torch.nn.utils.clip_grad_norm_(b, 1.5))
    return ours, ref, [x.grad for x in a], [y.grad for y in b]


def test_cpu_gradient_clipping_matches_torch():
    ((ours, ref, ga, gb),) = run_workers(_clip_worker, 1)
    assert ours == pytest.approx(ref, rel=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_version_check_names_versions(monkeypatch):
    from importlib import metadata

    import nemo_acft.models.acft_model as engine

    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda d: "2.4.1" if d == "nemo-toolkit" else real(d))
    with pytest.raises(ImportError, match=r"needs nemo-toolkit==2.5.0, megatron-core==0.13.1; "
                                          r"installed: nemo-toolkit 2.4.1"):
        engine.check_versions()


# --- the reference (model.acft.reference: frozen | base) ------------------------------------


def _ref_step_worker(rank, world, tp, pp, path, compile_loss=False):
    """An LM step whose q comes from a frozen reference: (1) with the reference equal to the
    model, the same metrics as q from the model itself; (2) after the trunk has moved, the
    metrics, and at TP = PP = 1 the float64 brute force of the loss and the output layer's
    gradient from the two models' raw logits."""
    from nemo_acft.models.objectives import LMLoss, Regularizer
    from nemo_acft.nado.fused import _COMPILED

    _COMPILED.clear()  # this worker's compiles only (a fork inherits the test process's)
    extra = {}
    if compile_loss:
        extra = {"acft": {"nado_head": {"num_layers": 1, "fp32": False,
                                        "loss_chunk_tokens": 256, "compile_loss": True}}}
    m = build(tp=tp, pp=pp, world=world, **extra)
    same_weights_for_any_split(m.module, tp)
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    m.save_part(f"{path}/trunk", "trunk")
    m.save_part(f"{path}/head", "head")
    m.set_reference(f"{path}/trunk", f"{path}/head")
    b = corpus_batch(seed=3)
    out = {}
    for name, ref in (("current", False), ("same", True)):
        m._optimizer.zero_grad()
        out[name] = m._fwd_bwd(b, LMLoss(Regularizer(torch.tensor(LAMBDAS), None, 0.0, ref)), 2)
    m.lm_step(corpus_batch(seed=9), None, micro_batch_size=4)  # the trunk moves, q_ref stays
    m._optimizer.zero_grad()
    out["moved"] = m._fwd_bwd(b, LMLoss(Regularizer(torch.tensor(LAMBDAS), 0.9, 0.0, True)), 2)
    if tp == pp == 1:
        out["w_grad"] = m.module.output_layer.weight.grad.detach().clone()
        pos = torch.arange(b["inputs"].shape[1]).expand_as(b["inputs"])
        hidden = {}
        handle = m.module.output_layer.register_forward_hook(
            lambda mod, inp, o: hidden.__setitem__("h", inp[0].detach()))
        with torch.no_grad():
            z, _ = m.module(b["inputs"], pos, None)
            zr, sr = m.reference_module(b["inputs"], pos, None)
        handle.remove()
        out.update(z=z, zr=zr, sr=sr, h=hidden["h"].transpose(0, 1))
    out["compiled"] = sorted(f.__name__ for f in _COMPILED)
    return out


def _ref_step_against_float64(one):
    """(2) of :func:`_ref_step_worker`: brute force in float64 from the raw logits of the moved
    model and the reference."""
    b = corpus_batch(seed=3)
    z = one["z"].double().requires_grad_()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(one["zr"].double() + F.logsigmoid(one["sr"].double()), -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    log_z = torch.logsumexp(torch.log_softmax(one["zr"].double(), -1)
                            + F.logsigmoid(one["sr"].double()), -1)
    gate = (log_z < math.log(0.9)).double()
    mask = b["loss_mask"].double()
    ce = -log_p.gather(-1, b["targets"].unsqueeze(-1)).squeeze(-1)
    loss = (ce * mask).sum() / mask.sum()
    for d, lam in enumerate(LAMBDAS):
        rows = (b["domain_ids"] == d).double().unsqueeze(-1)
        loss = loss + lam * (kl * gate * mask * rows).sum() / (mask * rows).sum()
    loss.backward()
    moved = one["moved"]
    assert moved["lm_loss"] + moved["penalty"] == pytest.approx(float(loss), rel=1e-5)
    assert abs(moved["lm_loss"] - one["same"]["lm_loss"]) > 1e-3  # the trunk moved
    ref_w = torch.einsum("bsv,bsh->vh", z.grad, one["h"].double())
    torch.testing.assert_close(one["w_grad"].double(), ref_w, rtol=1e-4, atol=1e-7)


def test_lm_step_with_a_frozen_reference(tmp_path):
    (one,) = run_workers(_ref_step_worker, 1, 1, 1, str(tmp_path / "a"))
    # (1) reference = the model: the same step as q from the model
    for key in ("loss", "lm_loss", "penalty", "kl", "mean_z"):
        assert one["same"][key] == pytest.approx(one["current"][key], rel=1e-5), key
    _ref_step_against_float64(one)
    assert one["compiled"] == []
    # (3) TP = 2 and PP = 2: the same metrics (the reference's forward runs in the step at
    # PP = 1 and as its own forward-only pipeline pass at PP = 2)
    for tp, pp in ((2, 1), (1, 2)):
        for r in run_workers(_ref_step_worker, 2, tp, pp, str(tmp_path / f"{tp}{pp}")):
            for name in ("same", "moved"):
                for key in ("loss", "lm_loss", "penalty", "kl", "mean_z", "gated_share"):
                    assert r[name][key] == pytest.approx(one[name][key], rel=2e-5, abs=1e-7), \
                        (tp, pp, name, key)


def test_lm_step_with_a_frozen_reference_compiled(tmp_path):
    """``compile_loss: true`` with the reference (the default ``reference: frozen``): the
    compiled chunks run in the model's step and give the float64 brute force."""
    (one,) = run_workers(_ref_step_worker, 1, 1, 1, str(tmp_path / "a"), True)
    assert {"_fwd_chunk_tp1_ref", "_bwd_chunk_tp1_ref"} <= set(one["compiled"])
    _ref_step_against_float64(one)


# --- the reference's q shipped from elsewhere (model.acft.reference_on: oracle) -------------


def _shipped_q_worker(rank, world, tp, pp, path, top_k):
    """The reference's q computed by :meth:`reference_q` (here by the model while it equals the
    reference) and shipped with the batch, against the in-step reference: before and after
    the trunk moves. ``top_k`` None: the whole vocabulary (the coarsened KL is the full one)."""
    from nemo_acft.models.acft_model import SHIPPED_Q
    from nemo_acft.models.objectives import LMLoss, Regularizer

    m = build(tp=tp, pp=pp, world=world)
    same_weights_for_any_split(m.module, tp)
    m.configure_training("trunk", m.cfg.optim, max_steps=10)
    m.save_part(f"{path}/trunk", "trunk")
    m.save_part(f"{path}/head", "head")
    m.set_reference(f"{path}/trunk", f"{path}/head")
    v = m.module.vocab_size  # padded
    k = v if top_k is None else top_k
    b = corpus_batch(seed=3)
    tokens = torch.cat([b["inputs"], b["targets"][:, -1:]], dim=1)
    shipped = {**b, **m.reference_q(tokens, k, micro_batch_size=4)}
    # q where the loss counts only (b's rows are ragged: a placeholder on their padding)
    masked = {**b, **m.reference_q(tokens, k, micro_batch_size=4, loss_mask=b["loss_mask"])}
    out = {"v": v, "mask": b["loss_mask"], "masked": {key: masked[key] for key in SHIPPED_Q},
           **{key: shipped[key] for key in SHIPPED_Q}}
    m.lm_step(corpus_batch(seed=9), None, micro_batch_size=4)  # the trunk moves, q_ref stays
    shipped_reg = Regularizer(torch.tensor(LAMBDAS), 0.9, 0.0, True, shipped=True)
    for name, reg, batch in (
            ("inline", Regularizer(torch.tensor(LAMBDAS), 0.9, 0.0, True), b),
            ("shipped", shipped_reg, shipped), ("shipped_masked", shipped_reg, masked)):
        m._optimizer.zero_grad()
        out[name] = m._fwd_bwd(batch, LMLoss(reg), 2)
        if tp == pp == 1:
            out[name + "_w_grad"] = m.module.output_layer.weight.grad.detach().clone()
    if tp == pp == 1:
        with pytest.raises(KeyError, match=r"reference_on=oracle\): the batch lacks \['q_ids'"):
            m._fwd_bwd(b, LMLoss(Regularizer(torch.tensor(LAMBDAS), None, 0.0, True,
                                             shipped=True)), 2)
    return out


def test_shipped_q_of_the_whole_vocabulary_equals_the_in_step_reference(tmp_path):
    """top_k = V: the LM step with the reference's q shipped (no reference forward in the step)
    gives the in-step reference's loss, KL, gates and output-layer gradient; the q computed at
    TP 2 / PP 2 is TP 1's, and so is the step."""
    (one,) = run_workers(_shipped_q_worker, 1, 1, 1, str(tmp_path / "a"), None)
    for key in ("loss", "lm_loss", "penalty", "kl", "mean_z", "gated_share"):
        assert one["shipped"][key] == pytest.approx(one["inline"][key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(one["shipped_w_grad"], one["inline_w_grad"], rtol=1e-4,
                               atol=1e-7)
    assert torch.isinf(one["q_log_rest"]).all()  # nothing outside the kept ids
    assert one["q_ids"].shape[-1] == one["v"]
    # q at the loss mask only: the same q there, the placeholder elsewhere (all of q on id 0,
    # Z = 1), and the same step (the loss mask zeroes the placeholder's KL and its gradient)
    on, masked = one["mask"] > 0, one["masked"]
    assert 0 < on.sum() < on.numel()
    assert torch.equal(masked["q_ids"][on], one["q_ids"][on])
    for key in ("q_log", "q_log_rest", "q_log_z"):
        torch.testing.assert_close(masked[key][on], one[key][on], rtol=0, atol=0)
    off = ~on
    assert torch.equal(masked["q_ids"][off].long(),
                       torch.arange(one["v"]).expand(int(off.sum()), -1))
    assert (masked["q_log"][off][:, 0] == 0).all() and torch.isinf(masked["q_log"][off][:, 1:]).all()
    assert torch.isinf(masked["q_log_rest"][off]).all() and (masked["q_log_z"][off] == 0).all()
    for key in ("loss", "lm_loss", "penalty", "kl", "mean_z", "gated_share"):
        assert one["shipped_masked"][key] == pytest.approx(one["shipped"][key], rel=1e-6,
                                                           abs=1e-8), key
    torch.testing.assert_close(one["shipped_masked_w_grad"], one["shipped_w_grad"], rtol=1e-5,
                               atol=1e-8)
    for tp, pp in ((2, 1), (1, 2)):
        for r in run_workers(_shipped_q_worker, 2, tp, pp, str(tmp_path / f"{tp}{pp}"), None):
            torch.testing.assert_close(r["q_log_z"], one["q_log_z"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["masked"]["q_log_z"], one["masked"]["q_log_z"],
                                       rtol=1e-5, atol=1e-6)
            for name in ("inline", "shipped", "shipped_masked"):
                for key in ("loss", "lm_loss", "penalty", "kl", "mean_z", "gated_share"):
                    assert r[name][key] == pytest.approx(one[name][key], rel=2e-5, abs=1e-7), \
                        (tp, pp, name, key)


def test_shipped_top_k_q_is_the_coarsened_kl(tmp_path):
    """top_k = 16 of a padded vocabulary of hundreds: the shipped ids are those of the largest
    max(p_ref, q) (brute force from the full q of the whole-vocabulary run), their log q and
    the tail's mass are q's, and the step's KL is the coarsened one: at most the full KL, and
    the TP-2 step equals TP 1's."""
    (full,) = run_workers(_shipped_q_worker, 1, 1, 1, str(tmp_path / "f"), None)
    (one,) = run_workers(_shipped_q_worker, 1, 1, 1, str(tmp_path / "a"), 16)
    # the full q, dense, from the whole-vocabulary run (ids in its own order)
    log_q = torch.full(full["q_ids"].shape, float("-inf")).scatter(
        -1, full["q_ids"].long(), full["q_log"])
    ids = one["q_ids"].long()
    torch.testing.assert_close(one["q_log"], log_q.gather(-1, ids), rtol=1e-5, atol=1e-6)
    rest = 1 - one["q_log"].double().exp().sum(-1)
    torch.testing.assert_close(one["q_log_rest"].double().exp(), rest, rtol=1e-3, atol=1e-6)
    # coarsening never raises a KL (here, a random model's near-uniform p, most of it is in
    # the tail's shape: 0.024 of 0.445)
    assert 0 < one["shipped"]["kl"] <= full["shipped"]["kl"] + 1e-6
    assert one["shipped"]["lm_loss"] == pytest.approx(full["shipped"]["lm_loss"], rel=1e-6)
    for r in run_workers(_shipped_q_worker, 2, 2, 1, str(tmp_path / "tp2"), 16):
        for key in ("loss", "penalty", "kl", "mean_z"):
            assert r["shipped"][key] == pytest.approx(one["shipped"][key], rel=2e-5,
                                                      abs=1e-7), key
