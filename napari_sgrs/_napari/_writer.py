"""npe2 writer: a Labels layer to NIfTI / NRRD / MetaImage with the geometry of its source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WRITABLE = (".nii.gz", ".nii", ".nrrd", ".mha")


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Write ``data`` at ``path`` (``.nii.gz`` appended if no known suffix); returns the written path."""
    from napari_sgrs.core.io import write_volume

    from ._layers import geometry_of

    array = np.asarray(data)
    if not str(path).lower().endswith(WRITABLE):
        path = f"{path}.nii.gz"
    if array.dtype not in (np.uint8, np.uint16, np.int16, np.int32) or array.dtype == np.int64:
        array = array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
    written = write_volume(Path(path), array, geometry_of(attributes, ndim=array.ndim))
    return [str(written)]
