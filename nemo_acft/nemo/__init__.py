"""NeMo integration: ``MegatronGPTACFTModel``, a subclass of NeMo's ``MegatronGPTModel``.

A thin adapter: the model is :class:`nemo_acft.models.GPTNADOModel` and the loss is
:func:`nemo_acft.nado.kl_penalty` over its per-token outputs; nothing in the math or the model
depends on NeMo. Importing this package checks that the installed nemo-toolkit and
megatron-core are the pinned ones (NeMo 1's ``MegatronGPTModel`` is gone after 2.5.0) and, on a
CPU-only torch, applies :func:`nemo_acft.cpu_compat.apply_nemo`.
"""

from __future__ import annotations

from importlib import metadata

REQUIRED = {"nemo-toolkit": "2.5.0", "megatron-core": "0.13.1"}


def check_versions() -> None:
    """Raise an ImportError naming the required and installed versions when they differ."""
    found = {}
    for dist in REQUIRED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    wrong = {d: v for d, v in found.items() if v != REQUIRED[d]}
    if wrong:
        raise ImportError(
            "nemo_acft.nemo needs " + ", ".join(f"{d}=={v}" for d, v in REQUIRED.items())
            + "; installed: " + ", ".join(f"{d} {v or 'missing'}" for d, v in found.items())
            + ". Install with: pip install 'nemo-acft[nemo]' (and the constraint file "
            "constraints/cpu.txt on CPU)")


check_versions()

from nemo_acft.cpu_compat import apply_nemo  # noqa: E402

apply_nemo()

from nemo_acft.nemo.model import MegatronGPTACFTModel  # noqa: E402

__all__ = ["MegatronGPTACFTModel", "check_versions", "REQUIRED"]
