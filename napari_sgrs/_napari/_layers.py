"""Between engine volumes and napari layers: the geometry's full affine, geometry kept in metadata.

A layer's world coordinates are the scanner's (LPS mm, listed in array axis order): ``scale`` is
the spacing and ``translate`` the origin, as for an axis-aligned volume, and a rotated or sheared
direction goes into ``affine`` as a turn about the origin (see :func:`layer_transform`), so code
that reads ``layer.scale``/``translate`` still finds the spacing and origin, and
``layer.data_to_world`` gives :meth:`Geometry.affine` of the index.

A layer made here carries ``metadata["sgrs"] = {"geometry": {...}, "source": path, "format": ...,
"case": name, "role": "image" | "label" | "pseudo" | "regions"}`` so the writer, the panel and
the export can hand the source geometry back to the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_sgrs.core.codes import Region
from napari_sgrs.project.folder import case_name, geometry_from_dict, geometry_to_dict

META_KEY = "sgrs"
LABEL_SUFFIX = " label"
PSEUDO_SUFFIX = " pseudo label"
REGIONS_SUFFIX = " regions"
RELIABILITY_SUFFIX = " reliability"


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


def layer_transform(geometry: Any) -> dict:
    """napari's ``scale``, ``translate`` (and ``affine`` when the axes are turned) for ``geometry``.

    napari maps data to world as ``affine @ (scale * index + translate)``. With scale = spacing
    and translate = origin, ``affine`` = the direction matrix turning about the origin,
    ``[[R, o - R o], [0, 1]]``, makes that ``R S index + o`` = :meth:`Geometry.affine`. An
    axis-aligned volume gets no ``affine`` (napari's identity), as before.
    """
    out = {"scale": tuple(float(s) for s in geometry.spacing),
           "translate": tuple(float(o) for o in geometry.origin)}
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    if not np.allclose(direction, np.eye(3), atol=1e-9):
        origin = np.asarray(geometry.origin, dtype=float)
        turn = np.eye(4)
        turn[:3, :3] = direction
        turn[:3, 3] = origin - direction @ origin
        out["affine"] = turn
    return out


def layer_data_from_volume(volume: Any, role: str | None = None, name: str | None = None) -> tuple:
    """A napari LayerDataTuple for an engine :class:`Volume` (image or labels by ``role``)."""
    array = np.asarray(volume.array)
    path = getattr(volume, "path", None)
    case = case_name(Path(str(path)).name if path else (name or "volume"))
    if role is None:
        role = "label" if looks_like_label(path, array) else "image"
    kwargs = {"name": name or (case + LABEL_SUFFIX if role == "label" else case),
              **layer_transform(volume.geometry),
              "metadata": sgrs_meta(volume.geometry, case, role, path, getattr(volume, "format", None))}
    if role == "image":
        return array, kwargs, "image"
    if role == "reliability":  # 0-1: dark where the label is likely wrong
        kwargs.update(colormap="viridis", contrast_limits=(0.0, 1.0), opacity=0.6, blending="translucent")
        return array.astype(np.float32), kwargs, "image"
    if role == "regions":
        kwargs.update(colormap=regions_colormap(), opacity=REGIONS_OPACITY, blending="translucent")
    elif role in ("label", "pseudo"):
        # a pseudo label is drawn as an outline, fully opaque: the caller sets ``contour`` (napari
        # takes it after construction only)
        kwargs.update(colormap=labels_colormap(), opacity=1.0 if role == "pseudo" else LABEL_OPACITY)
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.uint8)
    return array, kwargs, "labels"


#: A label is drawn filled; the image shows through it.
LABEL_OPACITY = 0.7
#: The regions layer lies over the image in 2D: faint enough to read the image through it.
REGIONS_OPACITY = 0.35
#: Label classes 1, 2, ... of a label or pseudo label: Okabe-Ito colours away from the three region
#: colours, yellow first (the binary case): of the Okabe-Ito set it stays furthest from purple, green
#: and vermillion under protan, deutan and tritan simulation (tests/napari/test_overlay.py).
LABEL_COLOURS = ("#F0E442", "#56B4E9", "#0072B2", "#E69F00", "#999999")
#: A pseudo label is drawn as its outline (pixels) in 2D, so the regions and the image under it
#: stay visible; napari fills it in 3D, where an outline has no meaning.
PSEUDO_CONTOUR = 1


def labels_colormap():
    """Label classes in :data:`LABEL_COLOURS` (cycled past the fifth class); 0 is transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {i: LABEL_COLOURS[(i - 1) % len(LABEL_COLOURS)] for i in range(1, 256)}
    colors[0] = "transparent"
    colors[None] = LABEL_COLOURS[0]
    return DirectLabelColormap(color_dict=colors)


def regions_colormap(ndisplay: int = 2):
    """Fixed Okabe-Ito colours for synergy regions; 0 (none) is transparent.

    In 2D consistent voxels (most of the body) are drawn faintly, so the image and the regions
    to review stay visible. In 3D napari draws the first non-transparent voxel along each ray, so
    a consistent region there would be one green block hiding everything: it is left out, and
    the 3D view shows the surfaces of what to review (inconsistent, disregarded) only.
    """
    from napari.utils.colormaps import DirectLabelColormap

    colors = {int(region): region.colour for region in Region}
    colors[None] = "transparent"  # values outside the codes
    colors[int(Region.CONSISTENT)] = Region.CONSISTENT.colour + "40" if ndisplay == 2 else "transparent"
    return DirectLabelColormap(color_dict=colors)


def regions_for_display(regions: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The regions layer's data: "consistent" only inside the predicted foreground, so the
    background the model is sure of is not tinted. Display only: the region map on disk (and the
    review ranking, which counts inconsistent and disregarded voxels) keeps every code."""
    shown = np.array(regions, copy=True)
    shown[(shown == Region.CONSISTENT) & (np.asarray(prediction) == 0)] = Region.NONE
    return shown


def layer_meta(layer_or_meta: Any) -> dict:
    meta = layer_or_meta.metadata if hasattr(layer_or_meta, "metadata") else (layer_or_meta or {})
    return dict(meta.get(META_KEY) or {})


def geometry_of(layer_or_attributes: Any, ndim: int = 3) -> Any:
    """The geometry a layer came from; without one, built from its data-to-world transform
    (scale, translate, rotate, shear and affine: a layer made or turned in napari)."""
    meta = layer_meta(layer_or_attributes if hasattr(layer_or_attributes, "metadata")
                      else (layer_or_attributes or {}).get("metadata", {}))
    if meta.get("geometry"):
        return geometry_from_dict(meta["geometry"], ndim)
    matrix = data_to_world_matrix(layer_or_attributes, ndim)
    linear = matrix[:ndim, :ndim]
    spacing = np.linalg.norm(linear, axis=0)  # a flip (negative scale) is a direction, not a spacing
    return geometry_from_dict({"spacing": spacing.tolist(), "origin": matrix[:ndim, ndim].tolist(),
                               "direction": (linear / spacing).ravel().tolist()}, ndim)


def data_to_world_matrix(layer_or_attributes: Any, ndim: int = 3) -> np.ndarray:
    """The ``(ndim + 1)``-square matrix napari maps a layer's last ``ndim`` data axes to world with:
    ``affine @ (rotate @ shear @ scale, translate)``, from a layer or its attributes dict (what
    an npe2 writer receives); missing entries are napari's defaults."""
    from napari.utils.transforms import Affine

    get = (lambda key: getattr(layer_or_attributes, key, None)) if hasattr(layer_or_attributes, "metadata") \
        else (lambda key: (layer_or_attributes or {}).get(key))
    affine = get("affine")
    if isinstance(affine, Affine):
        affine = affine.affine_matrix
    physical = Affine(scale=get("scale"), translate=get("translate"), rotate=get("rotate"),
                      shear=get("shear"), ndim=len(get("scale")) if get("scale") is not None else ndim)
    world = Affine(affine_matrix=np.asarray(affine, dtype=float)) if affine is not None \
        else Affine(ndim=physical.ndim)
    full = (world.compose(physical)).affine_matrix
    if full.shape[0] - 1 > ndim:  # a layer with more axes (time, channel): its last ndim are the volume's
        keep = list(range(full.shape[0] - 1 - ndim, full.shape[0]))
        full = full[np.ix_(keep, keep)]
    return full


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
