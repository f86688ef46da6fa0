"""napari-ctvlp: fine-grained 3D CT vision-language abnormality detection for napari.

The heavy parts (torch, transformers, napari) are imported lazily by the modules
that need them so that ``import napari_ctvlp`` and napari start-up stay fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
