"""Hugging Face Llama-family checkpoints in and out: ``hf_to_nemo`` writes a ``.nemo`` that stock
``MegatronGPTModel`` restores (and ACFT trains: ``model.restore_from_path``); ``nemo_to_hf`` writes
a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads. The tokenizer goes both
ways.

Why written here: NeMo 2.5.0's converters (``scripts/checkpoint_converters/``) are in NeMo's source
tree, not in the wheel, and build Transformer Engine layers; megatron-core 0.13.1 ships no HF
mapping. So the mapping is written once, in this module (:func:`hf_to_mcore`, :func:`mcore_to_hf`),
for megatron-core's ``GPTModel`` with the local layer spec (CPU, or a GPU without TE) and with the
TE spec (its norms fused into ``linear_qkv`` / ``linear_fc1``): the key style is read from the
model that NeMo builds. Everything else is NeMo's: the model is built by ``MegatronGPTModel`` from
the config :func:`nemo_config` derives, and written with ``save_to`` (a distributed checkpoint,
which NeMo reshards when restoring at another tensor-parallel size).

The mapping (HF ``LlamaForCausalLM`` ← → megatron-core ``GPTModel``):

- ``model.embed_tokens`` ↔ ``embedding.word_embeddings`` (rows padded with zeros to Megatron's
  padded vocabulary; cut back to the tokenizer's on the way out); ``lm_head`` ↔ ``output_layer``
  (absent when tied: ``tie_word_embeddings`` ↔ ``share_embeddings_and_output_weights``);
- ``q_proj``, ``k_proj``, ``v_proj`` ↔ ``linear_qkv``, interleaved by query group as megatron-core
  splits it: for each of the ``num_key_value_heads`` groups, its query heads, then its key head,
  then its value head; ``o_proj`` ↔ ``linear_proj``;
- ``gate_proj``, ``up_proj`` ↔ ``linear_fc1`` (gate first: megatron's SwiGLU is
  ``silu(x₁)·x₂`` over the two halves); ``down_proj`` ↔ ``linear_fc2``;
- ``input_layernorm`` ↔ ``input_layernorm`` (TE: ``linear_qkv.layer_norm_weight``),
  ``post_attention_layernorm`` ↔ ``pre_mlp_layernorm`` (TE: ``linear_fc1.layer_norm_weight``),
  ``model.norm`` ↔ ``decoder.final_layernorm``;
- RoPE: both use the rotate-half convention; ``rope_theta`` ↔ ``rotary_base``.

The tokenizer: a SentencePiece ``tokenizer.model`` (Llama 1/2, Mistral) goes into the ``.nemo``
(NeMo's ``sentencepiece`` library, self-contained); a ``tokenizer.json``-only tokenizer (Llama 3,
one trained with ``tokenizers``) is NeMo's ``huggingface`` library, which reads a folder: it is
written beside the ``.nemo`` as ``<name>.tokenizer/`` and the config points there (NeMo's own
Llama-3 converter points at the HF folder the same way). Out, the tokenizer the ``.nemo`` restores
is saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from nemo_acft.io_utils import replace_dir, tmp_name
from nemo_acft.models.nemo_file import check_nemo

#: HF Llama config keys this converter reads, and what they must be when they are not free
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
UNSUPPORTED_FLAGS = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}


class ConversionError(ValueError):
    """Bad input to a conversion (raised before anything is written)."""


# --- reading an HF folder ----------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> Dict[str, Any]:
    """``config.json`` of a Llama-family folder, checked for what this converter maps."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"--hf {hf_dir}: no config.json (not a Hugging Face model folder)")
    cfg = json.loads(path.read_text())
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{path}: model_type {mt!r} is not Llama-family (expected one of "
                              f"{SUPPORTED_MODEL_TYPES})")
    for key, want in UNSUPPORTED_FLAGS.items():
        if cfg.get(key, want) != want:
            raise ConversionError(f"{path}: {key}={cfg[key]!r} is not supported (expected "
                                  f"{want!r})")
    if cfg.get("rope_scaling"):
        raise ConversionError(f"{path}: rope_scaling={cfg['rope_scaling']!r} is not supported "
                              "(megatron-core's GPTModel here applies plain RoPE)")
    if cfg.get("sliding_window") and mt == "mistral":
        raise ConversionError(f"{path}: sliding_window={cfg['sliding_window']} is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise ConversionError(f"{path}: head_dim {head_dim} × {heads} heads ≠ hidden_size "
                              f"{cfg['hidden_size']} (not supported)")
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise ConversionError(f"{path}: num_key_value_heads {kv} does not divide "
                              f"num_attention_heads {heads}")
    return cfg


