"""NeMo integration: MegatronGPTACFTModel trained by NeMo's own Trainer/strategy on CPU (gloo), at
TP=1, TP=2 and PP=2; .nemo in (a plain GPT .nemo) and out (plain for stock MegatronGPTModel, and
with the head) at TP=1 and TP=2; config errors before any process group exists."""

import math
import os

import pytest
import torch

pytest.importorskip("nemo.collections.nlp.models.language_modeling.megatron_gpt_model")

from tests.dist_utils import run_workers  # noqa: E402


def tiny_cfg(tp=1, pp=1, world=1, **acft):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "micro_batch_size": 2, "global_batch_size": 2 * world // (tp * pp),
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "encoder_seq_length": 32, "max_position_embeddings": 32, "num_layers": 2,
        "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4,
        "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        # megatron's mock GPT dataset draws ids below 4096 (CPU-STACK.md); one fixed size, so
        # that TP=1 and TP=2 build the same weights (padding would differ with TP)
        "make_vocab_size_divisible_by": 128, "override_vocab_size": 4096,
        "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": False, "mcore_gpt": True,
        "transformer_engine": False, "use_cpu_initialization": True, "precision": 32,
        "seed": 1234, "bias": True, "normalization": "layernorm",
        "tokenizer": {"library": "byte-level", "type": None, "model": None, "vocab_file": None,
                      "merge_file": None},
        "data": {"data_impl": "mock", "data_prefix": [], "splits_string": "98,1,1",
                 "seq_length": 32, "skip_warmup": True, "num_workers": 0,
                 "dataloader_type": "single", "reset_position_ids": False,
                 "reset_attention_mask": False, "eod_mask_loss": False,
                 "index_mapping_dir": None},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "gradient_as_bucket_view": False, "masked_softmax_fusion": False,
        "bias_activation_fusion": False, "bias_dropout_add_fusion": False,
        "apply_rope_fusion": False, "gradient_accumulation_fusion": False,
        "acft": {"lambda": 2.0, "delta": None, "min_z": 0.0, "nado": {"num_layers": 0}, **acft},
    })


def _same_weights_for_any_split(stage, tp):
    """Give every parameter values drawn from its *global* name (layer numbers, not the stage's
    local indices) and sliced for this TP rank, so TP=1, TP=2 and PP=2 hold one model. (Megatron's
    CPU initialisation matches TP=1 at TP=2, not at PP=2: a stage draws its layers from the
    generator's start.) The NADO head gets non-zero values too."""
    import re
    import zlib

    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in stage.named_parameters():
            key = name
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if m:
                key = f"layer{stage.decoder.layers[int(m[1])].layer_number}.{m[2]}"
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            shape = list(p.shape)
            split = getattr(p, "tensor_model_parallel", False) and tp > 1
            if split:
                shape[p.partition_dim] *= tp
            full = torch.randn(shape, generator=g) * (0.5 if name.startswith("nado_head") else 0.05)
            if name.endswith("norm.weight") or name.endswith("layer_norm_weight"):
                full += 1.0
            p.copy_(full.chunk(tp, p.partition_dim)[tp_rank] if split else full)


def _fit_worker(rank, world_size, tp, pp, steps):
    from lightning.pytorch import Trainer

    from nemo_acft.models import init_distributed
    from nemo_acft.nemo import MegatronGPTACFTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    init_distributed(tp=tp, pp=pp, seed=1234)  # NeMo then reuses the groups
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=NLPDDPStrategy(),
                      max_steps=steps, logger=False, enable_checkpointing=False,
                      limit_val_batches=0, num_sanity_val_steps=0, precision=32,
                      use_distributed_sampler=False, enable_progress_bar=False)
    model = MegatronGPTACFTModel(tiny_cfg(tp, pp, world_size), trainer)
    head = model.model.nado_head
    _same_weights_for_any_split(model.model, tp)
    trainer.fit(model)
    return {"history": model.acft_history, "is_last": head is not None,
            "model_type": type(model.model).__name__}


