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


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny CTVLP checkpoint (400 mm field of view) saved the safe way."""
    import torch

    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = CTVLP(CTVLPConfig.tiny()).eval()
    pre = PreprocessConfig.for_image_size(model.config.image_size, field_of_view_mm=(400.0,) * 3)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", preprocessing=pre.to_dict(),
                           model_card="# Tiny test model\n\nRandom weights, for tests only.\n")