def hf_weight_files(hf_dir: Path) -> List[Path]:
    """The weight files of an HF folder (safetensors preferred), every shard of an index present."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (hf_dir / index).is_file():
            names = sorted(set(json.loads((hf_dir / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (hf_dir / n).is_file()]
            if missing:
                raise ConversionError(f"{hf_dir / index}: shard(s) missing: {missing}")
            return [hf_dir / n for n in names]
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise ConversionError(f"--hf {hf_dir}: no model.safetensors(.index.json) or "
                          "pytorch_model.bin(.index.json)")


def load_hf_state_dict(files: List[Path]) -> Dict[str, torch.Tensor]:
    """All tensors of the weight files, read into memory (the whole checkpoint at once)."""
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return out


# --- the config ----------------------------------------------------------------------------


def nemo_config(hf: Dict[str, Any], tokenizer_cfg: Dict[str, Any], *, seq_length: Optional[int],
                divisible_by: int, precision: Any) -> Dict[str, Any]:
    """A ``MegatronGPTModel`` config of the HF architecture (the keys NeMo's Llama converter
    sets), megatron-core GPT with NeMo's data pipeline unused."""
    heads = hf["num_attention_heads"]
    max_pos = int(hf.get("max_position_embeddings", 2048))
    return {
        "mcore_gpt": True, "precision": precision, "seed": 1234,
        "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "encoder_seq_length": int(seq_length or max_pos), "max_position_embeddings": max_pos,
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"], "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "init_method_std": hf.get("initializer_range", 0.02),
        "layernorm_epsilon": hf.get("rms_norm_eps", 1e-6), "normalization": "rmsnorm",
        "activation": "fast-swiglu", "bias": False, "position_embedding_type": "rope",
        "rotary_base": float(hf.get("rope_theta", 10000.0)), "rotary_percentage": 1.0,
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        "make_vocab_size_divisible_by": divisible_by,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "ffn_dropout": 0.0,
        "apply_query_key_layer_scaling": False,
        "transformer_engine": True, "use_cpu_initialization": False,
        "tokenizer": tokenizer_cfg,
        "optim": {"name": "adamw", "lr": 1.0e-5, "weight_decay": 0.0},  # a run's model.optim wins
        "data": {"data_impl": "mock", "data_prefix": [], "num_workers": 0},
    }


# --- the weight mapping --------------------------------------------------------------------


def _te_style(keys) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in keys)


def _copied(te: bool):
    """(HF, megatron-core) suffixes of a layer's tensors that map one to one; the norms' names
    depend on the spec (TE fuses them into the next linear layer)."""
    return (("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
            ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
            ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight" if te
             else "input_layernorm.weight"),
            ("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight" if te
             else "pre_mlp_layernorm.weight"))


def hf_to_mcore(sd: Dict[str, torch.Tensor], hf: Dict[str, Any], target_keys,
                vocab_rows: int) -> Dict[str, torch.Tensor]:
    """The HF state dict as megatron-core ``GPTModel``'s (TP = 1), in the key style of
    ``target_keys`` (local or TE spec); embeddings padded with zero rows to ``vocab_rows``."""
    te = _te_style(target_keys)
    L, h = hf["num_hidden_layers"], hf["hidden_size"]
    nq = hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nq
    d = hf.get("head_dim") or h // nq

    def pad(w):
        if w.shape[0] > vocab_rows:
            return w[:vocab_rows].clone()
        out = torch.zeros(vocab_rows, w.shape[1], dtype=w.dtype)
        out[: w.shape[0]] = w
        return out

    out = {"embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    if not hf.get("tie_word_embeddings", False):
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    for i in range(L):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(nkv, nq // nkv, d, h)
        k = sd[p + "self_attn.k_proj.weight"].view(nkv, 1, d, h)
        v = sd[p + "self_attn.v_proj.weight"].view(nkv, 1, d, h)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                                      sd[p + "mlp.up_proj.weight"]], 0)
        for hf_key, mc_key in _copied(te):
            out[m + mc_key] = sd[p + hf_key]
    return out


