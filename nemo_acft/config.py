"""The one config schema of ``acft-train`` (``conf/acft.yaml`` holds every key and its default)
and the checks that run before any process group exists or anything is written.

Every check raises a ValueError naming the key, the value and what was expected. The model
section is NeMo's (``MegatronGPTModel`` keys, merged onto a checkpoint's own config); the
architecture checks that need the resolved model config (heads, layers, the padded vocabulary of
both groups) are :func:`check_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

SCHEDULES = ("sequential", "parallel")
REFERENCES = ("current", "frozen", "base")
KL_ON = ("corpus", "samples", "both")
REFERENCE_ON = ("lm", "oracle")
NADO_KINDS = ("head", "separate")  # model.acft.nado_head.kind (nemo_acft.models.gpt_nado)
ROLES = ("all", "prepare", "lm", "oracle", "finish")
BASELINES = ("filtering", "rl", "nado_decoding")
ORACLE_NAMES = ("lexicon", "sklearn_text", "detoxify", "hf_classifier")
#: the schema: every key of acft-train's config with its default
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "conf" / "acft.yaml"


def get(cfg: Dict[str, Any], dotted: str):
    """``cfg["a"]["b"]`` for ``"a.b"``; a KeyError names the missing key."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config key {dotted!r} is missing")
        node = node[part]
    return node


@dataclass(frozen=True)
class Layout:
    """One world: ``tp × pp × dp`` processes on ``num_nodes`` nodes."""

    tp: int
    pp: int
    dp: int
    num_nodes: int = 1

    @property
    def world_size(self) -> int:  # noqa: D102
        return self.tp * self.pp * self.dp

    @property
    def devices(self) -> int:
        """Processes per node."""
        return self.world_size // self.num_nodes


def _world(devices, num_nodes, model_parallel: int) -> int:
    """``devices × num_nodes``; ``devices: null`` = one model replica (tensor × pipeline)."""
    return (int(devices) if devices is not None else model_parallel) * int(num_nodes)


