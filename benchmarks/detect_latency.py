"""Latency and memory of ``detect`` on a full-size CT: 512x512x300 at 0.7x0.7x1 mm.

Prints: read time, end-to-end detect time from the NIfTI path (the phantom's organ mask supplied
as segmentation; cold = first call incl. model loading, warm = model cached), the re-prompt time
(text encoder only) and the prompt-heatmap time, peak RSS, and end-to-end / read.
Targets on 2 CPU cores: re-prompt < 0.3 s, end-to-end < 30 s, peak RSS < 6 GB.

The same measurement as ``napari-ctvlp bench`` (:mod:`napari_ctvlp.bench`), which also times a
user's own CT with ``--ct``.

Usage: ``python benchmarks/detect_latency.py [--size 300 512 512] [--checkpoint DIR] [--device cpu]``
"""

from __future__ import annotations

import sys

from napari_ctvlp.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
