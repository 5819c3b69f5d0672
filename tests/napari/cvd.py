"""Colour-vision-deficiency simulation for the overlay tests and screenshots (plain numpy).

Machado, Oliveira and Fernandes (2009), "A physiologically-based model for simulation of color
vision deficiency", IEEE TVCG 15(6): the matrices for severity 1.0 (dichromacy), applied to
linear RGB. Distances are CIE76 Delta E in CIELAB (D65): about 2.3 is a just-noticeable
difference, and colours meant to be told apart at a glance want tens.
"""

from __future__ import annotations

import numpy as np

MACHADO_2009 = {
    "protanopia": np.array([[0.152286, 1.052583, -0.204868],
                            [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968],
                              [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779],
                            [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.308900]]),
}


def _linear(srgb: np.ndarray) -> np.ndarray:
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _srgb(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def simulate(rgb: np.ndarray, kind: str) -> np.ndarray:
    """``rgb`` (..., 3) in 0..1 sRGB as seen with ``kind`` (a key of :data:`MACHADO_2009`)."""
    rgb = np.asarray(rgb, dtype=float)
    return _srgb(_linear(rgb) @ MACHADO_2009[kind].T)


def simulate_image(rgba: np.ndarray, kind: str) -> np.ndarray:
    """A uint8 RGB(A) screenshot as seen with ``kind``; alpha kept."""
    out = np.array(rgba, copy=True)
    out[..., :3] = np.round(255 * simulate(rgba[..., :3] / 255.0, kind)).astype(np.uint8)
    return out


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..1 -> CIELAB (D65)."""
    xyz = _linear(np.asarray(rgb, dtype=float)) @ np.array([[0.4124, 0.3576, 0.1805],
                                                            [0.2126, 0.7152, 0.0722],
                                                            [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(lab(a) - lab(b)))
