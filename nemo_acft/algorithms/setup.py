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
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_acft import config as schema
from nemo_acft.config import Layout
from nemo_acft.io_utils import atomic_write

log = logging.getLogger("nemo_acft")

#: keys of a fresh MegatronGPTModel config beyond the architecture (pretrain.model) that NeMo
#: reads at construction; NeMo's own data pipeline is never used (the loops feed the batches)
FRESH_MODEL = {
    "mcore_gpt": True, "precision": 32, "seed": 1234, "micro_batch_size": 1,
    "global_batch_size": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "transformer_engine": True, "use_cpu_initialization": False,
    "data": {"data_impl": "mock", "data_prefix": [], "num_workers": 0},
}
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
    from nemo_acft.algorithms.exchange import _digest as file_digest

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
    (renamed to ``out`` later); returns the tokenizer config pointing at ``out`` and the map
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


def resolve_model_config(cfg: Dict[str, Any]):
    """Write ``run_dir/model/`` once (``config.yaml``, ``info.json`` and the tokenizer files)
    and return ``(model config, info)``; ``info["vocab_size"]`` is the tokenizer's vocabulary.
    Not collective: the driver (or prepare's rank 0) calls it. The architecture is checked
    against both groups' layouts (:func:`nemo_acft.config.check_model`) before anything is
    renamed into place: a config that cannot run leaves no ``model/`` behind."""
    out = model_dir(cfg)
    path = out / "config.yaml"
    layouts = [schema.lm_layout(cfg), schema.oracle_layout(cfg)]
    if path.is_file():
        model_cfg = OmegaConf.load(path)
        info = json.loads((out / "info.json").read_text())
        schema.check_model(OmegaConf.to_container(model_cfg, resolve=True), info["vocab_size"],
                           layouts)
        return model_cfg, info
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    user = {k: v for k, v in cfg["model"].items() if k not in RUN_KEYS}
    tmp = out.with_name(f".model.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        restore = cfg["model"]["restore_from_path"]
        if restore:
            base = MegatronGPTModel.restore_from(restore, return_config=True)
            OmegaConf.set_struct(base, False)
            tok, files = _extract_tokenizer(restore, base.tokenizer, tmp, out)
            base = OmegaConf.merge(base, {"tokenizer": tok})
            source = {"restore_from_path": str(restore)}
        else:
            from nemo_acft.data import sentencepiece_config

            keys = builtin_keys(cfg)
            ensure_builtin_tokenizer(cfg, keys["tokenizer"])
            shutil.copyfile(keys["tokenizer"], tmp / "tokenizer.model")
            files = {str(out / "tokenizer.model"): str(tmp / "tokenizer.model")}
            base = OmegaConf.create({**FRESH_MODEL, **cfg["pretrain"]["model"],
                                     "max_position_embeddings":
                                         cfg["pretrain"]["model"]["encoder_seq_length"],
                                     "seed": cfg["seed"],
                                     "tokenizer": sentencepiece_config(out / "tokenizer.model")})
            source = {"builtin": keys["gpt"]}
        model_cfg = OmegaConf.merge(base, user)
        info = {"vocab_size": _vocab_size(model_cfg, files), **source}
        schema.check_model(OmegaConf.to_container(model_cfg, resolve=True), info["vocab_size"],
                           layouts)
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(model_cfg))
        if out.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OmegaConf.load(path), json.loads((out / "info.json").read_text())


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
    """

    def __init__(self, cfg: Dict[str, Any], side: str, layout: Layout,
                 restore_from: Optional[str] = None):
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
        self.model = build_model(self.model_cfg, tp=layout.tp, pp=layout.pp,
                                 trainer_cfg=trainer_config(cfg, layout), seed=self.seed,
                                 restore_from=restore_from)
        self.tokenizer = TextTokenizer(self.model.tokenizer)
        self.seq_length = int(self.model_cfg.encoder_seq_length)
        self.data = build_data(cfg["data"], cfg["eval"], self.tokenizer, self.seq_length,
                               self.seed)
        self._oracle = None
        self._tb = None

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


def check_run_config(cfg: Dict[str, Any]) -> None:
    """If the run directory already holds a config different from ``cfg``, raise a ValueError
    naming the keys that differ (a rerun must be the same run to resume it)."""
    import yaml

    run_dir = Path(cfg["run_dir"])
    path = run_dir / "config.yaml"
    if path.is_file():
        old, new = _flatten(yaml.safe_load(path.read_text())), _flatten(cfg)
        diff = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and not k.startswith(VOLATILE))
        if diff:
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
