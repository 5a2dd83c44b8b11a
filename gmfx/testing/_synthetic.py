"""Synthetic face sequences with known rigid head motion, and synthetic recon stores built from them."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

from gmfx.storage import Location, RegionStore
from gmfx.types import split_regions

__all__ = ["SyntheticFace", "synthetic_face", "synthetic_recon_dataset", "write_synthetic_recon"]


@dataclass(frozen=True)
class SyntheticFace:
    """A face sequence and its ground truth.

    Attributes
    ----------
    times
        ``(time,)`` acquisition times in seconds (irregular when ``time_jitter`` > 0).
    template
        ``(vertex, 3)`` canonical shape in local space (metres); ``width`` is its x extent.
    tris
        ``(triangle, 3)`` triangles over the template.
    rigid
        ``(vertex,)`` vertices that do not move with the expression.
    local
        ``(time, face, vertex, 3)`` shape in local space (template + expression + noise).
    mat
        ``(time, face, 4, 4)`` true local -> world affine (NaN on missing frames).
    rotation_deg, translation
        ``(time, face, 3)`` the true motion: extrinsic x-y-z angles and translation of ``mat``.
    v
        ``(time, face, vertex, 3)`` world-space vertices (NaN on missing frames).
    """

    times: np.ndarray
    template: np.ndarray
    tris: np.ndarray
    rigid: np.ndarray
    local: np.ndarray
    mat: np.ndarray
    rotation_deg: np.ndarray
    translation: np.ndarray
    v: np.ndarray

    @property
    def width(self) -> float:
        return float(np.ptp(self.template[:, 0]))


def _template(n_vertices: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points on the front half of an ellipsoid (a face-sized cap, metres) and their triangles."""
    from scipy.spatial import Delaunay

    u = rng.uniform(-1, 1, size=(n_vertices, 2)) * [0.9, 0.95]
    u = u[np.argsort(u[:, 1], kind="stable")]
    depth = np.sqrt(np.clip(1 - (u**2).sum(1), 0.05, None))
    points = np.column_stack([u[:, 0] * 0.075, u[:, 1] * 0.1, depth * 0.05])
    return points, Delaunay(u).simplices.astype(np.int32)


def synthetic_face(
    n_frames: int = 300,
    *,
    n_vertices: int = 200,
    n_faces: int = 1,
    fps: float = 30.0,
    time_jitter: float = 0.0,
    max_rotation_deg: float = 15.0,
    max_translation: float = 0.05,
    noise: float = 2e-4,
    expression: float = 0.005,
    gaps: tuple[tuple[int, int], ...] = (),
    seed: int = 0,
) -> SyntheticFace:
    """A face that moves rigidly (smooth random rotations and translations) while its mouth region moves.

    Parameters
    ----------
    time_jitter
        Standard deviation of the frame times around the even grid, as a fraction of a frame interval.
    noise
        Standard deviation (metres) of Gaussian noise on every vertex coordinate.
    expression
        Amplitude (metres) of the non-rigid motion of the lower third of the face.
    gaps
        ``(start, stop)`` frame ranges without a face (NaN vertices and matrices).
    """
    from gmfx.preproc._rigid import euler_to_matrix

    rng = np.random.default_rng(seed)
    template, tris = _template(n_vertices, rng)
    rigid = template[:, 1] > -0.03
    steps = 1 + time_jitter * np.clip(rng.standard_normal(n_frames), -0.45 / max(time_jitter, 1e-9), 0.45 / max(time_jitter, 1e-9))
    times = np.concatenate([[0.0], np.cumsum(steps[1:])]) / fps + 1.0
    phase = rng.uniform(0, 2 * np.pi, size=(n_faces, 6))
    speed = rng.uniform(0.1, 0.5, size=(n_faces, 6))
    wave = np.sin(2 * np.pi * speed[None] * times[:, None, None] + phase[None])
    rotation_deg = max_rotation_deg * wave[..., :3]
    translation = max_translation * wave[..., 3:] + np.array([0.0, 0.0, 0.6])
    mat = np.zeros((n_frames, n_faces, 4, 4))
    mat[..., :3, :3] = euler_to_matrix(rotation_deg[..., 0], rotation_deg[..., 1], rotation_deg[..., 2])
    mat[..., :3, 3] = translation
    mat[..., 3, 3] = 1.0
    mouth = np.where(rigid, 0.0, 1.0)[None, None, :]
    opening = expression * np.sin(2 * np.pi * 1.3 * times)[:, None, None] * mouth
    local = np.broadcast_to(template, (n_frames, n_faces, n_vertices, 3)).copy()
    local[..., 1] += opening
    local += noise * rng.standard_normal(local.shape)
    v = np.einsum("tfij,tfvj->tfvi", mat[..., :3, :3], local) + mat[..., None, :3, 3]
    for start, stop in gaps:
        v[start:stop] = np.nan
        mat[start:stop] = np.nan
    return SyntheticFace(times, template, tris, rigid, local, mat, rotation_deg, translation, v)


def synthetic_recon_dataset(face: SyntheticFace, *, chunk: int = 64) -> xr.Dataset:
    """The face as a recon-store-shaped Dataset (Dask-backed along time, chunked by ``chunk`` frames)."""
    n_frames, n_faces = face.v.shape[:2]
    detected = np.isfinite(face.v).all(axis=(2, 3))

    def lazy(values: np.ndarray, dtype) -> da.Array:
        return da.from_array(values.astype(dtype), chunks=(chunk,) + values.shape[1:])

    return xr.Dataset(
        {
            "v": (("time", "face", "vertex", "coord"), lazy(face.v, np.float32), {"space": "world", "units": "m"}),
            "mat": (("time", "face", "row", "col"), lazy(face.mat, np.float32)),
            "detected": (("time", "face"), lazy(detected, bool)),
            "score": (("time", "face"), lazy(np.where(detected, 0.9, 0.0), np.float32)),
            "tris": (("triangle", "corner"), face.tris),
            "template": (("vertex", "coord"), face.template.astype(np.float32)),
            "rigid": (("vertex",), face.rigid),
        },
        coords={
            "time": ("time", face.times, {"units": "s"}),
            "frame": ("time", np.arange(n_frames)),
            "face": np.arange(n_faces),
            "coord": ["x", "y", "z"],
        },
        attrs={"model": "synthetic", "topology": "synthetic"},
    )


def write_synthetic_recon(location: Location, face: SyntheticFace, *, chunk: int = 64) -> Location:
    """Write the face as a finished recon store at ``location`` (template, one region per chunk, finalize)."""
    ds = synthetic_recon_dataset(face, chunk=chunk)
    regions = split_regions(ds.sizes["time"], chunk)
    template = ds.copy()
    for name in ("time", "frame"):
        template[name] = ("time", da.zeros(ds.sizes["time"], chunks=chunk, dtype=ds[name].dtype), ds[name].attrs)
    store = RegionStore(location, "recon")
    store.prepare(template, plan={"regions": len(regions), "source": "synthetic"}, overwrite=True)
    timed = {name: np.asarray(ds[name].values) for name in ds.variables if ds[name].dims[:1] == ("time",)}
    for region in regions:
        store.write_region(region.index, region.slice, {n: values[region.slice] for n, values in timed.items()})
    store.finalize({"source": "gmfx.testing.synthetic_face"})
    return location
