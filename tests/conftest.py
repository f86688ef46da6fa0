"""Shared test fixtures: the real-data folder beside the repository, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = (REPO_ROOT.parent / "shared" / "realdata").resolve()

# Nothing may download at test time: make every Hugging Face client fail instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOTALSEG_HOME_DIR", str(REPO_ROOT / ".pytest_cache" / "totalseg_home"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The ../shared/realdata folder; tests using it skip with a reason when it is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data folder {REALDATA} is absent (it lives beside the repository in ../shared)")
    return REALDATA
