"""napari sample data: File > Open Sample > napari-ctvlp > Chest-CT phantom."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from napari_ctvlp._layers import organ_labels_layer

if TYPE_CHECKING:
    from napari_ctvlp.phantom import Phantom


def phantom_layers(phantom: Phantom, *, name: str = "chest CT phantom") -> list[tuple[Any, dict, str]]:
    """CT image layer + organ Labels layer tuples for a phantom (image first)."""
    from napari_ctvlp._reader import ct_image_layer

    image = ct_image_layer(phantom.volume, name=name)
    image[1]["metadata"]["ctvlp_report"] = {"findings": phantom.findings, "impression": phantom.impression,
                                            "labels": dict(phantom.labels)}
    labels = organ_labels_layer(phantom.organs, phantom.volume, name=f"{name} organs")
    return [image, labels]


def make_phantom_sample() -> list[tuple[Any, dict, str]]:
    """A deterministic 128^3 synthetic chest CT with organ labels and a few abnormalities."""
    from napari_ctvlp.phantom import make_phantom

    return phantom_layers(make_phantom(seed=0))