def _history(results):
    last = [r for r in results if r["is_last"]]
    assert last, "no rank ran the last pipeline stage"
    return last[0]["history"]


@pytest.fixture(scope="module")
def tp1():
    (one,) = run_workers(_fit_worker, 1, 1, 1, 2)
    return one


def test_tp1_trains_with_nonzero_kl(tp1):
    assert tp1["model_type"] == "GPTNADOModel"
    hist = tp1["history"]
    assert len(hist) == 2
    for h in hist:
        assert h["kl"] > 0.05  # the head is non-zero, so q != p
        # NeMo's reduced loss is exactly the LM term plus λ·KL (no gate here)
        assert h["penalty"] == pytest.approx(2.0 * h["kl"], rel=1e-6)
        assert h["loss"] == pytest.approx(h["lm_loss"] + h["penalty"], rel=1e-5)


def test_tp2_and_pp2_losses_equal_tp1(tp1):
    ref = tp1["history"]
    for tp, pp in ((2, 1), (1, 2)):
        got = _history(run_workers(_fit_worker, 2, tp, pp, 2))
        for a, b in zip(ref, got):
            for key in ("loss", "lm_loss", "kl"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (tp, pp, key)


def test_config_errors_before_any_process_group():
    import torch.distributed as dist

    from nemo_acft.nemo.model import validate_config

    assert not dist.is_initialized()
    validate_config(tiny_cfg(), world_size=1)
    cases = [
        (tiny_cfg(lamda=1.0), 1, "model.acft.lamda: unknown key"),
        (tiny_cfg(delta=2.0), 1, "model.acft.delta=2.0"),
        (tiny_cfg(nado={"layers": 1}), 1, "model.acft.nado"),
        (tiny_cfg(mode="sample"), 1, "model.acft.mode='sample': expected one of"),
        (tiny_cfg(mode="nado", samples_path="/nonexistent.pt"), 1,
         "model.acft.samples_path='/nonexistent.pt': NADO mode needs an existing samples file"),
        (tiny_cfg(tp=3, world=3), 3, "tensor_model_parallel_size=3 does not divide "
                                     "num_attention_heads=4"),
        (tiny_cfg(pp=4, world=4), 4, "pipeline_model_parallel_size=4 does not divide num_layers=2"),
        (tiny_cfg(tp=2, world=3), 3, "world size 3 is not a multiple"),
    ]
    for cfg, world, message in cases:
        with pytest.raises(ValueError) as e:
            validate_config(cfg, world_size=world)
        assert message in str(e.value)
    cfg = tiny_cfg()
    cfg.mcore_gpt = False
    with pytest.raises(ValueError, match="model.mcore_gpt=False"):
        validate_config(cfg, world_size=1)
    assert not dist.is_initialized()


def test_version_check_names_versions(monkeypatch):
    from importlib import metadata

    import nemo_acft.nemo as integration

    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda d: "2.4.1" if d == "nemo-toolkit" else real(d))
    with pytest.raises(ImportError, match=r"needs nemo-toolkit==2.5.0, megatron-core==0.13.1; "
                                          r"installed: nemo-toolkit 2.4.1"):
        integration.check_versions()


