"""Between engine volumes and napari layers: scale/translate from geometry, geometry kept in metadata.

A layer made here carries ``metadata["sgrs"] = {"geometry": {...}, "source": path, "format": ...,
"case": name, "role": "image" | "label" | "pseudo" | "regions"}`` so the writer, the panel and
the export can hand the source geometry back to the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_sgrs.core.codes import Region
from napari_sgrs.core.project import case_name, geometry_from_dict, geometry_to_dict

META_KEY = "sgrs"
LABEL_SUFFIX = " label"
PSEUDO_SUFFIX = " pseudo label"
REGIONS_SUFFIX = " regions"


def looks_like_label(path: str | Path | None, array: np.ndarray) -> bool:
    """A label file lives under a ``labels*`` folder, or is integer-typed with few distinct values."""
    if path is not None and any(part.lower().startswith("labels") for part in Path(path).parts[:-1]):
        return True
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        return False
    sample = array if array.size <= 8_000_000 else array[::4, ::4, ::4]
    return np.unique(sample).size <= 16


def sgrs_meta(geometry: Any, case: str, role: str, source: str | None = None, fmt: str | None = None) -> dict:
    return {META_KEY: {"geometry": geometry_to_dict(geometry), "case": case, "role": role,
                       "source": None if source is None else str(source), "format": fmt}}


def layer_data_from_volume(volume: Any, role: str | None = None, name: str | None = None) -> tuple:
    """A napari LayerDataTuple for an engine :class:`Volume` (image or labels by ``role``)."""
    array = np.asarray(volume.array)
    path = getattr(volume, "path", None)
    case = case_name(Path(str(path)).name if path else (name or "volume"))
    if role is None:
        role = "label" if looks_like_label(path, array) else "image"
    kwargs = {"name": name or (case + LABEL_SUFFIX if role == "label" else case),
              "scale": tuple(float(s) for s in volume.geometry.spacing),
              "translate": tuple(float(o) for o in volume.geometry.origin),
              "metadata": sgrs_meta(volume.geometry, case, role, path, getattr(volume, "format", None))}
    if role == "image":
        return array, kwargs, "image"
    if role == "regions":
        kwargs.update(colormap=regions_colormap(), opacity=0.35, blending="translucent")
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.uint8)
    return array, kwargs, "labels"


def regions_colormap():
    """Fixed Okabe-Ito colours for synergy regions; 0 (none) is transparent, and consistent voxels
    (most of a volume) are drawn faintly so the image and the regions to review stay visible."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {int(region): region.colour for region in Region}
    colors[None] = "transparent"  # values outside the codes
    colors[int(Region.CONSISTENT)] = Region.CONSISTENT.colour + "40"  # 25 % alpha
    return DirectLabelColormap(color_dict=colors)


def layer_meta(layer_or_meta: Any) -> dict:
    meta = layer_or_meta.metadata if hasattr(layer_or_meta, "metadata") else (layer_or_meta or {})
    return dict(meta.get(META_KEY) or {})


def geometry_of(layer_or_attributes: Any, ndim: int = 3) -> Any:
    """The geometry a layer came from; without one, built from its scale and translate."""
    meta = layer_meta(layer_or_attributes if hasattr(layer_or_attributes, "metadata")
                      else (layer_or_attributes or {}).get("metadata", {}))
    if meta.get("geometry"):
        return geometry_from_dict(meta["geometry"], ndim)
    if hasattr(layer_or_attributes, "scale"):
        scale, translate = layer_or_attributes.scale, layer_or_attributes.translate
    else:
        scale = (layer_or_attributes or {}).get("scale", [1.0] * ndim)
        translate = (layer_or_attributes or {}).get("translate", [0.0] * ndim)
    return geometry_from_dict({"spacing": list(scale)[-ndim:], "origin": list(translate)[-ndim:]}, ndim)


def case_of(layer: Any) -> str:
    """The case a layer belongs to: its metadata, else its name without the role suffix."""
    meta = layer_meta(layer)
    if meta.get("case"):
        return str(meta["case"])
    name = str(layer.name)
    for suffix in (PSEUDO_SUFFIX, REGIONS_SUFFIX, LABEL_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return case_name(name)
