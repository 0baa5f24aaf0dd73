"""What every world of a run builds: the run's model config (resolved once, in
``run_dir/model/``), the model at the world's layout, the tokenizer and the data, the oracle (on
global rank 0), logging and TensorBoard.

The model config of a run is the checkpoint's own config (``model.restore_from_path``) or the
built-in tiny GPT's (``pretrain.model`` with a SentencePiece tokenizer trained offline on the
corpus), with the ``model`` section of the run's config on top (NeMo-Aligner's pattern); the
tokenizer's files are copied beside it, so every world builds the same model from
``run_dir/model/config.yaml`` and loads its weights from the exchange.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_acft import config as schema
from nemo_acft.config import Layout
from nemo_acft.io_utils import atomic_write, rank_log, replace_dir, tmp_name

log = logging.getLogger("nemo_acft")

#: keys of a fresh MegatronGPTModel config beyond the architecture (pretrain.model) that NeMo
#: reads at construction; NeMo's own data pipeline is never used (the loops feed the batches)
FRESH_MODEL = {
    "mcore_gpt": True, "precision": 32, "seed": 1234, "micro_batch_size": 1,
    "global_batch_size": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "transformer_engine": True, "use_cpu_initialization": False,
    "data": {"data_impl": "mock", "data_prefix": [], "num_workers": 0},
}
#: the watchdog's and the collectives' bounds (``model.acft.exchange``) for an earlier run's
#: config that does not name them
STUCK_DEFAULTS = {"stuck_timeout_s": 900, "collective_timeout_s": 1800}
#: keys of the run's ``model`` section that are not MegatronGPTModel keys
RUN_KEYS = ("restore_from_path",)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def model_dir(cfg: Dict[str, Any]) -> Path:  # noqa: D103
    return Path(cfg["run_dir"]) / "model"


def builtin_keys(cfg: Dict[str, Any]) -> Dict[str, str]:
    """Cache keys of the built-in tokenizer and tiny GPT (``cache_dir``): they depend on the data
    (the files' contents, xxh3-128, not their paths or times), the seed and the ``pretrain``
    section only, so every run of the same corpus shares them, wherever its files were written."""
    from nemo_acft.algorithms.exchange import file_digest

    d = cfg["data"]
    files = {k: file_digest(Path(v)) for k, v in d.items() if k.endswith("_file") and v}
    settings = {k: v for k, v in d.items() if not k.endswith("_file")}
    tok = _digest({"data": settings, "files": files, "seed": cfg["seed"],
                   "tokenizer": cfg["pretrain"]["tokenizer"]})
    gpt = _digest({"tokenizer": tok, "pretrain": cfg["pretrain"],
                   "optim": cfg["pretrain"]["optim"]})
    root = Path(cfg["cache_dir"]).expanduser()
    return {"tokenizer": str(root / f"tokenizer-{tok}.model"),
            "gpt": str(root / f"tiny-gpt-{gpt}.nemo")}


def _extract_tokenizer(nemo_path: str, tokenizer_cfg, tmp: Path, out: Path):
    """Copy the tokenizer files a ``.nemo`` carries (``nemo:`` paths of its config) into ``tmp``
    (copied to ``out`` later); returns the tokenizer config pointing at ``out`` and the map
    final path -> where the file is now."""
    tok = OmegaConf.to_container(tokenizer_cfg, resolve=True)
    wanted = {k: v[len("nemo:"):] for k, v in tok.items()
              if isinstance(v, str) and v.startswith("nemo:")}
    files = {}
    if wanted:
        with tarfile.open(nemo_path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for key, name in wanted.items():
                if name not in members:
                    raise ValueError(f"model.restore_from_path={nemo_path}: the tokenizer file "
                                     f"{name} ({key}) is not in the .nemo")
                with tar.extractfile(members[name]) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tok[key] = str(out / name)
                files[str(out / name)] = str(tmp / name)
    return tok, files


class StagedModelConfig:
    """A run's model config resolved (the checkpoint's or the built-in config with the run's
    ``model`` section on top) and checked against both groups' layouts
    (:func:`nemo_acft.config.check_model`), its tokenizer files in a temporary folder outside
    the run directory until :meth:`write` puts it in place as ``run_dir/model/``."""

    def __init__(self, cfg: Dict[str, Any]):
        from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import (
            MegatronGPTModel)

        self.out = model_dir(cfg)
        self._dir = tempfile.TemporaryDirectory(prefix="acft-model-")
        stage = Path(self._dir.name)
        user = {k: v for k, v in cfg["model"].items() if k not in RUN_KEYS}
        try:
            restore = cfg["model"]["restore_from_path"]
            if restore:
                base = MegatronGPTModel.restore_from(restore, return_config=True)
                OmegaConf.set_struct(base, False)
                tok, files = _extract_tokenizer(restore, base.tokenizer, stage, self.out)
                base = OmegaConf.merge(base, {"tokenizer": tok})
                source = {"restore_from_path": str(restore)}
            else:
                from nemo_acft.data import sentencepiece_config

                keys = builtin_keys(cfg)
                ensure_builtin_tokenizer(cfg, keys["tokenizer"])
                shutil.copyfile(keys["tokenizer"], stage / "tokenizer.model")
                files = {str(self.out / "tokenizer.model"): str(stage / "tokenizer.model")}
                base = OmegaConf.create({**FRESH_MODEL, **cfg["pretrain"]["model"],
                                         "max_position_embeddings":
                                             cfg["pretrain"]["model"]["encoder_seq_length"],
                                         "seed": cfg["seed"],
                                         "tokenizer": sentencepiece_config(
                                             self.out / "tokenizer.model")})
                source = {"builtin": keys["gpt"]}
            self.model_cfg = OmegaConf.merge(base, user)
            self.info = {"vocab_size": _vocab_size(self.model_cfg, files), **source}
            schema.check_model(OmegaConf.to_container(self.model_cfg, resolve=True),
                               self.info["vocab_size"],
                               [schema.lm_layout(cfg), schema.oracle_layout(cfg)])
        except BaseException:
            self.cleanup()
            raise

    def write(self, replace: bool = False) -> None:
        """``run_dir/model/`` (``config.yaml``, ``info.json``, the tokenizer files), under a
        temporary name and renamed; an existing one is kept (another process finished first)
        unless ``replace``."""
        stage = Path(self._dir.name)
        (stage / "info.json").write_text(json.dumps(self.info, indent=1))
        (stage / "config.yaml").write_text(OmegaConf.to_yaml(self.model_cfg))
        tmp = tmp_name(self.out)
        try:
            shutil.copytree(stage, tmp)
            if replace:
                replace_dir(tmp, self.out)
            elif self.out.exists():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, self.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.cleanup()

    def cleanup(self) -> None:  # noqa: D102
        self._dir.cleanup()


def resolve_model_config(cfg: Dict[str, Any], write: bool = True):
    """``(model config, info)`` of the run (``info["vocab_size"]`` is the tokenizer's
    vocabulary): ``run_dir/model/`` when it exists (checked against both layouts), else
    resolved (:class:`StagedModelConfig`) and, with ``write``, written there; without,
    nothing is written into the run directory. Not collective: the driver (or prepare's rank
    0) calls it."""
    out = model_dir(cfg)
    path = out / "config.yaml"
    if not path.is_file():
        staged = StagedModelConfig(cfg)
        if not write:
            staged.cleanup()
            return staged.model_cfg, staged.info
        staged.write()
    model_cfg = OmegaConf.load(path)
    info = json.loads((out / "info.json").read_text())
    schema.check_model(OmegaConf.to_container(model_cfg, resolve=True), info["vocab_size"],
                       [schema.lm_layout(cfg), schema.oracle_layout(cfg)])
    return model_cfg, info


def _vocab_size(model_cfg, files: Dict[str, str]) -> int:
    """The tokenizer's vocabulary, built as NeMo's ``MegatronBaseModel._build_tokenizer`` does
    (or ``override_vocab_size``); ``files`` maps the config's paths to where the files are now."""
    if model_cfg.get("override_vocab_size"):
        return int(model_cfg.override_vocab_size)
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    t = model_cfg.tokenizer
    here = lambda key: files.get(str(t.get(key)), t.get(key))  # noqa: E731
    legacy = t.get("sentencepiece_legacy", t.library == "sentencepiece")
    tok = get_nmt_tokenizer(library=t.library, model_name=t.get("type"),
                            tokenizer_model=here("model"), vocab_file=here("vocab_file"),
                            merges_file=here("merge_file"), use_fast=t.get("use_fast", False),
                            delimiter=t.get("delimiter"), special_tokens=t.get("special_tokens"),
                            trust_remote_code=t.get("trust_remote_code", False), legacy=legacy,
                            chat_template=t.get("chat_template"))
    if t.get("additional_special_tokens") is not None:
        tok.add_special_tokens(OmegaConf.to_object(t.additional_special_tokens))
    return int(tok.vocab_size)


