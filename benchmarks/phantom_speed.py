"""Time and peak memory of :func:`napari_ctvlp.phantom.make_phantom`.

Usage: ``python benchmarks/phantom_speed.py [--repeat N]``. Prints seconds for a 128^3 phantom
and for a 512x512x300 phantom at 0.7 x 0.7 x 1 mm, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES
from napari_ctvlp.phantom import make_phantom


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="128^3 repetitions (best is reported)")
    args = ap.parse_args(argv)
    everything = {n: True for n in ABNORMALITY_NAMES}
    for label, forced in (("random findings", None), ("all 18 findings", everything)):
        times = []
        for r in range(args.repeat):
            t = time.perf_counter()
            make_phantom(seed=r, size=(128, 128, 128), abnormalities=forced)
            times.append(time.perf_counter() - t)
        print(f"128^3 ({label}): best {min(times):.3f} s, mean {sum(times) / len(times):.3f} s")
    print(f"peak RSS after 128^3: {_peak_mb():.0f} MB")
    t = time.perf_counter()
    ph = make_phantom(seed=0, size=(300, 512, 512), spacing=(1.0, 0.7, 0.7), abnormalities=everything)
    print(f"512x512x300 @ 0.7x0.7x1 mm (all 18 findings): {time.perf_counter() - t:.2f} s, "
          f"shape {ph.volume.shape}, peak RSS {_peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
