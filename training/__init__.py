"""Training package for napari-ctvlp (CA-GCL pre-training, MOSMOS-style fine-tuning, evaluation).

Not part of the wheel: run from the repository root (``python -m training.<module>``). It imports
:mod:`napari_ctvlp.engine` for the anatomy table, the preprocessing and the networks.
"""
