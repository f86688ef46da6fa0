"""Helpers shared by the benchmark scripts: the model they time and the phantom they time it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def benchmark_checkpoint(arg: str | None, tmp: Path) -> tuple[Path, str]:
    """``(checkpoint folder, description)``: the given one, the shipped demo model, or a random one.

    Timings do not depend on the weights, so without a demo model a freshly initialised
    ``CTVLPConfig.phantom_cpu()`` (same architecture) is saved to ``tmp`` and the printout says so.
    """
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path, save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    if arg:
        return Path(arg), f"given: {arg}"
    found = default_checkpoint_path()
    if found is not None:
        return found, f"shipped demo model {found}"
    cfg = CTVLPConfig.phantom_cpu()
    path = save_checkpoint(CTVLP(cfg).eval(), tmp / "phantom_cpu_random",
                           preprocessing=PreprocessConfig.for_image_size(cfg.image_size).to_dict())
    return path, "freshly initialised CTVLPConfig.phantom_cpu() (random weights; no demo model installed)"


def benchmark_phantom(size: tuple[int, int, int], *, seed: int = 0,
                      spacing: tuple[float, float, float] | None = None):
    """``(CTVolume, organ labels, description)`` of a synthetic chest-CT phantom."""
    from napari_ctvlp.engine.phantom import make_phantom

    ph = make_phantom(seed=seed, size=size, spacing=spacing)
    return ph.volume, np.asarray(ph.organs, dtype=np.uint8), "engine.phantom.make_phantom"
