"""napari-ctvlp: fine-grained 3D CT vision-language abnormality detection for napari.

The heavy parts (torch, transformers, napari) are imported lazily by the modules
that need them so that ``import napari_ctvlp`` and napari start-up stay fast.

Offline by design: importing the package sets ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``
and ``HF_HUB_DISABLE_TELEMETRY=1`` for the process (unless they are already set), before
``huggingface_hub`` / ``transformers`` are imported: even ``local_files_only`` loads otherwise
make ``huggingface_hub`` look up the network (e.g. its user-agent registry). Set
``HF_HUB_OFFLINE=0`` yourself to allow an explicit ``allow_download=True`` load.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

__all__ = ["__version__"]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _go_offline() -> None:
    """Default the Hugging Face clients to offline mode for the whole process."""
    for key, value in _OFFLINE_ENV.items():
        _os.environ.setdefault(key, value)
    constants = _sys.modules.get("huggingface_hub.constants")
    if constants is not None and _os.environ.get("HF_HUB_OFFLINE") == "1":
        # imported before us: its constants were read from the environment already
        for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
            if hasattr(constants, name):
                setattr(constants, name, True)


_go_offline()
