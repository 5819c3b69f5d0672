"""napari-sgrs: semi-supervised 3D segmentation for napari (SGRS-Net and SGRS+), with a headless engine.

The engine lives in :mod:`napari_sgrs.core` and imports neither Qt nor napari; the CLI
(:mod:`napari_sgrs.cli`) and the napari widgets (:mod:`napari_sgrs._napari`) are thin
layers over it.
"""

__version__ = "0.1.0"
