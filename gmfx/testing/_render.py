"""Meshes to render in tests and benchmarks: MediaPipe's canonical face and a FLAME-size synthetic face,
placed in an image at known, randomly varying poses."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["face_mesh", "random_face_meshes", "rotation"]

#: vertices of a FLAME mesh (the synthetic stand-in has the same count and about as many triangles)
FLAME_VERTICES = 5023


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """``(3, 3)`` rotation in image axes (x right, y down, z away), angles in degrees: ``yaw`` about y
    (positive turns the face's +z side toward +x), ``pitch`` about x, ``roll`` about z, applied roll, then
    pitch, then yaw."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    about_y = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    about_x = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    about_z = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return about_y @ about_x @ about_z


def face_mesh(topology: Literal["mediapipe", "flame"] = "mediapipe") -> tuple[np.ndarray, np.ndarray]:
    """A face looking at the camera in image axes (x right, y down, z away; unit height) and its triangles."""
    if topology == "mediapipe":
        from gmfx.models.mediapipe import MediaPipeBackend

        mesh = MediaPipeBackend.topology()
        points = mesh.template * [1.0, -1.0, -1.0]  # template: y up, z toward the viewer
        tris = mesh.triangles
    else:
        from scipy.spatial import Delaunay

        rng = np.random.default_rng(5023)
        u = rng.uniform(-1, 1, size=(FLAME_VERTICES, 2)) * [0.75, 1.0]
        height = np.sqrt(np.clip(1 - (u**2).sum(1), 0.02, None))
        points = np.column_stack([u[:, 0], u[:, 1], -0.6 * height])
        tris = Delaunay(u).simplices.astype(np.int32)
        a, b, c = (points[tris[:, k], :2] for k in range(3))
        clockwise = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]) > 0
        tris[clockwise] = tris[clockwise][:, [0, 2, 1]]  # front facing, as gmfx's rasterizers define it
    points = points - points.mean(axis=0)
    return (points / np.ptp(points[:, 1])).astype(np.float32), np.ascontiguousarray(tris, np.int32)


def random_face_meshes(
    n_frames: int,
    *,
    topology: Literal["mediapipe", "flame"] = "mediapipe",
    width: int = 640,
    height: int = 360,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, V, 3)`` pixel-space meshes (60% of the image height, turned up to 30 degrees, shifted) and tris."""
    rng = np.random.default_rng(seed)
    points, tris = face_mesh(topology)
    out = np.empty((n_frames, *points.shape), np.float32)
    for k in range(n_frames):
        turn = rotation(*rng.uniform(-30, 30, 3))
        centre = np.array([width / 2, height / 2, 2.0 * height]) + rng.uniform(-0.1, 0.1, 3) * height
        out[k] = 0.6 * height * points @ turn.T + centre
    return out, tris


def textured_face(image: np.ndarray, vertices: np.ndarray, tris: np.ndarray, turn: np.ndarray, *, background: int = 128) -> np.ndarray:
    """``image`` re-rendered with the face mesh ``vertices`` (pixels, e.g. MediaPipe's landmarks of that
    image) turned by ``turn`` ``(3, 3)`` about the mesh's centre: each covered pixel takes the photo's
    colour at the point of the unturned mesh it shows (bilinear), the rest is ``background`` grey.

    This is a face whose out-of-plane pose (yaw, pitch) is known exactly: ``turn`` in image axes.
    """
    from scipy.ndimage import map_coordinates

    from gmfx.render import CpuRasterizer
    from gmfx.render._shade import interpolate_attributes

    centre = np.nanmean(vertices, axis=0)
    turned = ((vertices - centre) @ turn.T + centre).astype(np.float32)
    height, width = image.shape[:2]
    raster = CpuRasterizer().rasterize(turned[None], tris, width=width, height=height, cull="back")
    source = interpolate_attributes(raster, tris, vertices[:, :2].astype(np.float32))[0]  # photo x, y
    out = np.full(image.shape, background, np.uint8)
    rows, cols = np.nonzero(raster.mask[0])
    x, y = source[rows, cols, 0] - 0.5, source[rows, cols, 1] - 0.5  # pixel centres are at +0.5
    for channel in range(3):
        out[rows, cols, channel] = np.clip(map_coordinates(image[..., channel].astype(np.float32), [y, x], order=1), 0, 255)
    return out