def _nemo_io_worker(rank, world_size, tmp):
    """Plain GPT .nemo -> ACFT (trunk loaded, head zero); ACFT -> plain .nemo that stock
    MegatronGPTModel restores; ACFT -> .nemo with head -> ACFT. Returns the logit differences."""
    from lightning.pytorch import Trainer
    from omegaconf import open_dict

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    from nemo_acft.models import init_distributed
    from nemo_acft.nemo import MegatronGPTACFTModel
    from nemo_acft.nemo.export import export_plain_gpt, export_with_head

    init_distributed(tp=world_size, pp=1, seed=1234)

    def trainer():
        return Trainer(accelerator="cpu", devices=world_size, strategy=NLPDDPStrategy(),
                       max_steps=1, logger=False, enable_checkpointing=False,
                       limit_val_batches=0, num_sanity_val_steps=0, precision=32,
                       use_distributed_sampler=False, enable_progress_bar=False)

    cfg = tiny_cfg(tp=world_size, world=world_size)
    cfg.pop("acft")
    plain = MegatronGPTModel(cfg, trainer())
    _same_weights_for_any_split(plain.model, world_size)
    plain.save_to(f"{tmp}/plain.nemo")
    x = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand_as(x)
    with torch.no_grad():
        ref = plain.model(x, pos, None)
    acfg = MegatronGPTModel.restore_from(f"{tmp}/plain.nemo", return_config=True)
    with open_dict(acfg):
        acfg.acft = {"lambda": 1.0, "nado": {"num_layers": 0}}
    acft = MegatronGPTACFTModel.restore_from(f"{tmp}/plain.nemo", trainer=trainer(),
                                             override_config_path=acfg, strict=False)
    out = {"base_only": acft.acft_restored_base_only}
    with torch.no_grad():
        z, s = acft.model(x, pos, None)
        out["restore_lm"] = (z - ref).abs().max().item()
        out["restore_head"] = s.abs().max().item()
        acft.model.nado_head.output_layer.weight.normal_(generator=torch.Generator().manual_seed(rank))
        z, s = acft.model(x, pos, None)
    export_plain_gpt(acft, f"{tmp}/served.nemo")
    export_with_head(acft, f"{tmp}/with_head.nemo")
    served = MegatronGPTModel.restore_from(f"{tmp}/served.nemo", trainer=trainer())
    back = MegatronGPTACFTModel.restore_from(f"{tmp}/with_head.nemo", trainer=trainer())
    with torch.no_grad():
        out["served_type"] = type(served.model).__name__
        out["served_lm"] = (served.model(x, pos, None) - z).abs().max().item()
        z2, s2 = back.model(x, pos, None)
        out["back_lm"] = (z2 - z).abs().max().item()
        out["back_head"] = (s2 - s).abs().max().item()
        out["head_nonzero"] = s.abs().max().item()
    out["no_temporaries"] = not [p for p in os.listdir(tmp) if ".tmp" in p]
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_nemo_in_and_out(tmp_path, world_size):
    results = run_workers(_nemo_io_worker, world_size, str(tmp_path))
    for out in results:
        assert out["base_only"]
        assert out["restore_lm"] == 0.0 and out["restore_head"] == 0.0
        assert out["served_type"] == "GPTModel" and out["served_lm"] == 0.0
        assert out["head_nonzero"] > 0.1
        assert out["back_lm"] == 0.0 and out["back_head"] == 0.0
        assert out["no_temporaries"]


def _nemo_cli(*args, timeout=600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "nemo_acft.nemo.train", "--config-name",
                           "tiny_cpu", *args], capture_output=True, text=True, timeout=timeout)


def _restore_plain_worker(rank, world_size, path):
    from lightning.pytorch import Trainer

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    from nemo_acft.models import init_distributed
    import nemo_acft.nemo  # noqa: F401  (CPU patches)

    init_distributed(tp=1, pp=1, seed=0)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(), logger=False,
                      enable_checkpointing=False, use_distributed_sampler=False)
    model = MegatronGPTModel.restore_from(path, trainer=trainer)
    return type(model).__name__, "acft" in model.cfg


