"""Pure numpy/torch/MONAI engine: no Qt, no napari imports anywhere below this package."""
