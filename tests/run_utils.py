"""acft-train runs for the tests: the config composed by Hydra from ``conf/`` exactly as the
command line composes it, and the phases driven from the test process (their worlds are forked
from it, so a run pays no import); plus the command line itself in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]

#: the built-in default shrunk to seconds (tiny model, few steps, few prompts)
FAST = [
    "model.acft.iterations=2", "model.acft.steps_per_iteration=12", "model.acft.save_every=4",
    "model.global_batch_size=16", "model.micro_batch_size=16", "pretrain.steps=30",
    "pretrain.global_batch_size=16", "model.acft.oracle_block.steps=10",
    "model.acft.oracle_block.prompts=64", "model.acft.oracle_block.global_batch_size=32",
    "model.acft.oracle_block.micro_batch_size=32", "model.acft.sampling.max_new_tokens=12",
    "model.acft.sampling.batch_size=64", "eval.prompts=32", "eval.samples_per_prompt=1",
    "eval.ppl_records=64", "data.builtin.pretrain_records=600",
    "data.builtin.train_records=300", "data.builtin.heldout_records=100",
    "pretrain.model.hidden_size=32", "pretrain.model.ffn_hidden_size=128", "progress=false",
    "model.acft.calibration.prompts=8", "model.acft.calibration.samples_per_prompt=4",
    "model.acft.diagnostics.probe_prompts=16",
]


def compose(run_dir, cache, *overrides: str, config: str = "tiny_cpu") -> Dict:
    """The resolved, checked config of ``acft-train run_dir=... cache_dir=... <FAST> <overrides>``
    (the entry point's own composition)."""
    from nemo_acft.train import compose as train_compose

    return train_compose([f"run_dir={run_dir}", f"cache_dir={cache}", *FAST, *overrides],
                         config)


def drive(cfg: Dict) -> None:
    """``role=all`` of ``cfg`` from this process (its worlds forked from it)."""
    from nemo_acft.algorithms.setup import quiet_libraries
    from nemo_acft.train import drive as _drive

    quiet_libraries()
    _drive(cfg)


def cli(run_dir, cache, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``acft-train`` itself, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}",
                           f"cache_dir={cache}", *FAST, *overrides], capture_output=True,
                          text=True, timeout=timeout)




def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run directory under another path, its configs pointed at the new
    place (``run_dir``, the log folder and the model's tokenizer path name the directory)."""
    import shutil

    shutil.copytree(src, dst)
    for name in ("config.yaml", "model/config.yaml"):
        p = Path(dst) / name
        p.write_text(p.read_text().replace(str(src), str(dst)))
    return Path(dst)


#: the console script, as a user types it (pip install -e . puts it beside the interpreter)
ACFT_CONVERT = str(Path(sys.executable).with_name("acft-convert"))


def convert(*args) -> subprocess.CompletedProcess:
    """``acft-convert`` itself, in a subprocess."""
    return subprocess.run([ACFT_CONVERT, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
