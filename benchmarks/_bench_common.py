"""Helpers shared by the benchmark scripts: the model they time and the phantom they time it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def benchmark_checkpoint(arg: str | None, tmp: Path) -> tuple[Path, str]:
    """``(checkpoint folder, description)``: see :func:`napari_ctvlp.bench.benchmark_checkpoint`."""
    from napari_ctvlp.bench import benchmark_checkpoint as _checkpoint

    return _checkpoint(arg, tmp)


def benchmark_phantom(size: tuple[int, int, int], *, seed: int = 0,
                      spacing: tuple[float, float, float] | None = None):
    """``(CTVolume, organ labels, description)`` of a synthetic chest-CT phantom."""
    from napari_ctvlp.engine.phantom import make_phantom

    ph = make_phantom(seed=seed, size=size, spacing=spacing)
    return ph.volume, np.asarray(ph.organs, dtype=np.uint8), "engine.phantom.make_phantom"
