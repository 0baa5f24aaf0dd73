"""What every process of a run builds from the config: the checked config, the data, the
tokenizer, the oracle, the model, and the cached pre-trained tiny GPT."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from nemo_acft.data import (LMDataset, WordTokenizer, build_tokenizer, domains, encode_records, generate_corpus,
                            make_prompts, read_prompts, read_records)
from nemo_acft.models.config import GPTConfig, NADOHeadConfig
from nemo_acft.sampling import SamplingParams
from nemo_acft.training.blocks import OptimConfig, RegularizerConfig

log = logging.getLogger("nemo_acft")

SCHEDULES = ("sequential", "parallel")
ROLES = ("all", "prepare", "lm", "oracle", "finish")


def _get(cfg: Dict[str, Any], dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config key {dotted!r} is missing")
        node = node[part]
    return node


def validate(cfg: Dict[str, Any]) -> None:
    """Check the values the run depends on; a ValueError names the key and what was expected.

    Runs before anything is built or written.
    """
    def need(key, ok, expected):
        value = _get(cfg, key)
        if not ok(value):
            raise ValueError(f"config {key}={value!r}: expected {expected}")

    need("schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
    need("role", lambda v: v in ROLES, f"one of {ROLES}")
    need("data.source", lambda v: v in ("builtin", "files"), "'builtin' or 'files'")
    need("data.tokenizer", lambda v: v in ("word", "byte"), "'word' or 'byte'")
    need("data.min_count", lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    need("export.nemo", lambda v: v in ("auto", True, False), "auto, true or false")
    if cfg["export"]["nemo"] is True and cfg["data"]["tokenizer"] != "byte":
        raise ValueError("config export.nemo=true needs data.tokenizer=byte (NeMo's byte-level "
                         "ids); the word tokenizer has no NeMo equivalent")
    for key in ("acft.handshake_timeout_s", "acft.heartbeat_s", "acft.heartbeat_timeout_s"):
        need(key, lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
    if cfg["acft"]["heartbeat_timeout_s"] < 3 * cfg["acft"]["heartbeat_s"]:
        raise ValueError("config acft.heartbeat_timeout_s: expected at least 3 x acft.heartbeat_s")
    if cfg["data"]["source"] == "files":
        for key in ("train_file", "heldout_file"):
            need(f"data.{key}", lambda v: bool(v) and Path(v).is_file(), "an existing file")
        for key in ("pretrain_file", "prompts_file"):
            need(f"data.{key}", lambda v: v is None or Path(v).is_file(), "null or an existing file")
    pos = lambda v: isinstance(v, int) and v >= 1  # noqa: E731
    nonneg = lambda v: isinstance(v, int) and v >= 0  # noqa: E731
    for key in ("acft.iterations", "finetune.steps_per_iteration", "finetune.batch_size",
                "acft.nado.prompts", "acft.nado.batch_size", "pretrain.batch_size",
                "sampling.max_new_tokens", "sampling.batch_size", "eval.prompts",
                "eval.samples_per_prompt", "eval.ppl_records", "threads"):
        need(key, pos, "a positive integer")
    for key in ("acft.nado.steps", "pretrain.steps", "finetune.save_every"):
        need(key, nonneg, "a non-negative integer")
    need("acft.lambda", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
    need("acft.domain_lambdas", lambda v: isinstance(v, dict) and all(
        isinstance(x, (int, float)) and x >= 0 for x in v.values()), "a mapping domain -> λ >= 0")
    need("acft.delta", lambda v: v is None or (isinstance(v, (int, float)) and 0 < v <= 1),
         "null or a number in (0, 1]")
    need("acft.min_z", lambda v: isinstance(v, (int, float)) and 0 <= v < (cfg["acft"]["delta"] or 1),
         "a number in [0, acft.delta)")
    from nemo_acft.training.baselines import BASELINES, RLConfig

    need("baselines", lambda v: isinstance(v, list) and all(b in BASELINES for b in v)
         and len(set(v)) == len(v), f"a list of distinct names from {BASELINES}")
    need("filtering.threshold", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
         "a number in [0, 1]")
    need("nado_decoding.guidance", lambda v: isinstance(v, (int, float)) and v >= 0,
         "a number >= 0")
    try:
        RLConfig(**_get(cfg, "rl"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config rl: {e}") from e
    need("oracle.threshold", lambda v: v is None or (isinstance(v, (int, float)) and 0 <= v <= 1),
         "null (soft labels) or a number in [0, 1]")
    lo, hi = cfg["data"]["prompt_words"]
    if not 1 <= lo <= hi:
        raise ValueError(f"config data.prompt_words=[{lo}, {hi}]: expected 1 <= min <= max")
    SamplingParams(**sampling_kwargs(cfg["sampling"]))
    for key in ("pretrain.optim", "finetune.optim", "acft.nado.optim"):
        try:
            OptimConfig(**_get(cfg, key))
        except TypeError as e:
            raise ValueError(f"config {key}: {e}") from e


def sampling_kwargs(section: Dict[str, Any]) -> Dict[str, Any]:
    """The SamplingParams fields of a config section."""
    keys = ("max_new_tokens", "temperature", "top_k", "top_p")
    return {k: section[k] for k in keys if k in section}


@dataclass
class RunData:
    """Everything data-shaped a run needs, rebuilt identically by every process."""

    tokenizer: WordTokenizer
    domains: List[str]
    pretrain: LMDataset
    train: LMDataset
    heldout: LMDataset
    train_prompts: List[str]
    eval_prompts: List[str]


def build_data(cfg: Dict[str, Any]) -> RunData:
    """The built-in corpus (or the configured files), the tokenizer and the prompt pools."""
    d = cfg["data"]
    seed = cfg["seed"]
    if d["source"] == "builtin":
        b = d["builtin"]
        n_pre, n_train, n_held = b["pretrain_records"], b["train_records"], b["heldout_records"]
        corpus = generate_corpus(n_pre + n_train + n_held, seed=seed,
                                 toxic_fraction=b["toxic_fraction"],
                                 chat_share_of_toxic=b["chat_share_of_toxic"])
        pre, train, held = (corpus[:n_pre], corpus[n_pre:n_pre + n_train],
                            corpus[n_pre + n_train:])
        names = domains()
        # utility: perplexity on held-out general text, i.e. the records without an insult
        ppl_records = [r for r in held if not r["toxic"]]
        prompt_source = [r["text"] for r in held]
    else:
        skip = d["skip_malformed"]
        train, n_bad = read_records(d["train_file"], skip)
        pre, n_bad_pre = read_records(d["pretrain_file"], skip) if d["pretrain_file"] else (train, 0)
        ppl_records, n_bad_held = read_records(d["heldout_file"], skip)
        if n_bad + n_bad_pre + n_bad_held:
            log.warning("skipped %d malformed lines (train %d, pretrain %d, heldout %d)",
                        n_bad + n_bad_pre + n_bad_held, n_bad, n_bad_pre, n_bad_held)
        names = sorted({r["domain"] for r in pre + train + ppl_records})
        prompt_source = [r["text"] for r in ppl_records]
    # the vocabulary's counts: each record once (the pre-training file may be the training file)
    same = d["source"] == "files" and d["pretrain_file"] in (None, d["train_file"])
    tokenizer = build_tokenizer(d.get("tokenizer", "word"),
                                [r["text"] for r in (train if same else pre + train)],
                                min_count=d.get("min_count", 1))
    seq = cfg["model"]["seq_length"]
    lo, hi = d["prompt_words"]
    if d.get("prompts_file"):
        eval_prompts, _ = read_prompts(d["prompts_file"], d["skip_malformed"])
    else:
        eval_prompts = make_prompts(prompt_source, lo, hi, seed + 1)
    return RunData(
        tokenizer=tokenizer, domains=names,
        pretrain=encode_records(pre, tokenizer, seq, names),
        train=encode_records(train, tokenizer, seq, names),
        heldout=encode_records(ppl_records[: cfg["eval"]["ppl_records"]], tokenizer, seq, names),
        train_prompts=make_prompts([r["text"] for r in train], lo, hi, seed + 2),
        eval_prompts=eval_prompts[: cfg["eval"]["prompts"]],
    )


def gpt_config(cfg: Dict[str, Any], vocab_size: int) -> GPTConfig:
    """The model section as a GPTConfig; an unknown key is a ValueError naming it."""
    m = dict(cfg["model"])
    nado = m.pop("nado", {}) or {}
    fields = set(GPTConfig.__dataclass_fields__) - {"vocab_size", "nado"}
    unknown = sorted(set(m) - fields)
    if unknown:
        raise ValueError(f"config model.{unknown[0]}: unknown key; known: {sorted(fields)}")
    m = {k: v for k, v in m.items() if v is not None}
    return GPTConfig(vocab_size=vocab_size, nado=NADOHeadConfig(**nado), **m)


def regularizer_config(cfg: Dict[str, Any]) -> RegularizerConfig:  # noqa: D103
    a = cfg["acft"]
    return RegularizerConfig(lam=float(a["lambda"]), domain_lambdas=dict(a["domain_lambdas"]),
                             delta=a["delta"], min_z=float(a.get("min_z", 0.0)))


def init_process(cfg: Dict[str, Any]) -> None:
    """Threads, logging and a single-process model-parallel world (TP = PP = 1)."""
    from nemo_acft.models import init_distributed

    torch.set_num_threads(cfg["threads"])
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    init_distributed(tp=1, pp=1, seed=cfg["seed"])


def log_to_file(path: Path) -> None:
    """Also write this process's log lines to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


