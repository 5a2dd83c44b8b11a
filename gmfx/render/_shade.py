"""Shading of a :class:`~gmfx.render._raster.Raster`: per-vertex attributes and Lambert light from the viewer."""

from __future__ import annotations

from typing import Literal

import numpy as np

from gmfx.render._raster import Raster

__all__ = ["Shading", "face_normals", "vertex_normals", "interpolate_attributes", "shade"]

Shading = Literal["flat", "smooth"]

#: light that reaches faces turned away from the viewer; 0.35 keeps a profile view's cheek readable
AMBIENT = 0.35


def face_normals(vertices: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """``(..., F, 3)`` unit normals ``(b - a) x (c - a)`` of each triangle (NaN for degenerate ones)."""
    a, b, c = (vertices[..., tris[:, k], :] for k in range(3))
    normal = np.cross(b - a, c - a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def vertex_normals(vertices: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """``(n, V, 3)`` unit normals of each vertex: the area-weighted mean of its triangles' normals."""
    a, b, c = (vertices[:, tris[:, k], :] for k in range(3))
    weighted = np.cross(b - a, c - a)  # length = twice the area
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, (slice(None), tris[:, k]), weighted)
    with np.errstate(invalid="ignore", divide="ignore"):
        return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


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
    ``flat`` uses each triangle's normal, ``smooth`` the interpolated vertex normals. 0 where empty."""
    n = raster.triangle.shape[0]
    frame, rows, cols = np.nonzero(raster.mask)
    ids = raster.triangle[frame, rows, cols]
    if shading == "flat":
        normal_z = face_normals(vertices, tris)[frame, ids, 2]
    else:
        normals = vertex_normals(vertices, tris)
        corners = tris[ids]
        weights = raster.barycentric[frame, rows, cols]
        normal = np.einsum("pk,pkc->pc", weights, normals[frame[:, None], corners])
        with np.errstate(invalid="ignore", divide="ignore"):
            normal_z = normal[:, 2] / np.linalg.norm(normal, axis=-1)
    light = ambient + (1 - ambient) * np.abs(np.nan_to_num(normal_z, nan=1.0))
    if colors is None:
        colors = np.full((vertices.shape[1], 3), 0.8, np.float32)
    albedo = interpolate_attributes(raster, tris, np.asarray(colors, np.float32))
    out = np.zeros((n, *raster.triangle.shape[1:], 3), np.float32)
    out[frame, rows, cols] = albedo[frame, rows, cols] * light[:, None]
    return out
