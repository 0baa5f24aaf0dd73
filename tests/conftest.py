import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (ACFT_DATA_DIR, default ../shared/data beside the checkout)."""
    path = Path(os.environ.get("ACFT_DATA_DIR",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (path / "davidson_hate_offensive").is_dir():
        pytest.skip(f"real data not found at {path} (set ACFT_DATA_DIR)")
    return path
