"""Shading of a :class:`~gmfx.render._raster.Raster`: per-vertex attributes and Lambert light from the viewer."""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np

from gmfx.render._raster import Raster

__all__ = ["Shading", "interpolate_attributes", "shade"]

Shading = Literal["flat", "smooth"]

#: light that reaches faces turned away from the viewer; 0.35 keeps a profile view's cheek readable
AMBIENT = 0.35


def interpolate_attributes(raster: Raster, tris: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """``(n, H, W, C)`` per-pixel values of per-vertex ``attributes`` (``(V, C)`` or ``(n, V, C)``); 0 where empty."""
    n, height, width = raster.triangle.shape
    frame, rows, cols = np.nonzero(raster.mask)
    corners = tris[raster.triangle[frame, rows, cols]]  # (P, 3)
    weights = raster.barycentric[frame, rows, cols]  # (P, 3)
    if attributes.ndim == 2:
        values = np.einsum("pk,pkc->pc", weights, attributes[corners])
    else:
        values = np.einsum("pk,pkc->pc", weights, attributes[frame[:, None], corners])
    out = np.zeros((n, height, width, attributes.shape[-1]), np.float32)
    out[frame, rows, cols] = values
    return out


def _shade_into(triangle, barycentric, tris, vertices, colors, flat, ambient, out):  # pragma: no cover - numba
    height, width = triangle.shape
    normals = np.zeros((tris.shape[0], 3), np.float32)  # per triangle, length = twice its area
    for f in range(tris.shape[0]):
        a, b, c = vertices[tris[f, 0]], vertices[tris[f, 1]], vertices[tris[f, 2]]
        u0, u1, u2 = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        w0, w1, w2 = c[0] - a[0], c[1] - a[1], c[2] - a[2]
        normals[f, 0] = u1 * w2 - u2 * w1
        normals[f, 1] = u2 * w0 - u0 * w2
        normals[f, 2] = u0 * w1 - u1 * w0
    at_vertex = np.zeros((vertices.shape[0], 3), np.float32)
    if not flat:
        for f in range(tris.shape[0]):
            if np.isfinite(normals[f, 0] + normals[f, 1] + normals[f, 2]):
                for k in range(3):
                    at_vertex[tris[f, k]] += normals[f]
    for i in range(height):
        for j in range(width):
            f = triangle[i, j]
            if f < 0:
                continue
            if flat:
                n = normals[f]
            else:
                n = (
                    barycentric[i, j, 0] * at_vertex[tris[f, 0]]
                    + barycentric[i, j, 1] * at_vertex[tris[f, 1]]
                    + barycentric[i, j, 2] * at_vertex[tris[f, 2]]
                )
            length = np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
            light = ambient + (1 - ambient) * (abs(n[2]) / length if length > 0 else 1.0)
            for channel in range(3):
                albedo = (
                    barycentric[i, j, 0] * colors[tris[f, 0], channel]
                    + barycentric[i, j, 1] * colors[tris[f, 1], channel]
                    + barycentric[i, j, 2] * colors[tris[f, 2], channel]
                )
                out[i, j, channel] = albedo * light


try:  # cached next to this file, or in the user's cache folder
    _shade_into = numba.njit(cache=True, nogil=True, error_model="numpy")(_shade_into)
except RuntimeError:  # pragma: no cover - no writable cache location: compile once per process
    _shade_into = numba.njit(nogil=True, error_model="numpy")(_shade_into)


def shade(
    raster: Raster,
    vertices: np.ndarray,
    tris: np.ndarray,
    *,
    colors: np.ndarray | None = None,
    shading: Shading = "smooth",
    ambient: float = AMBIENT,
) -> np.ndarray:
    """``(n, H, W, 3)`` float32 RGB in [0, 1]: ``colors`` (per vertex, ``(V, 3)`` or ``(n, V, 3)``, default
    light grey) lit by a light at the viewer (two-sided Lambert, ``ambient`` + (1 - ambient) |n_z|);
    ``flat`` uses each triangle's normal, ``smooth`` the barycentric mix of the vertex normals (the
    area-weighted mean of their triangles' normals). 0 where empty. One numba pass per frame."""
    n = raster.triangle.shape[0]
    vertices = np.asarray(vertices, np.float32)
    tris = np.ascontiguousarray(tris, np.int32)
    if colors is None:
        colors = np.full((vertices.shape[1], 3), 0.8, np.float32)
    colors = np.asarray(colors, np.float32)
    out = np.zeros((n, *raster.triangle.shape[1:], 3), np.float32)
    for k in range(n):
        frame_colors = colors if colors.ndim == 2 else colors[k]
        _shade_into(raster.triangle[k], raster.barycentric[k], tris, vertices[k], frame_colors, shading == "flat", float(ambient), out[k])
    return out