def lm_layout(cfg: Dict[str, Any]) -> Layout:
    """The LM group: ``trainer.devices × trainer.num_nodes`` processes at the model's TP/PP
    (``trainer.devices: null``: TP × PP on one node, data parallel 1)."""
    m, t = cfg["model"], cfg["trainer"]
    tp, pp = int(m["tensor_model_parallel_size"]), int(m["pipeline_model_parallel_size"])
    world = _world(t["devices"], t["num_nodes"], tp * pp)
    return Layout(tp, pp, world // (tp * pp), int(t["num_nodes"]))


def oracle_layout(cfg: Dict[str, Any]) -> Layout:
    """The oracle group (sampling, labelling, NADO training, evaluation): its own TP, PP 1
    (``devices: null``: TP processes, data parallel 1)."""
    g = cfg["model"]["acft"]["oracle_group"]
    tp = int(g["tensor_model_parallel_size"])
    world = _world(g["devices"], g["num_nodes"], tp)
    return Layout(tp, 1, world // tp, int(g["num_nodes"]))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: Dict[str, Any]) -> None:
    """Check a resolved ``acft-train`` config (a plain dict). Runs before anything is built or
    written."""
    def need(key, ok, expected):
        value = get(cfg, key)
        if not ok(value):
            raise ValueError(f"config {key}={value!r}: expected {expected}")

    pos = lambda v: _is_int(v) and v >= 1  # noqa: E731
    nonneg = lambda v: _is_int(v) and v >= 0  # noqa: E731
    check_keys(cfg)
    need("schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
    need("role", lambda v: v in ROLES, f"one of {ROLES}")
    if cfg["role"] in ("lm", "oracle"):
        need("schedule", lambda v: v == "parallel",
             f"parallel with role={cfg['role']} (the sides of the parallel schedule; the "
             "sequential schedule runs in role=all or its phases prepare, finish)")
    need("run_dir", lambda v: isinstance(v, str) and v != "", "a directory")
    for key in ("trainer.devices", "model.acft.oracle_group.devices"):
        need(key, lambda v: v is None or pos(v),
             "null (tensor x pipeline parallel: one replica) or a positive integer")
    for key in ("threads", "trainer.num_nodes",
                "model.tensor_model_parallel_size", "model.pipeline_model_parallel_size",
                "model.micro_batch_size", "model.global_batch_size",
                "model.acft.iterations", "model.acft.steps_per_iteration",
                "model.acft.oracle_block.prompts", "model.acft.oracle_block.global_batch_size",
                "model.acft.oracle_block.micro_batch_size", "model.acft.sampling.max_new_tokens",
                "model.acft.oracle_block.samples_per_prompt",
                "model.acft.calibration.samples_per_prompt", "model.acft.calibration.bins",
                "model.acft.sampling.batch_size", "model.acft.oracle_group.num_nodes",
                "model.acft.oracle_group.tensor_model_parallel_size", "eval.prompts",
                "eval.samples_per_prompt", "eval.max_new_tokens", "eval.ppl_records",
                "eval.batch_size", "oracle.batch_size"):
        need(key, pos, "a positive integer")
    for key in ("model.acft.oracle_block.steps", "model.acft.save_every",
                "model.acft.calibration.prompts", "model.acft.diagnostics.probe_prompts",
                "model.acft.nado_head.num_layers", "model.acft.nado_head.loss_chunk_tokens"):
        need(key, nonneg, "a non-negative integer")
    need("model.restore_from_path", lambda v: v is None or Path(v).is_file(),
         "null or an existing .nemo file")
    a = cfg["model"]["acft"]
    need("model.acft.lambda", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    need("model.acft.domain_lambdas", lambda v: isinstance(v, dict) and all(
        _is_num(x) and x >= 0 for x in v.values()), "a mapping domain -> λ >= 0")
    need("model.acft.delta", lambda v: v is None or (_is_num(v) and 0 < v <= 1),
         "null or a number in (0, 1]")
    need("model.acft.min_z", lambda v: _is_num(v) and 0 <= v < (a["delta"] or 1),
         "a number in [0, model.acft.delta)")
    need("model.acft.alpha", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    need("model.acft.reference", lambda v: v in REFERENCES, f"one of {REFERENCES}")
    need("model.acft.kl_on", lambda v: v in KL_ON, f"one of {KL_ON}")
    need("model.acft.reference_on", lambda v: v in REFERENCE_ON, f"one of {REFERENCE_ON}")
    need("model.acft.reference_top_k", pos, "a positive integer")
    if a["reference_on"] == "oracle":
        need("model.acft.reference", lambda v: v != "current",
             "frozen or base with model.acft.reference_on=oracle (q from the model being "
             "trained is the LM step's own)")
        need("model.acft.kl_on", lambda v: v == "corpus",
             "corpus with model.acft.reference_on=oracle (the q of the oracle block's samples "
             "is not shipped)")
    need("model.acft.sample_lambda", lambda v: v is None or (_is_num(v) and v >= 0),
         "null (= model.acft.lambda) or a number >= 0")
    need("model.acft.nado_head.fp32", lambda v: isinstance(v, bool), "true or false")
    need("model.acft.nado_head.compile_loss", lambda v: isinstance(v, bool), "true or false")
    need("model.acft.nado_head.kind", lambda v: v in NADO_KINDS, f"one of {NADO_KINDS}")
    need("model.acft.nado_head.num_layers",
         lambda v: a["nado_head"]["kind"] != "separate" or v >= 1,
         "at least 1 with nado_head.kind=separate (the separate model's layers)")
    e = a["exchange"]
    for key in ("timeout_s", "handshake_timeout_s", "heartbeat_s", "heartbeat_timeout_s",
                "stuck_timeout_s", "collective_timeout_s"):
        need(f"model.acft.exchange.{key}", lambda v: _is_num(v) and v > 0, "a number > 0")
    if e["heartbeat_timeout_s"] < 3 * e["heartbeat_s"]:
        raise ValueError("config model.acft.exchange.heartbeat_timeout_s: expected at least 3 x "
                         "model.acft.exchange.heartbeat_s")
    if e["stuck_timeout_s"] < e["heartbeat_timeout_s"]:
        raise ValueError("config model.acft.exchange.stuck_timeout_s: expected at least "
                         "model.acft.exchange.heartbeat_timeout_s")
    need("model.acft.sampling.temperature", lambda v: _is_num(v) and v > 0, "a number > 0")
    need("model.acft.sampling.top_k", nonneg, "a non-negative integer")
    need("model.acft.sampling.top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    need("eval.top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    for key in ("model.optim", "model.acft.oracle_block.optim", "pretrain.optim"):
        _check_optim(cfg, key)
    need("data.source", lambda v: v in ("builtin", "files"), "'builtin' or 'files'")
    if cfg["data"]["source"] == "files":
        for key in ("train_file", "heldout_file"):
            need(f"data.{key}", lambda v: bool(v) and Path(v).is_file(), "an existing file")
        need("data.pretrain_file", lambda v: v is None or Path(v).is_file(),
             "null or an existing file")
    need("data.prompts_file", lambda v: v is None or Path(v).is_file(),
         "null or an existing file")
    lo, hi = cfg["data"]["prompt_words"]
    if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
        raise ValueError(f"config data.prompt_words=[{lo}, {hi}]: expected 1 <= min <= max")
    need("pretrain.steps", nonneg, "a non-negative integer")
    need("pretrain.global_batch_size", pos, "a positive integer")
    need("pretrain.tokenizer.vocab_size", lambda v: _is_int(v) and v >= 16, "an integer >= 16")
    need("pretrain.tokenizer.model_type", lambda v: v in ("unigram", "bpe", "word", "char"),
         "unigram, bpe, word or char")
    need("oracle.name", lambda v: v in ORACLE_NAMES, f"one of {ORACLE_NAMES}")
    need("oracle.threshold", lambda v: v is None or (_is_num(v) and 0 <= v <= 1),
         "null (soft labels) or a number in [0, 1]")
    need("baselines", lambda v: isinstance(v, list) and all(b in BASELINES for b in v)
         and len(set(v)) == len(v), f"a list of distinct names from {BASELINES}")
    need("filtering.threshold", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    need("nado_decoding.guidance", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    need("rl.coef", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    need("rl.batch_size", lambda v: _is_int(v) and v >= 2,
         "an integer >= 2 (each sample's baseline is the mean reward of the others)")
    need("rl.max_new_tokens", pos, "a positive integer")
    _check_layouts(cfg)


#: sections whose keys are not this schema's: NeMo's model, optimizer and scheduler keys, the
#: oracle's own (checked by nemo_acft.oracles.check_oracle), and the per-domain λ mapping
OPEN_SECTIONS = ("model.", "pretrain.model.", "pretrain.optim.", "oracle.",
                 "model.acft.domain_lambdas.", "hydra.")
#: sections of this schema inside an open one (model.acft is ours; its optimizers are NeMo's)
OWN_SECTIONS = ("model.acft.",)
OPEN_INSIDE_OWN = ("model.acft.domain_lambdas.", "model.acft.oracle_block.optim.")


def _flat_keys(d: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def schema_keys() -> List[str]:
    """Every key of ``conf/acft.yaml`` (the schema: every key with its default), dotted."""
    import yaml

    return _flat_keys(yaml.safe_load(SCHEMA_FILE.read_text()))


def _is_open(key: str) -> bool:
    if key.startswith(OPEN_INSIDE_OWN):
        return True
    if key.startswith(OWN_SECTIONS):
        return False
    return key.startswith(OPEN_SECTIONS)


def check_keys(cfg: Dict[str, Any]) -> None:
    """Every key of ``cfg`` is a key of the schema (``conf/acft.yaml``) or inside a section
    that is NeMo's or the oracle's (:data:`OPEN_SECTIONS`): a misspelled key, also one added
    with ``+key=...``, is an error naming it and the closest keys."""
    import difflib

    known = set(schema_keys())
    for key in _flat_keys(cfg):
        if key in known or _is_open(key) or any(key.startswith(k + ".") for k in known):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"config {key}: not a key of acft-train's config ({SCHEMA_FILE.name} "
                         f"holds every key){hint}")


def _check_optim(cfg, key: str) -> None:
    o = get(cfg, key)
    if not isinstance(o, dict) or not isinstance(o.get("name"), str):
        raise ValueError(f"config {key}={o!r}: expected NeMo's optimizer config (name, lr, ...)")
    if not (_is_num(o.get("lr")) and o["lr"] > 0):
        raise ValueError(f"config {key}.lr={o.get('lr')!r}: expected a number > 0")
    sched = o.get("sched")
    if sched is not None and not (isinstance(sched, dict) and isinstance(sched.get("name"), str)):
        raise ValueError(f"config {key}.sched={sched!r}: expected null or NeMo's scheduler "
                         "config (name, warmup_steps, min_lr, ...)")


def _check_layouts(cfg) -> None:
    m, a, t = cfg["model"], cfg["model"]["acft"], cfg["trainer"]
    tp, pp = m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"]
    world = _world(t["devices"], t["num_nodes"], tp * pp)
    if world % (tp * pp):
        raise ValueError(f"config trainer.devices x trainer.num_nodes = {world} is not a multiple "
                         f"of model.tensor_model_parallel_size x "
                         f"model.pipeline_model_parallel_size = {tp} x {pp}")
    lm = lm_layout(cfg)
    for key, size, micro in (("model.global_batch_size", m["global_batch_size"],
                              m["micro_batch_size"]),
                             ("pretrain.global_batch_size", cfg["pretrain"]["global_batch_size"],
                              m["micro_batch_size"])):
        per = min(micro, max(size // lm.dp, 1))
        if size % lm.dp or (size // lm.dp) % per:
            raise ValueError(f"config {key}={size}: expected a multiple of the LM group's data "
                             f"parallel size {lm.dp} x the micro-batch size {per}")
    g = a["oracle_group"]
    o_world = _world(g["devices"], g["num_nodes"], g["tensor_model_parallel_size"])
    if o_world % g["tensor_model_parallel_size"]:
        raise ValueError(f"config model.acft.oracle_group.devices x num_nodes = {o_world} is not "
                         "a multiple of model.acft.oracle_group.tensor_model_parallel_size = "
                         f"{g['tensor_model_parallel_size']}")
    o = oracle_layout(cfg)
    ob = a["oracle_block"]
    per = min(ob["micro_batch_size"], max(ob["global_batch_size"] // o.dp, 1))
    if ob["global_batch_size"] % o.dp or (ob["global_batch_size"] // o.dp) % per:
        raise ValueError(f"config model.acft.oracle_block.global_batch_size="
                         f"{ob['global_batch_size']}: expected a multiple of the oracle group's "
                         f"data parallel size {o.dp} x the micro-batch size {per}")
    if cfg["schedule"] == "sequential" and (pp > 1):
        raise ValueError(f"config schedule=sequential with model.pipeline_model_parallel_size="
                         f"{pp}: the sequential schedule samples in the LM group's layout, and "
                         "sampling needs pipeline parallelism 1; use schedule=parallel (the "
                         "oracle group samples at model.acft.oracle_group's layout)")
    if "rl" in cfg["baselines"] and pp > 1:
        raise ValueError(f"config baselines={cfg['baselines']}: the rl baseline samples from the "
                         f"model being trained, which needs model.pipeline_model_parallel_size=1 "
                         f"(got {pp})")


def check_model(model_cfg: Dict[str, Any], vocab_size: int, layouts: Sequence[Layout]) -> None:
    """Architecture against every layout that will hold it: TP divides the attention heads and
    the FFN width, PP the layers, and the vocabulary padded for each TP size is the same (θ and
    φ cross between the groups whole). ValueErrors name the key."""
    heads, layers = int(model_cfg["num_attention_heads"]), int(model_cfg["num_layers"])
    ffn = int(model_cfg.get("ffn_hidden_size") or 4 * int(model_cfg["hidden_size"]))
    groups = model_cfg.get("num_query_groups") or heads
    divisible = int(model_cfg.get("make_vocab_size_divisible_by", 128))
    padded = {}
    for lay in layouts:
        for what, n in (("num_attention_heads", heads), ("ffn_hidden_size", ffn),
                        ("num_query_groups", int(groups))):
            if n % lay.tp:
                raise ValueError(f"tensor_model_parallel_size={lay.tp} does not divide "
                                 f"model.{what}={n}")
        if layers % lay.pp:
            raise ValueError(f"pipeline_model_parallel_size={lay.pp} does not divide "
                             f"model.num_layers={layers}")
        multiple = divisible * lay.tp
        padded[lay.tp] = -(-int(vocab_size) // multiple) * multiple
    if len(set(padded.values())) > 1:
        shown = ", ".join(f"TP {t}: {v}" for t, v in sorted(padded.items()))
        raise ValueError(f"the vocabulary of {vocab_size} pads to different sizes in the two "
                         f"groups ({shown}): set model.make_vocab_size_divisible_by to a "
                         f"multiple of {divisible} x the largest tensor-parallel size")


def domain_lambdas(cfg: Dict[str, Any], domains: Sequence[str]) -> List[float]:
    """λ of each domain name in ``domains`` (``model.acft.domain_lambdas``, else
    ``model.acft.lambda``); a name the data does not have is an error."""
    a = cfg["model"]["acft"]
    unknown = sorted(set(a["domain_lambdas"]) - set(domains))
    if unknown:
        raise ValueError(f"config model.acft.domain_lambdas names domains {unknown} that the data "
                         f"does not have; domains: {list(domains)} (Hydra merges a mapping: "
                         "replace it with '~model.acft.domain_lambdas' "
                         "'+model.acft.domain_lambdas={name: λ, ...}')")
    return [float(a["domain_lambdas"].get(d, a["lambda"])) for d in domains]


__all__ = ["SCHEDULES", "ROLES", "BASELINES", "Layout", "get", "validate", "check_model",
           "lm_layout", "oracle_layout", "domain_lambdas"]
