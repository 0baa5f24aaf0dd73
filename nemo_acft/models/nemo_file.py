"""What a ``.nemo`` must hold before NeMo is asked to restore it, checked by listing the tar
(nothing extracted, NeMo not imported): a config (``model_config.yaml``) and weights (a
``model_weights/`` distributed checkpoint with ``metadata.json`` and ``common.pt``, or a
``model_weights.ckpt``). A file that is not a tar, is truncated, or lacks either is an
:class:`~nemo_acft.errors.InputError` naming it, before anything is written.

Trust: a ``.nemo`` is code as well as data. NeMo and megatron-core unpickle its
``common.pt`` (and ``model_weights.ckpt``) when restoring it, so only restore ``.nemo`` files
from a source you trust; this check does not make an untrusted one safe.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import List

from nemo_acft.errors import InputError


def nemo_members(path, what: str = ".nemo") -> List[str]:
    """The member names of the ``.nemo`` tar (``./`` stripped); InputError when it is not a
    readable tar."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}={p}: no such file; expected a .nemo (NeMo's tar archive)")
    try:
        with tarfile.open(p, "r:*") as tar:
            return [m.name[2:] if m.name.startswith("./") else m.name for m in tar.getmembers()]
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        if "could not be opened successfully" in reason:  # tarfile tried every compression
            reason = "not a tar archive (nor a gzip, bzip2 or xz one)"
        raise InputError(f"{what}={p}: not a readable .nemo (a tar archive): {reason} "
                         "(truncated or not a .nemo?)") from None


def check_nemo(path, what: str = "model.restore_from_path") -> None:
    """``path`` is a tar with a model config and weights (see the module docstring)."""
    names = set(nemo_members(path, what))
    if "model_config.yaml" not in names:
        raise InputError(f"{what}={path}: the .nemo has no model_config.yaml (members: "
                         f"{sorted(names)[:6]})")
    dist = {"model_weights/metadata.json", "model_weights/common.pt"}
    if not (dist <= names or "model_weights.ckpt" in names):
        raise InputError(f"{what}={path}: the .nemo holds no weights (expected "
                         "model_weights/ with metadata.json and common.pt, or "
                         "model_weights.ckpt)")


__all__ = ["check_nemo", "nemo_members"]
