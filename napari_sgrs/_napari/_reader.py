"""npe2 reader: the engine's formats (NIfTI, NRRD, MetaImage, HDF5, DICOM folders) with geometry."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader for ``path`` if the engine can read it, else None (never raises)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        from napari_sgrs.core.io import is_supported

        if not paths or not all(is_supported(p) for p in paths):
            return None
    except Exception:  # noqa: BLE001 - a reader must answer None, not raise, for what it cannot read
        return None
    return read_volumes


def read_volumes(path: str | list[str]) -> list[tuple]:
    """Read each volume; a file the engine rejects gives its one-line error as a notification.

    NaN voxels (no data, e.g. outside the field of view after resampling) are shown, as napari
    shows NaN; the contrast limits come from the other voxels.
    """
    from napari.utils.notifications import show_error

    from napari_sgrs.core.errors import SGRSError
    from napari_sgrs.core.io import read_volume

    from ._layers import layer_data_from_volume

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        try:
            data, kwargs, kind = layer_data_from_volume(read_volume(p, nan="keep"))
        except SGRSError as exc:
            show_error(str(exc))
            continue
        if kind == "image" and np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
            low, high = float(np.nanmin(data)), float(np.nanmax(data))
            kwargs["contrast_limits"] = [low, high if high > low else low + 1.0]
        layers.append((data, kwargs, kind))
    # napari's "empty file" sentinel: nothing to add, and no second "no reader" error.
    return layers or [(None,)]