def mcore_to_hf(sd: Dict[str, torch.Tensor], cfg, vocab: int) -> Dict[str, torch.Tensor]:
    """megatron-core ``GPTModel``'s state dict (TP = 1, ``cfg`` its NeMo config) as HF
    ``LlamaForCausalLM``'s; the vocabulary cut to the tokenizer's ``vocab`` rows."""
    te = _te_style(sd)
    L, h = cfg.num_layers, cfg.hidden_size
    nq = cfg.num_attention_heads
    nkv = cfg.get("num_query_groups") or nq
    d = cfg.get("kv_channels") or h // nq
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not cfg.get("share_embeddings_and_output_weights", True):
        out["lm_head.weight"] = sd["output_layer.weight"][:vocab]
    for i in range(L):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = sd[m + "self_attention.linear_qkv.weight"].view(nkv, nq // nkv + 2, d, h)
        out[p + "self_attn.q_proj.weight"] = qkv[:, : nq // nkv].reshape(-1, h)
        out[p + "self_attn.k_proj.weight"] = qkv[:, -2].reshape(-1, h)
        out[p + "self_attn.v_proj.weight"] = qkv[:, -1].reshape(-1, h)
        gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        for hf_key, mc_key in _copied(te):
            out[p + hf_key] = sd[m + mc_key]
    return {k: v.contiguous().clone() for k, v in out.items()}


def check_llama_nemo(cfg, path) -> None:
    """A ``.nemo`` config this converter can map to HF Llama (else a one-line error)."""
    want = {"normalization": "rmsnorm", "bias": False, "position_embedding_type": "rope"}
    for key, value in want.items():
        if cfg.get(key) != value:
            raise ConversionError(f"--nemo {path}: {key}={cfg.get(key)!r}, a Llama-family model "
                                  f"needs {value!r}")
    if cfg.get("activation") not in ("fast-swiglu", "swiglu"):
        raise ConversionError(f"--nemo {path}: activation={cfg.get('activation')!r}, a "
                              "Llama-family model needs 'fast-swiglu' or 'swiglu'")


# --- the tokenizer ---------------------------------------------------------------------------


def hf_tokenizer_config(hf_dir: Path, out: Path):
    """The ``.nemo``'s tokenizer config for the HF folder's tokenizer (see the module
    docstring) and the HF tokenizer itself; a ``tokenizer.json``-only tokenizer is copied to
    ``<out>.tokenizer/`` by :func:`hf_to_nemo`. A SentencePiece folder without ``tokenizer.json``
    loads as the slow tokenizer when the fast conversion cannot run (it needs a protobuf that
    matches sentencepiece's generated code)."""
    from transformers import AutoTokenizer

    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(hf_dir))
        except Exception:  # noqa: BLE001 - e.g. the slow-to-fast conversion's protobuf
            if not (hf_dir / "tokenizer.model").is_file():
                raise
            tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConversionError(f"--hf {hf_dir}: no tokenizer AutoTokenizer loads ({e})") from e
    if (hf_dir / "tokenizer.model").is_file():
        return {"library": "sentencepiece", "model": str(hf_dir / "tokenizer.model"),
                "sentencepiece_legacy": False}, tok
    folder = tokenizer_folder(out)
    return {"library": "huggingface", "type": str(folder.resolve()), "use_fast": True}, tok


def tokenizer_folder(nemo_path: Path) -> Path:
    """Where a ``huggingface``-library tokenizer of ``nemo_path`` lives (beside it)."""
    return nemo_path.with_name(nemo_path.name[: -len(".nemo")] + ".tokenizer"
                               if nemo_path.name.endswith(".nemo") else nemo_path.name + ".tokenizer")


def save_hf_tokenizer(nemo_tokenizer, out: Path) -> None:
    """The tokenizer a ``.nemo`` restored (NeMo's wrapper) as an HF tokenizer folder."""
    inner = getattr(nemo_tokenizer, "tokenizer", None)
    if hasattr(inner, "save_pretrained"):  # NeMo's AutoTokenizer wraps an HF one
        inner.save_pretrained(str(out))
        return
    if hasattr(inner, "serialized_model_proto"):  # NeMo's SentencePieceTokenizer
        from transformers import LlamaTokenizer

        spm = out / "tokenizer.model"
        spm.write_bytes(inner.serialized_model_proto())
        # legacy=True: plain SentencePiece encoding, as NeMo's SentencePieceTokenizer encodes
        LlamaTokenizer(vocab_file=str(spm), legacy=True).save_pretrained(str(out))
        return
    raise ConversionError(f"the .nemo's tokenizer ({type(nemo_tokenizer).__name__}) cannot be "
                          "written as a Hugging Face tokenizer")


# --- the two directions ----------------------------------------------------------------------


def check_output(dst: Path, overwrite: bool, what: str = "--out") -> None:
    """An output that exists (a file, or a folder with anything in it) is refused unless
    ``overwrite`` (it is then replaced whole, at the end)."""
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir())):
        if not overwrite:
            raise ConversionError(f"{what} {dst} exists and is not empty; pass --overwrite to "
                                  "replace it, or choose another path")
    elif dst.exists() and not dst.is_dir():
        raise ConversionError(f"{what} {dst} exists and is not a file or folder")


