"""The one loader of trained models for the command-line tools: θ_k of a run directory's
store (guided with a φ, or the NADO decoding baseline), or any GPT / ACFT ``.nemo``, in a
world of ``tensor_model_parallel_size`` (torchrun: the world it started; else one process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

from nemo_acft.errors import InputError

#: the stores of a run directory that hold θ_k (``exchange`` is ACFT's)
STORES = ("exchange", "baseline", "filtering", "rl", "nado_decoding")


class Loaded(NamedTuple):
    """A loaded model and what it is."""

    model: Any                       # MegatronGPTACFTModel
    tokenizer: Any                   # nemo_acft.data.TextTokenizer
    label: str                       # what was loaded (store/kind/iteration, or the .nemo)
    guided: bool                     # decode from q ∝ p·R^β with the head
    run: Optional[Any] = None        # the run's Run (its config and data), for a run directory


def _layout(tp: int):
    from nemo_acft.config import Layout
    from nemo_acft.models.parallel import world_env

    world = world_env()["world_size"]
    if world % tp:
        raise InputError(f"--tensor-model-parallel-size {tp} does not divide the world size "
                         f"{world}")
    return Layout(tp, 1, world // tp)


def load_run(run_dir: str, store: str = "exchange", iteration: Optional[int] = None,
             guided: bool = False, tp: int = 1) -> Loaded:
    """θ_k of ``run_dir/<store>`` (the last iteration by default; ``exchange`` is ACFT's), with
    ACFT's φ_k when ``guided``; the ``nado_decoding`` store is always guided: the plain
    fine-tune's θ_K with its own φ_k."""
    import yaml

    from nemo_acft.algorithms.exchange import ArtifactStore
    from nemo_acft.algorithms.setup import Run

    rd = Path(run_dir)
    cfg_path = rd / "config.yaml"
    if not cfg_path.is_file():
        raise InputError(f"--run-dir {rd}: no config.yaml (not an acft-train run)")
    if store not in STORES:
        raise InputError(f"--store {store}: expected one of {STORES}")
    cfg: Dict[str, Any] = yaml.safe_load(cfg_path.read_text())
    st = ArtifactStore(rd / store)
    kind = "nado" if store == "nado_decoding" else "lm"
    its = st.iterations(kind)
    if not its:
        raise InputError(f"--run-dir {rd}: {st.root / kind} holds no iteration")
    k = its[-1] if iteration is None else int(iteration)
    if k not in its:
        raise InputError(f"--iteration {k}: not in {st.root / kind} (have {its})")
    if guided and store != "nado_decoding":
        ex = ArtifactStore(rd / "exchange")
        if not ex.exists("nado", k):
            raise InputError(f"--guided: {ex.path('nado', k)} does not exist")
    run = Run(cfg, "eval", _layout(tp))
    m = run.model
    if store == "nado_decoding":
        K = cfg["model"]["acft"]["iterations"]
        m.load_part(ArtifactStore(rd / "baseline").verify("lm", K) / "trunk", "trunk")
        m.load_part(st.verify("nado", k) / "head", "head")
        return Loaded(m, run.tokenizer, f"{store}/nado/iter_{k}", True, run)
    m.load_part(st.verify("lm", k) / "trunk", "trunk")
    if guided:
        m.load_part(ArtifactStore(rd / "exchange").verify("nado", k) / "head", "head")
    return Loaded(m, run.tokenizer, f"{store}/lm/iter_{k}", guided, run)


def load_nemo(path: str, guided: bool = False, tp: int = 1, seed: int = 1234) -> Loaded:
    """A GPT ``.nemo`` (stock ``MegatronGPTModel``'s: the head starts at zero) or an ACFT
    ``.nemo`` with the head (``guided`` decoding then uses it), restored at TP ``tp``."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from omegaconf import open_dict

    from nemo_acft.algorithms.setup import quiet_libraries
    from nemo_acft.data import TextTokenizer
    from nemo_acft.models.build import build_model

    from nemo_acft.models.nemo_file import check_nemo

    p = Path(path)
    check_nemo(p, "--nemo")
    quiet_libraries()
    cfg = MegatronGPTModel.restore_from(str(p), return_config=True)
    with open_dict(cfg):
        cfg.setdefault("acft", {}).setdefault("nado_head", {})
    lay = _layout(tp)
    model = build_model(cfg, tp=lay.tp, pp=1, seed=seed, restore_from=str(p),
                        trainer_cfg={"devices": lay.devices, "num_nodes": 1,
                                     "accelerator": "auto", "precision": cfg.get("precision", 32),
                                     "gradient_clip_val": None})
    if guided and model.acft_restored_base_only:
        raise InputError(f"--guided: {p} holds no NADO head (a plain GPT .nemo); use the "
                         "acft_with_head.nemo of a run")
    return Loaded(model, TextTokenizer(model.tokenizer), str(p), guided)