def ensure_builtin_tokenizer(cfg: Dict[str, Any], path: str) -> Path:
    """The built-in SentencePiece model (cached): trained on the pre-training text."""
    from nemo_acft.data import pretrain_texts, train_sentencepiece

    p = Path(path)
    if not p.is_file():
        t = cfg["pretrain"]["tokenizer"]
        log.info("training the built-in SentencePiece tokenizer (%s, vocabulary <= %d)",
                 t["model_type"], t["vocab_size"])
        train_sentencepiece(pretrain_texts(cfg["data"], cfg["seed"]), p, t["vocab_size"],
                            t["model_type"])
    return p


def trainer_config(cfg: Dict[str, Any], layout: Layout) -> Dict[str, Any]:
    """NeMo/Lightning trainer settings of a world."""
    t = cfg["trainer"]
    return {"devices": layout.devices, "num_nodes": layout.num_nodes,
            "accelerator": t["accelerator"], "precision": t["precision"],
            "gradient_clip_val": t["gradient_clip_val"]}


def quiet_libraries() -> None:
    """Libraries' logs at warnings and above (NeMo's and Lightning's at errors: their INFO lines
    and per-key config warnings say nothing a user of this package can act on); Hydra's root
    handler replaced by a plain one."""
    import warnings

    from nemo.utils import logging as nemo_logging

    warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    nemo_logging.setLevel(logging.ERROR)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric",
                 "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("megatron.core.dist_checkpointing.validation").addFilter(_ExtraStateOnly())


