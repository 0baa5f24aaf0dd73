"""Import-time noise of the libraries, silenced before they are imported: torch's warning that
the ``pynvml`` package is deprecated (printed by every ``import torch.cuda``) and NeMo's root
logger warning that NeMo-Run is not installed (printed by ``nemo.collections.llm``, which this
package never uses). Applied by every entry point (:func:`nemo_acft.errors.entry_point`) and
by the fork server of :mod:`nemo_acft.launch` (imported first), so an error stays the last
line a command prints. A leaf module."""

from __future__ import annotations

import logging
import warnings


class _DropNeMoRunNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return "NeMo-Run is not installed" not in record.getMessage()


def apply() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
    root = logging.getLogger()
    if not any(isinstance(f, _DropNeMoRunNotice) for f in root.filters):
        root.addFilter(_DropNeMoRunNotice())


apply()
