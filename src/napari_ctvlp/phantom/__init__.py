"""Synthetic chest-CT phantoms: test, training and sample data, never part of detection.

Modules, each importing only those listed after it:

* :mod:`.dataset`: the CT-RATE folder/CSV layout writer (:func:`write_phantom_dataset`);
* :mod:`.canvas`: the anatomy canvas and :func:`make_phantom` (body, lungs, heart, vessels, airways);
* :mod:`.lesions`: painters of the 18 CT-RATE abnormalities; :mod:`.report`: CT-RATE style reports;
* :mod:`.context`: the shared painting state (:class:`PhantomContext`), label values, tubes, airways;
* :mod:`.shapes`: geometry helpers (canvas grid, ellipsoids, tubes, smooth fields).

The package depends on :mod:`napari_ctvlp.engine` (anatomy tables, :class:`CTVolume`); the engine
never imports it.
"""

from .canvas import PREVALENCE, Phantom, default_spacing, make_phantom, phantom_affine, sample_abnormalities
from .context import LOBES, PhantomContext, is_lung
from .dataset import PhantomDatasetInfo, write_phantom_dataset

__all__ = ["LOBES", "PREVALENCE", "Phantom", "PhantomContext", "PhantomDatasetInfo", "default_spacing",
           "is_lung", "make_phantom", "phantom_affine", "sample_abnormalities", "write_phantom_dataset"]
