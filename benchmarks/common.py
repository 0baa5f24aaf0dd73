"""What every benchmark script shares: its figures as a flat JSON dict and a PNG next to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict

from nemo_acft.io_utils import atomic_write


def write_results(json_path: str, figures: Dict[str, Any], plot: Callable[[Any, Path], None],
                  plot_data: Any) -> None:
    """``figures`` to ``json_path`` and ``plot(plot_data, <json_path>.png)``, both written to a
    temporary name and renamed."""
    path = Path(json_path)
    with atomic_write(path) as fh:
        json.dump(figures, fh, indent=1)
    plot(plot_data, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
