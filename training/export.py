"""Export a training checkpoint for shipping: float16 safetensors, the same config, a model card.

Usage::

    python -m training.export --checkpoint runs/phantom/final --out src/napari_ctvlp/models/ctvlp_phantom_demo \\
        [--dtype float16] [--model-card CARD.md] [--overwrite]

The training record (parameters, data, steps, supervision) is kept; the weights are rounded to
``--dtype`` and loaded back as float32. Only safetensors and JSON are read and written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float16",
                      model_card: str | None = None, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` again at ``out`` with its weights stored as ``dtype``.

    Args:
        checkpoint: a checkpoint directory (``model.safetensors`` + ``config.json``).
        out: the new checkpoint directory.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        model_card: Markdown for ``MODEL_CARD.md`` (default: the source checkpoint's card).
        overwrite: replace an existing checkpoint at ``out``.

    Returns:
        ``out``.
    """
    from napari_ctvlp.engine.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(checkpoint)
    if Path(out).resolve() == loaded.path.resolve():
        raise ValueError("--out must differ from --checkpoint")
    return save_checkpoint(loaded.model, out, preprocessing=loaded.preprocessing,
                           training=loaded.meta.get("training"), model_card=model_card or loaded.model_card,
                           overwrite=overwrite, weights_dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--model-card", default=None, help="Markdown file for MODEL_CARD.md")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        card = Path(args.model_card).read_text(encoding="utf-8") if args.model_card else None
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, model_card=card, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