def hf_to_nemo(hf_dir: str, out: str, *, tp: int = 1, seq_length: Optional[int] = None,
               divisible_by: int = 128, precision: Any = 32, overwrite: bool = False) -> Path:
    """Convert an HF Llama-family folder into a ``.nemo`` (stock ``MegatronGPTModel``'s);
    ``tp`` is the largest tensor-parallel size it will be trained at (checked; the vocabulary is
    padded for it). In a world of one process (it initialises one when there is none). An
    existing ``out`` is refused unless ``overwrite``."""
    from nemo_acft import config as schema
    from nemo_acft.config import Layout
    from nemo_acft.cpu_compat import apply_nemo
    from nemo_acft.models.checkpoint import _in_process_results_queue

    src, dst = Path(hf_dir), Path(out)
    if not dst.name.endswith(".nemo"):
        raise ConversionError(f"--out {dst}: expected a path ending in .nemo")
    check_output(dst, overwrite)
    if tokenizer_folder(dst).exists():
        check_output(tokenizer_folder(dst), overwrite, "--out's tokenizer folder")
    hf = read_hf_config(src)
    files = hf_weight_files(src)
    tok_cfg, tok = hf_tokenizer_config(src, dst)
    vocab = len(tok)  # NeMo's tokenizers count the same way (checked by the tests)
    if hf["vocab_size"] < vocab:
        raise ConversionError(f"{src / 'config.json'}: vocab_size {hf['vocab_size']} < the "
                              f"tokenizer's {vocab} tokens (ids without an embedding row)")
    cfg = nemo_config(hf, tok_cfg, seq_length=seq_length, divisible_by=divisible_by,
                      precision=precision)
    try:
        schema.check_model(cfg, vocab, [Layout(tp, 1, 1)])
    except ValueError as e:
        raise ConversionError(f"--hf {src} at --tensor-model-parallel-size {tp}: {e}") from e
    sd = load_hf_state_dict(files)
    need = ["model.embed_tokens.weight", "model.norm.weight"] + (
        [] if hf.get("tie_word_embeddings", False) else ["lm_head.weight"])
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"--hf {src}: weights missing: {missing}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    folder_tmp = None
    if tok_cfg["library"] == "huggingface":  # the folder the config points at, renamed last
        folder_tmp = tmp_name(tokenizer_folder(dst))
        shutil.rmtree(folder_tmp, ignore_errors=True)
        tok.save_pretrained(str(folder_tmp))
        tok_cfg_build = {**tok_cfg, "type": str(folder_tmp)}
    else:
        tok_cfg_build = tok_cfg
    apply_nemo()  # NeMo's CPU patches (a no-op with CUDA)
    _in_process_results_queue()  # before NeMo's first checkpoint save (see there)
    try:
        _build_and_save(cfg, tok_cfg, tok_cfg_build, sd, hf, src, dst, folder_tmp)
    finally:
        if folder_tmp is not None and folder_tmp.exists():
            shutil.rmtree(folder_tmp, ignore_errors=True)
    return dst