class _ExtraStateOnly(logging.Filter):
    """Drops megatron's warning that a checkpoint holds keys the model did not ask for when
    every such key is an empty ``_extra_state`` (Transformer Engine's FP8 metadata slot, None
    for megatron-core's local layers): NeMo's restore of a plain GPT ``.nemo`` into the model
    with a head logs it for every layer. Any other mismatch is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        import re

        msg = record.getMessage()
        if "Missing keys" not in msg and "Unexpected keys" not in msg:
            return True
        keys = re.findall(r"'([^']+)'", msg)
        return not keys or not all(k.endswith("_extra_state") for k in keys)


def setup_logging(cfg: Dict[str, Any], name: str) -> None:
    """The ``nemo_acft`` log: global rank 0 to stdout and ``run_dir/logs/<name>.log``, other
    ranks their warnings (:func:`quiet_libraries` for the rest). Called before the process
    group exists: the rank is the launcher's."""
    from nemo_acft.models.parallel import world_env

    rank = world_env()["rank"]
    quiet_libraries()
    torch.set_num_threads(cfg["threads"])
    log.handlers.clear()
    log.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0:
        path = Path(cfg["run_dir"]) / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)


class Run:
    """One world's view of the run: config, layout, model, tokenizer, data, oracle, stores.

    Args:
        cfg: the resolved run config (a plain dict, checked).
        side: the world's name in logs and TensorBoard (``prepare``, ``lm``, ``oracle``,
            ``acft`` (sequential), ``finish``).
        layout: the world's layout (:func:`nemo_acft.config.lm_layout` or ``oracle_layout``).
        restore_from: build the model from this ``.nemo`` (NeMo's restore, resharded) instead
            of fresh from ``run_dir/model/config.yaml``.
        watch: run the :class:`~nemo_acft.algorithms.coordination.Watchdog` (the phases of a
            run do; a tool that only reads a run does not).
    """

    def __init__(self, cfg: Dict[str, Any], side: str, layout: Layout,
                 restore_from: Optional[str] = None, watch: bool = False):
        from nemo_acft.algorithms.exchange import ArtifactStore
        from nemo_acft.data import TextTokenizer, build_data
        from nemo_acft.models.build import build_model

        setup_logging(cfg, side)
        self.cfg, self.side, self.layout = cfg, side, layout
        self.run_dir = Path(cfg["run_dir"])
        self.acft = cfg["model"]["acft"]
        self.K = self.acft["iterations"]
        self.S = self.acft["steps_per_iteration"]
        self.seed = cfg["seed"]
        self.exchange = ArtifactStore(self.run_dir / "exchange")
        path = model_dir(cfg) / "config.yaml"
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: run role=prepare first (it resolves the "
                               "model config and writes θ_0)")
        self.model_cfg = OmegaConf.load(path)
        x = dict(STUCK_DEFAULTS, **self.acft["exchange"])  # a run of an earlier version lacks them
        self.model = build_model(self.model_cfg, tp=layout.tp, pp=layout.pp,
                                 trainer_cfg=trainer_config(cfg, layout), seed=self.seed,
                                 restore_from=restore_from,
                                 timeout_s=x["collective_timeout_s"])
        self.tokenizer = TextTokenizer(self.model.tokenizer)
        self.seq_length = int(self.model_cfg.encoder_seq_length)
        self.data = build_data(cfg["data"], cfg["eval"], self.tokenizer, self.seq_length,
                               self.seed)
        self._oracle = None
        self._tb = None
        self.watchdog = None
        if watch:
            from nemo_acft.algorithms.coordination import Watchdog, world_pids

            self.watchdog = Watchdog(self.exchange, side, every_s=x["heartbeat_s"],
                                     dead_s=x["heartbeat_timeout_s"],
                                     stuck_s=x["stuck_timeout_s"], pids=world_pids(),
                                     log_file=rank_log(self.run_dir / "logs", side, _rank()))

    @property
    def rank0(self) -> bool:  # noqa: D102
        return _rank() == 0

    @property
    def oracle(self):
        """The oracle, built on global rank 0 only (the ranks that sample do not need it)."""
        if self._oracle is None and self.rank0:
            from nemo_acft.oracles import build_oracle

            self._oracle = build_oracle(self.cfg["oracle"])
        return self._oracle

    def scalars(self, prefix: str, metrics: Dict[str, Any], step: int) -> None:
        """Log numeric metrics to TensorBoard (``<exp_manager.explicit_log_dir>/tb/<side>``)."""
        if not self.rank0 or not self.cfg["exp_manager"]["create_tensorboard_logger"]:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(self.cfg["exp_manager"]["explicit_log_dir"])
                                         / "tb" / self.side))
        for key, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", v, step)

    def bar(self, total: int, desc: str, position: int = 0):
        """A tqdm bar on global rank 0 (rate and ETA), disabled elsewhere."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, position=position, leave=False, mininterval=1,
                    disable=not (self.cfg["progress"] and self.rank0), file=sys.stdout)

    def close(self) -> None:  # noqa: D102
        if self._tb is not None:
            self._tb.close()
        if self.watchdog is not None:
            self.watchdog.stop()


#: config keys that may change between a run and its resumption
VOLATILE = ("role", "progress", "model.acft.exchange.")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def computed_anything(run_dir: Path) -> bool:
    """Whether a run directory holds any artifact (θ_0, a checkpoint, a baseline's θ_k)."""
    return any(Path(run_dir).glob("**/iter_*/manifest.json"))


def check_run_config(cfg: Dict[str, Any], allow_replace: bool = True) -> bool:
    """If the run directory already holds a config different from ``cfg`` (volatile keys
    aside): True when nothing was computed with it yet (the new config replaces it: a run whose
    first attempt failed before its first artifact), else a ValueError naming the keys that
    differ (a rerun must be the same run to resume it). False when there is nothing to
    replace."""
    import yaml

    run_dir = Path(cfg["run_dir"])
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        old = _flatten(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a readable config ({' '.join(str(e).split())[:120]}); "
                         "restore it or choose another run_dir") from None
    new = _flatten(cfg)
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not k.startswith(VOLATILE))
    if not diff:
        return False
    if allow_replace and not computed_anything(run_dir):
        log.warning("run_dir %s: its config differs in %s and nothing was computed with it: "
                    "replaced by this run's", run_dir, ", ".join(diff[:8]))
        return True
    raise ValueError(
        f"run_dir {run_dir} holds a run with a different config (keys: "
        f"{', '.join(diff[:8])}); rerun with the same config to resume, or choose "
        "another run_dir")


def write_run_config(cfg: Dict[str, Any]) -> Path:
    """Save the resolved config as ``run_dir/config.yaml`` (checked by :func:`check_run_config`
    first)."""
    import yaml

    check_run_config(cfg)
    path = Path(cfg["run_dir"]) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path