def test_acft_nemo_train_entry_point(tmp_path):
    """3 steps with gradient clipping and validation, both .nemo files at the end, acft-export;
    a second run starts from the first one's plain .nemo; bad overrides fail before training."""
    out = tmp_path / "run1"
    p = _nemo_cli(f"exp_manager.explicit_log_dir={out}", "trainer.max_steps=3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "acft_gpt.nemo").is_file() and (out / "acft_with_head.nemo").is_file()
    ((name, has_acft),) = run_workers(_restore_plain_worker, 1, str(out / "acft_gpt.nemo"))
    assert name == "MegatronGPTModel" and not has_acft
    # acft-export: the .nemo with the head -> a plain one that stock MegatronGPTModel restores
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "nemo_acft.nemo.export", "--nemo",
                        str(out / "acft_with_head.nemo"), "--out", str(out / "served.nemo")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ((name, has_acft),) = run_workers(_restore_plain_worker, 1, str(out / "served.nemo"))
    assert name == "MegatronGPTModel" and not has_acft
    p = subprocess.run([sys.executable, "-m", "nemo_acft.nemo.export", "--nemo",
                        str(out / "acft_gpt.nemo"), "--out", str(out / "x.nemo")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "not an ACFT .nemo" in p.stderr
    out2 = tmp_path / "run2"
    p = _nemo_cli(f"exp_manager.explicit_log_dir={out2}", "trainer.max_steps=1",
                  f"model.restore_from_path={out / 'acft_gpt.nemo'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out2 / "acft_gpt.nemo").is_file()
    for args, message in [(["model.acft.lamda=1"], "Could not override 'model.acft.lamda'"),
                          (["model.tensor_model_parallel_size=3", "trainer.devices=3"],
                           "tensor_model_parallel_size=3 does not divide num_attention_heads=4"),
                          (["model.restore_from_path=/nonexistent.nemo"],
                           "model.restore_from_path=/nonexistent.nemo: no such .nemo file")]:
        p = _nemo_cli(f"exp_manager.explicit_log_dir={tmp_path / 'bad'}", *args, timeout=120)
        assert p.returncode != 0 and message in p.stderr + p.stdout, (args, p.stderr[-2000:])


def _clip_worker(rank, world_size):
    from nemo_acft.models import init_distributed
    from nemo_acft.cpu_compat import _clip_grad_norm_fp32_cpu

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


def _nado_mode_worker(rank, world_size, samples_path):
    from lightning.pytorch import Trainer

    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    from nemo_acft.models import init_distributed
    from nemo_acft.nemo import MegatronGPTACFTModel

    init_distributed(tp=world_size, pp=1, seed=1234)
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=NLPDDPStrategy(),
                      max_steps=3, logger=False, enable_checkpointing=False,
                      limit_val_batches=0, num_sanity_val_steps=0, precision=32,
                      use_distributed_sampler=False, enable_progress_bar=False)
    cfg = tiny_cfg(tp=world_size, world=world_size, mode="nado", samples_path=samples_path,
                   alpha=1.0)
    model = MegatronGPTACFTModel(cfg, trainer)
    _same_weights_for_any_split(model.model, world_size)
    with torch.no_grad():
        model.model.nado_head.output_layer.weight.zero_()  # a fresh head: R = 1/2
    before = {k: v.clone() for k, v in model.model.state_dict().items() if v is not None}
    trainer.fit(model)
    after = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return {"history": model.acft_history, "changed": changed}


def test_nado_mode_trains_the_head_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, t = 16, 33
    labels = torch.randint(0, 2, (n,), generator=g).float()
    labels[3] = float("nan")  # a failed oracle call: masked
    torch.save({"tokens": torch.randint(0, 4096, (n, t), generator=g),
                "prompt_lengths": torch.full((n,), 5), "lengths": torch.full((n,), 25),
                "labels": labels}, tmp_path / "samples.pt")
    (one,) = run_workers(_nado_mode_worker, 1, str(tmp_path / "samples.pt"))
    # step 1 with a zero head: CE = log 2 on every labelled token, consistency KL(½‖½) = 0
    assert one["history"][0]["nado_ce"] == pytest.approx(math.log(2), rel=1e-6)
    assert one["history"][0]["nado_cons"] == pytest.approx(0.0, abs=1e-7)
    assert one["history"][-1]["nado_loss"] < one["history"][0]["nado_loss"]
    assert one["changed"] and all(k.startswith("nado_head.") for k in one["changed"])
    two = run_workers(_nado_mode_worker, 2, str(tmp_path / "samples.pt"))
    for a, b in zip(one["history"], two[0]["history"]):
        assert b["nado_loss"] == pytest.approx(a["nado_loss"], rel=1e-5)


DOMAIN_RECORDS = [("wiki", "the river runs past the old mill"), ("chat", "you are such an idiot"),
                  ("wiki", "a small town in the north"), ("chat", "thanks, that helped a lot"),
                  ("chat", "what a dumb idea honestly"), ("wiki", "the bridge was built in 1820")]


def _write_domain_jsonl(path):
    import json

    with open(path, "w") as f:
        for domain, text in DOMAIN_RECORDS:
            f.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return str(path)


def _domain_worker(rank, world_size, data_path):
    import torch.nn.functional as F
    from lightning.pytorch import Trainer

    from nemo_acft.models import init_distributed
    from nemo_acft.nemo import MegatronGPTACFTModel
    from nemo_acft.nemo.model import DomainTextDataset
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    init_distributed(tp=1, pp=1, seed=1234)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(), max_steps=1,
                      logger=False, enable_checkpointing=False, limit_val_batches=0,
                      num_sanity_val_steps=0, precision=32, use_distributed_sampler=False,
                      enable_progress_bar=False)
    cfg = tiny_cfg(domains=["wiki", "chat"], domain_lambdas={"chat": 8.0},
                   data={"train_path": data_path})
    cfg.micro_batch_size = cfg.global_batch_size = 4
    model = MegatronGPTACFTModel(cfg, trainer)
    _same_weights_for_any_split(model.model, 1)
    # the first global batch of the sampler: records 0..3, read by the same dataset class
    ds = DomainTextDataset(data_path, model.tokenizer, 32, ["wiki", "chat"])
    batch = [ds[i] for i in range(4)]
    x = torch.stack([b["tokens"] for b in batch])
    y = torch.stack([b["labels"] for b in batch])
    mask = torch.stack([b["loss_mask"] for b in batch]).double()
    dom = torch.stack([b["domain_ids"] for b in batch])
    with torch.no_grad():
        z, s = model.model(x, torch.arange(32).expand_as(x), None)
    z, s = z.double(), s.double()
    log_p = torch.log_softmax(z, -1)
    log_q = torch.log_softmax(z + F.logsigmoid(s), -1)
    ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    expected = float((ce * mask).sum() / mask.sum())
    kl_by_domain = {}
    for d, (name, lam) in enumerate((("wiki", 2.0), ("chat", 8.0))):
        rows = dom == d
        kl_by_domain[name] = float((kl[rows] * mask[rows]).sum() / mask[rows].sum())
        expected += lam * kl_by_domain[name]
    trainer.fit(model)
    return {"history": model.acft_history, "expected": expected, "kl_by_domain": kl_by_domain,
            "domains": dom.tolist()}


def test_per_domain_lambdas_on_domain_tagged_data(tmp_path):
    """The step-1 loss on domain-tagged JSONL equals LM + Σ_d λ_d · mean KL of domain d, written
    out in float64 from the model's raw logits (λ_wiki = 2, λ_chat = 8); per-domain KL logged."""
    (one,) = run_workers(_domain_worker, 1, _write_domain_jsonl(tmp_path / "train.jsonl"))
    assert one["domains"] == [0, 1, 0, 1]
    (h,) = one["history"]
    assert h["loss"] == pytest.approx(one["expected"], rel=1e-5)
    for name in ("wiki", "chat"):
        assert h[f"kl/{name}"] == pytest.approx(one["kl_by_domain"][name], rel=1e-4)
    # one λ for both domains would give a different loss: the weights matter
    assert abs(h["penalty"] - 2.0 * h["kl"]) > 1e-3


def test_domain_config_and_data_errors(tmp_path):
    from nemo_acft.nemo.model import DomainTextDataset, validate_config

    with pytest.raises(ValueError, match=r"domain_lambdas\.chat: not a domain"):
        validate_config(tiny_cfg(domain_lambdas={"chat": 1.0}), 1)
    with pytest.raises(ValueError, match=r"acft\.data\.train_path='nope.jsonl'"):
        validate_config(tiny_cfg(data={"train_path": "nope.jsonl"}), 1)
    with pytest.raises(ValueError, match=r"acft\.data\.shuffle: unknown key"):
        validate_config(tiny_cfg(data={"shuffle": True}), 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "domain": "wiki"}\n{"text": "x", "domain": "news"}\n')

    class Bytes:
        eos_id = 0

        @staticmethod
        def text_to_ids(text):
            return list(text.encode())

    with pytest.raises(ValueError, match=r"bad\.jsonl:2: domain='news' is not one of"):
        DomainTextDataset(str(bad), Bytes(), 8, ["wiki", "chat"])


def _native_export_worker(rank, world_size, tmp):
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy

    from nemo_acft.data import ByteTokenizer
    from nemo_acft.models import GPTConfig, NADOHeadConfig, build_gpt_nado, init_distributed
    from nemo_acft.nemo.export import export_native

    init_distributed(tp=1, pp=1, seed=0)
    tok = ByteTokenizer()
    gcfg = GPTConfig(vocab_size=len(tok), seq_length=32, num_layers=2, hidden_size=64,
                     num_attention_heads=4, make_vocab_size_divisible_by=64,
                     nado=NADOHeadConfig(num_layers=1))
    torch.manual_seed(5)
    native = build_gpt_nado(gcfg)
    with torch.no_grad():  # non-trivial weights everywhere, norms included
        for p in native.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = export_native(native.base_state_dict(), gcfg, f"{tmp}/native.nemo", tok)
    ids = torch.tensor([tok.encode("the weather is nice today, isn't it")])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        z_native = native(ids, pos, None)[0]
    trainer = Trainer(accelerator="cpu", devices=1, strategy=NLPDDPStrategy(), logger=False,
                      enable_checkpointing=False, use_distributed_sampler=False)
    stock = MegatronGPTModel.restore_from(str(path), trainer=trainer)
    stock.eval()
    with torch.no_grad():
        z_stock = stock.model(ids, pos, None)
    text = stock.tokenizer.ids_to_text(tok.encode("naïve café"))
    return {"native": z_native, "stock": z_stock, "type": type(stock).__name__,
            "text": text, "files": sorted(os.listdir(tmp))}


def test_native_model_exports_to_a_stock_nemo(tmp_path):
    """The native loop's trunk (byte-level tokenizer) → a .nemo that stock MegatronGPTModel
    restores with identical logits and whose byte-level tokenizer decodes our ids."""
    (one,) = run_workers(_native_export_worker, 1, str(tmp_path))
    assert one["type"] == "MegatronGPTModel"
    z_native, z_stock = one["native"], one["stock"]
    assert z_stock.shape[-1] >= 256
    torch.testing.assert_close(z_stock[..., :z_native.shape[-1]], z_native, rtol=1e-5, atol=1e-5)
    assert one["text"] == "naïve café"
    assert one["files"] == ["native.nemo"]  # no temporary left behind
    # acft-eval on the .nemo: the toxicity protocol with NeMo's own tokenizer, and perplexity
    (tmp_path / "prompts.txt").write_text("you are\nthe weather\n")
    (tmp_path / "held.txt").write_text("the weather is nice\nthanks for the help\n")
    out = tmp_path / "eval"
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "nemo_acft.eval.cli", "--nemo",
                        str(tmp_path / "native.nemo"), "--prompts", str(tmp_path / "prompts.txt"),
                        "--heldout", str(tmp_path / "held.txt"), "--out", str(out),
                        "--samples-per-prompt", "3", "--max-new-tokens", "8",
                        "--evaluator", "lexicon", "--method", "nemo"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["continuation"], str) for r in rows)
    m = json.loads((out / "metrics.json").read_text())
    # random weights over 512 byte ids: perplexity near the vocabulary size, not 1, not inf
    assert 50 < m["ppl"] < 5000 and m["num_samples"] + m["num_failed"] == 6


def test_word_tokenizer_refuses_nemo_export():
    from nemo_acft.data import WordTokenizer
    from nemo_acft.models import GPTConfig
    from nemo_acft.nemo.export import export_native

    with pytest.raises(ValueError, match="needs data.tokenizer=byte"):
        export_native({}, GPTConfig(vocab_size=8), "x.nemo", WordTokenizer.build(["a b"]))
