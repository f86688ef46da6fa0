"""Helpers shared by the benchmark scripts: the model they time and the phantom they time it on."""

from __future__ import annotations

import numpy as np

from napari_ctvlp.bench import benchmark_checkpoint  # noqa: F401  (the scripts import it from here)


def benchmark_phantom(size: tuple[int, int, int], *, seed: int = 0,
                      spacing: tuple[float, float, float] | None = None):
    """``(CTVolume, organ labels, description)`` of a synthetic chest-CT phantom."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=seed, size=size, spacing=spacing)
    return ph.volume, np.asarray(ph.organs, dtype=np.uint8), "phantom.make_phantom"
