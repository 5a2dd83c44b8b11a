"""Rasterizers: triangles in pixel coordinates -> per-pixel triangle id, barycentrics and depth.

Camera convention, shared by every implementation: vertices are ``(x, y, z)`` with ``x`` and ``y`` in
pixels of the output image (x right, y down, the centre of pixel ``(row i, column j)`` at
``(j + 0.5, i + 0.5)``) and ``z`` a depth that grows away from the viewer (MediaPipe's convention;
an orthographic camera looking along +z). A pixel belongs to a triangle when its centre lies inside or
on an edge; the smallest ``z`` wins, and on equal depth the triangle listed first. A triangle is *front
facing* when its corners run counter-clockwise as seen on the screen, i.e. ``(b - a) x (c - a) < 0`` in
pixel coordinates (y down): the order of 98% of MediaPipe's triangles on a frontal face. Triangles with a NaN corner are skipped (frames
without a face are rows of NaN).

Two implementations of one interface (:class:`Rasterizer`): :class:`CpuRasterizer` (a numba z-buffer,
one pass over the triangles' bounding boxes) and :class:`NvdiffrastRasterizer` (CUDA, optional
``diffrp-nvdiffrast``). Neither is differentiable; :func:`interpolate` recomputes the barycentrics in
torch from the rasterized triangle ids, so gradients reach vertex positions and attributes (nvdiffrast's
"rasterize without gradients, interpolate with them" split, without antialiasing or silhouette
gradients: what a photometric term with a hard mask needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numba
import numpy as np

from gmfx._errors import ParameterError

if TYPE_CHECKING:
    import torch

__all__ = ["Cull", "Raster", "Rasterizer", "CpuRasterizer", "NvdiffrastRasterizer", "get_rasterizer", "interpolate"]

Cull = Literal["none", "back"]


@dataclass(frozen=True)
class Raster:
    """What a rasterizer found for each pixel of ``n`` images.

    Attributes
    ----------
    triangle
        ``(n, H, W)`` int32: index of the visible triangle, -1 where no triangle covers the pixel.
    barycentric
        ``(n, H, W, 3)`` float32: weights of the triangle's three corners at the pixel centre (zeros
        where empty); any per-vertex attribute interpolates as ``sum_k w_k * a[tris[t, k]]``.
    depth
        ``(n, H, W)`` float32: ``z`` at the pixel centre, ``inf`` where empty.
    """

    triangle: np.ndarray
    barycentric: np.ndarray
    depth: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """``(n, H, W)`` bool: pixels covered by a triangle."""
        return self.triangle >= 0


class Rasterizer(Protocol):
    """Rasterizes a batch of meshes sharing one topology into images of one size."""

    name: str

    def rasterize(
        self, vertices: np.ndarray, tris: np.ndarray, *, width: int, height: int, cull: Cull = "none"
    ) -> Raster:
        """``vertices`` ``(n, V, 3)`` in pixels (see the module's conventions), ``tris`` ``(F, 3)``."""
        ...


def _rasterize_into(xyz, tris, back, triangle, barycentric, depth):  # pragma: no cover - compiled by numba
    height, width = depth.shape
    for f in range(tris.shape[0]):
        a, b, c = tris[f, 0], tris[f, 1], tris[f, 2]
        x0, y0, z0 = xyz[a, 0], xyz[a, 1], xyz[a, 2]
        x1, y1, z1 = xyz[b, 0], xyz[b, 1], xyz[b, 2]
        x2, y2, z2 = xyz[c, 0], xyz[c, 1], xyz[c, 2]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # < 0: front facing
        if not np.isfinite(area + z0 + z1 + z2) or area == 0.0 or (back and area > 0.0):
            continue
        # pixel centres j + 0.5 inside [min x, max x]
        j0 = max(0, int(np.ceil(min(x0, x1, x2) - 0.5)))
        j1 = min(width - 1, int(np.floor(max(x0, x1, x2) - 0.5)))
        i0 = max(0, int(np.ceil(min(y0, y1, y2) - 0.5)))
        i1 = min(height - 1, int(np.floor(max(y0, y1, y2) - 0.5)))
        inverse = 1.0 / area
        for i in range(i0, i1 + 1):
            py = i + 0.5
            for j in range(j0, j1 + 1):
                px = j + 0.5
                w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inverse
                w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inverse
                w2 = 1.0 - w0 - w1
                if w0 < 0.0 or w1 < 0.0 or w2 < 0.0:
                    continue
                z = w0 * z0 + w1 * z1 + w2 * z2
                if z < depth[i, j]:
                    depth[i, j] = z
                    triangle[i, j] = f
                    barycentric[i, j, 0] = w0
                    barycentric[i, j, 1] = w1
                    barycentric[i, j, 2] = w2


try:  # cached next to this file, or in the user's cache folder
    _rasterize_into = numba.njit(cache=True, nogil=True, error_model="numpy")(_rasterize_into)
except RuntimeError:  # pragma: no cover - no writable cache location: compile once per process
    _rasterize_into = numba.njit(nogil=True, error_model="numpy")(_rasterize_into)


def _check(vertices: np.ndarray, tris: np.ndarray, width: int, height: int) -> None:
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ParameterError(
            f"vertices have shape {vertices.shape}, not (frames, vertices, 3)",
            where="rasterize",
            fix="give x, y in pixels and z (depth) for every vertex of every frame",
        )
    if tris.ndim != 2 or tris.shape[1] != 3 or (tris.size and (tris.min() < 0 or tris.max() >= vertices.shape[1])):
        raise ParameterError(
            f"tris of shape {tris.shape} do not index the {vertices.shape[1]} vertices",
            where="rasterize",
            fix="give (triangle, 3) vertex indices from 0 to n_vertices - 1",
        )
    if width < 1 or height < 1:
        raise ParameterError(f"image size {width}x{height} is empty", where="rasterize", fix="give a positive size")


class CpuRasterizer:
    """A z-buffer in numba: per triangle, the pixel centres of its bounding box, in one thread.

    640x360 with MediaPipe's 898 triangles: see ``benchmarks/render.py`` (hundreds of frames/s on one
    core; the first call compiles for a few seconds, then the compiled kernel is cached on disk).
    """

    name = "cpu"

    def rasterize(
        self, vertices: np.ndarray, tris: np.ndarray, *, width: int, height: int, cull: Cull = "none"
    ) -> Raster:
        vertices = np.ascontiguousarray(vertices, dtype=np.float32)
        tris = np.ascontiguousarray(tris, dtype=np.int32)
        _check(vertices, tris, width, height)
        n = vertices.shape[0]
        triangle = np.full((n, height, width), -1, np.int32)
        barycentric = np.zeros((n, height, width, 3), np.float32)
        depth = np.full((n, height, width), np.inf, np.float32)
        for k in range(n):
            _rasterize_into(vertices[k], tris, cull == "back", triangle[k], barycentric[k], depth[k])
        return Raster(triangle, barycentric, depth)


class NvdiffrastRasterizer:
    """nvdiffrast's CUDA rasterizer (``pip install gmfx[gpu]``: diffrp-nvdiffrast, compiled on first use
    with the machine's CUDA toolkit) behind the same conventions as :class:`CpuRasterizer`.

    Pixel coordinates map to clip space as ``x_c = 2 x / W - 1``, ``y_c = 2 y / H - 1`` (nvdiffrast's
    row 0 is ``y_c = -1``), ``w = 1``; depth is scaled into ``(-0.9, 0.9)`` per batch, keeping its order.
    """

    name = "nvdiffrast"

    def __init__(self, device: str = "cuda") -> None:
        import nvdiffrast.torch as dr
        import torch

        self._dr = dr
        self._torch = torch
        self.device = torch.device(device)
        self._context = dr.RasterizeCudaContext(device=self.device)

    def rasterize(
        self, vertices: np.ndarray, tris: np.ndarray, *, width: int, height: int, cull: Cull = "none"
    ) -> Raster:
        vertices = np.asarray(vertices, dtype=np.float32)
        tris = np.asarray(tris, dtype=np.int32)
        _check(vertices, tris, width, height)
        finite = np.isfinite(vertices).all(axis=-1)
        z = vertices[..., 2][finite]
        low, high = (float(z.min()), float(z.max())) if z.size else (0.0, 1.0)
        clip = np.empty((*vertices.shape[:2], 4), np.float32)
        clip[..., 0] = 2 * vertices[..., 0] / width - 1
        clip[..., 1] = 2 * vertices[..., 1] / height - 1
        clip[..., 2] = (vertices[..., 2] - low) / max(high - low, 1e-12) * 1.8 - 0.9
        clip[..., 3] = 1
        clip[~finite] = (0, 0, 2, 1)  # beyond the far plane: clipped away
        if cull == "none":  # one batched call for all frames
            return self._unpack(self._raster(clip, tris, height, width), np.arange(len(tris)), low, high)
        rasters = []
        for k in range(vertices.shape[0]):  # culling keeps a per-frame subset of the triangles
            a, b, c = (vertices[k, tris[:, i], :2] for i in range(3))
            area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
            keep = np.flatnonzero(area < 0)
            rasters.append(self._unpack(self._raster(clip[k : k + 1], tris[keep], height, width), keep, low, high))
        return Raster(*(np.concatenate([getattr(r, name) for r in rasters]) for name in ("triangle", "barycentric", "depth")))

    def _raster(self, clip: np.ndarray, tris: np.ndarray, height: int, width: int) -> np.ndarray:
        """nvdiffrast's ``(n, H, W, 4)`` output (u, v, z/w, triangle id + 1) for clip-space vertices."""
        torch = self._torch
        pos = torch.from_numpy(np.ascontiguousarray(clip)).to(self.device)
        tri = torch.from_numpy(np.ascontiguousarray(tris, np.int32)).to(self.device)
        rast, _ = self._dr.rasterize(self._context, pos, tri, resolution=[height, width])
        return rast.cpu().numpy()

    @staticmethod
    def _unpack(out: np.ndarray, keep: np.ndarray, low: float, high: float) -> Raster:
        ids = out[..., 3].astype(np.int64) - 1
        covered = ids >= 0
        triangle = np.where(covered, keep[np.maximum(ids, 0)], -1).astype(np.int32)
        u, v = out[..., 0], out[..., 1]
        barycentric = np.where(covered[..., None], np.stack([u, v, 1 - u - v], axis=-1), 0).astype(np.float32)
        depth = np.where(covered, (out[..., 2] + 0.9) / 1.8 * (high - low) + low, np.inf).astype(np.float32)
        return Raster(triangle, barycentric, depth)


def get_rasterizer(device: Literal["cpu", "cuda"] | str = "cpu") -> Rasterizer:
    """The rasterizer for ``device``: ``cpu`` (numba) or ``cuda``/``cuda:N`` (nvdiffrast)."""
    if device == "cpu":
        return CpuRasterizer()
    if device.startswith("cuda"):
        try:
            return NvdiffrastRasterizer(device)
        except ImportError as error:
            raise ParameterError(
                f"rendering on {device} needs nvdiffrast, which is not installed ({error})",
                where="--device",
                fix="pip install 'gmfx[gpu]' (diffrp-nvdiffrast; needs the CUDA toolkit matching torch), or use --device cpu",
            ) from error
    raise ParameterError(f"unknown render device {device!r}", where="--device", fix="use cpu, cuda or cuda:N")


def interpolate(
    attributes: torch.Tensor, vertices: torch.Tensor, tris: torch.Tensor, triangle: np.ndarray
) -> torch.Tensor:
    """Differentiable per-pixel interpolation of per-vertex ``attributes`` over one rasterized image.

    Parameters
    ----------
    attributes
        ``(V, C)`` tensor (colours, normals, texture coordinates ...).
    vertices
        ``(V, 2+)`` tensor, x and y in pixels (the same the raster was made from).
    tris
        ``(F, 3)`` integer tensor.
    triangle
        ``(H, W)`` triangle ids of one image of a :class:`Raster` (-1: empty).

    Returns
    -------
    ``(H, W, C)`` tensor, zero where no triangle covers the pixel. The barycentrics are recomputed from
    ``vertices`` at the pixel centres, so gradients flow to ``vertices`` and ``attributes`` (not through
    which triangle is visible).
    """
    import torch

    height, width = triangle.shape
    rows, cols = np.nonzero(triangle >= 0)
    ids = torch.as_tensor(triangle[rows, cols], dtype=torch.long, device=vertices.device)
    corners = tris.long()[ids]  # (P, 3)
    xy = vertices[:, :2]
    p0, p1, p2 = xy[corners[:, 0]], xy[corners[:, 1]], xy[corners[:, 2]]
    centre = torch.stack(
        [torch.as_tensor(cols + 0.5, dtype=xy.dtype, device=xy.device), torch.as_tensor(rows + 0.5, dtype=xy.dtype, device=xy.device)],
        dim=1,
    )

    def cross(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])

    area = cross(p0, p1, p2)
    w0 = cross(centre, p1, p2) / area
    w1 = cross(p0, centre, p2) / area
    w2 = 1 - w0 - w1
    values = w0[:, None] * attributes[corners[:, 0]] + w1[:, None] * attributes[corners[:, 1]] + w2[:, None] * attributes[corners[:, 2]]
    out = attributes.new_zeros((height * width, attributes.shape[1]))
    flat = torch.as_tensor(rows * width + cols, dtype=torch.long, device=attributes.device)
    return out.index_copy(0, flat, values).reshape(height, width, -1)