def build_model(gcfg: GPTConfig, seed: int, with_head: bool = True):
    """The single-stage GPT (+ NADO head), initialised from ``seed`` (the same weights in every
    process, whatever ran before)."""
    from nemo_acft.models import build_gpt_nado

    torch.manual_seed(seed)
    return build_gpt_nado(gcfg, tp=1, pp=1, with_head=with_head)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrained_path(cfg: Dict[str, Any], data: RunData) -> Path:
    """Where the pre-trained tiny GPT of this model/data/pre-train config is cached."""
    d = cfg["data"]
    files = {k: (v, os.path.getmtime(v), os.path.getsize(v))
             for k, v in d.items() if k.endswith("_file") and v}
    key = _digest({"model": cfg["model"], "pretrain": cfg["pretrain"], "seed": cfg["seed"],
                   "data": d, "files": files, "vocab": data.tokenizer.vocab})
    return Path(cfg["cache_dir"]).expanduser() / f"pretrained-{key}"


def ensure_pretrained(cfg: Dict[str, Any], data: RunData, gcfg: GPTConfig,
                      progress: bool = True) -> Path:
    """Pre-train the tiny GPT on the pre-training records, or reuse the cached one.

    Returns the directory holding ``model.pt`` (a plain GPTModel state dict) and
    ``tokenizer.json``; written to a temporary name and renamed.
    """
    from tqdm import tqdm

    from nemo_acft.training.blocks import lm_block

    out = pretrained_path(cfg, data)
    if (out / "model.pt").is_file():
        log.info("pre-trained tiny GPT: cached at %s", out)
        return out
    p = cfg["pretrain"]
    model = build_model(gcfg, cfg["seed"], with_head=False)
    optim = OptimConfig(**p["optim"])
    optimizer = optim.make(model.parameters())
    log.info("pre-training the tiny GPT: %d steps of %d records (cached for later runs)",
             p["steps"], p["batch_size"])
    bar = tqdm(total=p["steps"], desc="pretrain", disable=not progress, mininterval=1,
               file=sys.stdout)

    def on_step(step, m):
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)

    metrics = lm_block(model, optimizer, data.pretrain, start=0, end=p["steps"], total=p["steps"],
                       batch_size=p["batch_size"], optim=optim, seed=cfg["seed"],
                       on_step=on_step)
    bar.close()
    log.info("pre-training done: mean loss %.3f", metrics.get("loss", math.nan))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    data.tokenizer.save(str(tmp / "tokenizer.json"))
    with open(tmp / "config.json", "w") as fh:  # inside the directory renamed below
        json.dump({"model": cfg["model"], "pretrain": cfg["pretrain"]}, fh, indent=1)
    if out.exists():  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        os.rename(tmp, out)
    return out
