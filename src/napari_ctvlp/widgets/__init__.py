"""napari dock widgets of napari-ctvlp.

* :class:`~napari_ctvlp.widgets.detect_widget.DetectWidget` -- "CT abnormality detection"
  (npe2 command ``napari-ctvlp.detect_abnormalities``), with the results table
  (:mod:`.results_table`), the free-text prompt panel (:mod:`.prompt_panel`) and the export
  panel (:mod:`.export_panel`) as sub-widgets; engine calls run in thread workers (:mod:`._worker`).

Nothing here is imported when napari starts: the widget module is loaded when the user opens it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_ctvlp.widgets.detect_widget import DetectWidget

__all__ = ["DetectWidget"]


def __getattr__(name: str) -> Any:
    if name == "DetectWidget":
        from napari_ctvlp.widgets.detect_widget import DetectWidget

        return DetectWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