def _build_and_save(cfg, tok_cfg, tok_cfg_build, sd, hf, src: Path, dst: Path, folder_tmp):
    """NeMo builds the model, the mapped weights go in, ``save_to`` writes it (renamed last)."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from omegaconf import OmegaConf

    from nemo_acft.models.build import make_trainer, with_layout
    from nemo_acft.models.parallel import init_distributed

    init_distributed(tp=1, pp=1, seed=1234)
    model_cfg = with_layout(OmegaConf.create({**cfg, "tokenizer": tok_cfg_build}), 1, 1)
    trainer = make_trainer(devices=1, precision=model_cfg.precision, gradient_clip_val=None)
    model = MegatronGPTModel(model_cfg, trainer)
    module = model.get_model_module_list()[0]
    target = module.state_dict()
    mapped = hf_to_mcore(sd, hf, target.keys(), target["embedding.word_embeddings.weight"].shape[0])
    keep = {k: v for k, v in target.items() if k.endswith("_extra_state")}
    result = module.load_state_dict({**keep, **mapped}, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise ConversionError(f"--hf {src}: the mapped weights do not fit megatron-core's "
                              f"GPTModel: missing {bad}, unexpected {list(result.unexpected_keys)}")
    if folder_tmp is not None:
        with_cfg = model.cfg
        OmegaConf.set_struct(with_cfg, False)
        with_cfg.tokenizer.type = tok_cfg["type"]
    tmp = tmp_name(dst, ".nemo")
    try:
        model.save_to(str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if folder_tmp is not None:
        replace_dir(folder_tmp, tokenizer_folder(dst))
    os.replace(tmp, dst)


def nemo_to_hf(nemo: str, out: str, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a GPT or ACFT ``.nemo`` of a Llama-family architecture into an HF folder (the
    trunk; an ACFT ``.nemo``'s NADO head is not part of an HF Llama). Restored at TP = 1 (NeMo
    reshards a ``.nemo`` written at any TP). A folder ``out`` that holds anything is refused
    unless ``overwrite``; then it is replaced whole (:func:`~nemo_acft.io_utils.replace_dir`)."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from omegaconf import open_dict

    from nemo_acft.models.build import build_model

    src, dst = Path(nemo), Path(out)
    try:
        check_nemo(src, "--nemo")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    check_output(dst, overwrite)
    cfg = MegatronGPTModel.restore_from(str(src), return_config=True)
    check_llama_nemo(cfg, src)
    with open_dict(cfg):
        cfg.setdefault("acft", {}).setdefault("nado_head", {})
    model = build_model(cfg, tp=1, pp=1, seed=1234, restore_from=str(src),
                        trainer_cfg={"devices": 1, "num_nodes": 1, "accelerator": "auto",
                                     "precision": cfg.get("precision", 32),
                                     "gradient_clip_val": None})
    module = model.module
    vocab = int(model.tokenizer.vocab_size)
    sd = mcore_to_hf(module.base_state_dict(), cfg, vocab)
    heads = cfg.num_attention_heads
    hf_cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_query_groups") or heads,
        head_dim=cfg.get("kv_channels") or cfg.hidden_size // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", cfg.encoder_seq_length),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        rope_theta=float(cfg.get("rotary_base", 10000.0)),
        tie_word_embeddings=bool(cfg.get("share_embeddings_and_output_weights", True)),
        initializer_range=cfg.get("init_method_std", 0.02),
        bos_token_id=_token_id(model.tokenizer, "bos_id"),
        eos_token_id=_token_id(model.tokenizer, "eos_id"),
        torch_dtype=dtype, architectures=["LlamaForCausalLM"])
    hf_model = LlamaForCausalLM(hf_cfg)
    result = hf_model.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("rotary_emb.inv_freq")]
    if hf_cfg.tie_word_embeddings:
        bad = [k for k in bad if k != "lm_head.weight"]
    if bad or result.unexpected_keys:
        raise ConversionError(f"--nemo {src}: the mapped weights do not fit LlamaForCausalLM: "
                              f"missing {bad}, unexpected {list(result.unexpected_keys)}")
    hf_model = hf_model.to(getattr(torch, dtype))
    tmp = tmp_name(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(str(tmp))
        save_hf_tokenizer(model.tokenizer, tmp)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _token_id(tok, name: str) -> Optional[int]:
    try:
        value = getattr(tok, name)
    except Exception:  # noqa: BLE001 - NeMo's tokenizers raise differently for a missing id
        return None
    return int(value) if isinstance(value, int) and value >= 0 else None


__all__ = ["ConversionError", "hf_to_nemo", "nemo_to_hf", "hf_to_mcore", "mcore_to_hf",
           "nemo_config", "read_hf_config"]
