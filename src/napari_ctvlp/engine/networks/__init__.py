"""Networks of the CT vision-language model (CA-GCL anatomy pooling + MOSMOS tag decoder).

``CTVLPConfig`` is importable without torch; the torch modules are imported lazily::

    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    model = CTVLP(CTVLPConfig.tiny())
"""

from __future__ import annotations

import importlib
from typing import Any

from napari_ctvlp.engine.networks.config import DEFAULT_TAGS, CTVLPConfig

_LAZY = {
    "CTVLP": "ctvlp",
    "AnatomyEmbeddings": "anatomy_pooling",
    "AnatomyPooling": "anatomy_pooling",
    "TagOutput": "tag_decoder",
    "TagDecoder": "tag_decoder",
    "TextEncoder": "text_encoder",
    "resolve_text_encoder": "text_encoder",
    "ViT3D": "vit3d",
}

__all__ = ["CTVLPConfig", "DEFAULT_TAGS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
