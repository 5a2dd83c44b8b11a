"""4x4 affine helpers (apply, invert, decompose into motion parameters), batched over leading axes; the fit
itself is :func:`gmfx.models._geometry.fit_transforms`.

Convention for the 12 motion parameters of an affine ``M`` (``x' = A x + t``)::

    A = R @ Z @ S,  R = Rz(rz) @ Ry(ry) @ Rx(rx),  Z = [[1, hxy, hxz], [0, 1, hyz], [0, 0, 1]],
    S = diag(sx, sy, sz)

and the parameters are ``(tx, ty, tz, rx, ry, rz [degrees], sx, sy, sz, hxy, hxz, hyz)``.
"""

from __future__ import annotations

import numpy as np

from gmfx.models._geometry import affine_matrix

__all__ = [
    "MOTION_PARAMS",
    "apply_affine",
    "invert_affine",
    "decompose_affine",
    "compose_affine",
    "euler_to_matrix",
]

MOTION_PARAMS = ("tx", "ty", "tz", "rx", "ry", "rz", "sx", "sy", "sz", "shear_xy", "shear_xz", "shear_yz")


def apply_affine(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(..., 4, 4)`` affines applied to ``(..., vertex, 3)`` points, in the points' float precision
    (float32 points stay float32: no float64 copy of a whole block)."""
    points = np.asarray(points)
    dtype = points.dtype if points.dtype in (np.float32, np.float64) else np.float64
    matrices = np.asarray(matrices, dtype=np.float64)
    linear = matrices[..., :3, :3].astype(dtype)
    out = np.matmul(points.astype(dtype, copy=False), np.swapaxes(linear, -1, -2))
    out += matrices[..., None, :3, 3].astype(dtype)
    return out


def invert_affine(matrices: np.ndarray) -> np.ndarray:
    """Inverse of ``(..., 4, 4)`` affines (NaN stays NaN)."""
    matrices = np.asarray(matrices, dtype=np.float64)
    finite = np.isfinite(matrices).all(axis=(-2, -1))
    safe = np.where(finite[..., None, None], matrices, np.eye(4))
    linear = np.linalg.inv(safe[..., :3, :3])
    out = affine_matrix(linear, -np.einsum("...ij,...j->...i", linear, safe[..., :3, 3]))
    out[~finite] = np.nan
    return out


def decompose_affine(matrices: np.ndarray) -> np.ndarray:
    """The 12 motion parameters (see the module docstring) of ``(..., 4, 4)`` affines."""
    matrices = np.asarray(matrices, dtype=np.float64)
    finite = np.isfinite(matrices).all(axis=(-2, -1))
    safe = np.where(finite[..., None, None], matrices, np.eye(4))
    q, r = np.linalg.qr(safe[..., :3, :3])
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    signs[signs == 0] = 1.0
    q = q * signs[..., None, :]
    r = r * signs[..., :, None]
    flip = np.linalg.det(q) < 0  # a reflection goes into a negative sz, R stays a rotation
    q[flip, :, 2] *= -1
    r[flip, 2, :] *= -1
    sx, sy, sz = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    rx = np.arctan2(q[..., 2, 1], q[..., 2, 2])
    ry = np.arctan2(-q[..., 2, 0], np.hypot(q[..., 2, 1], q[..., 2, 2]))
    rz = np.arctan2(q[..., 1, 0], q[..., 0, 0])
    params = np.stack(
        [
            safe[..., 0, 3], safe[..., 1, 3], safe[..., 2, 3],
            np.degrees(rx), np.degrees(ry), np.degrees(rz),
            sx, sy, sz,
            r[..., 0, 1] / sy, r[..., 0, 2] / sz, r[..., 1, 2] / sz,
        ],
        axis=-1,
    )  # fmt: skip
    params[~finite] = np.nan
    return params


def euler_to_matrix(rx: np.ndarray, ry: np.ndarray, rz: np.ndarray) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in degrees, ``(..., 3, 3)``."""
    rx, ry, rz = (np.radians(np.asarray(a, dtype=np.float64)) for a in (rx, ry, rz))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    return np.stack(
        [
            np.stack([cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx], -1),
            np.stack([sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx], -1),
            np.stack([-sy, cy * sx, cy * cx], -1),
        ],
        axis=-2,
    )


def compose_affine(params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decompose_affine`: ``(..., 12)`` parameters -> ``(..., 4, 4)`` affines."""
    p = np.asarray(params, dtype=np.float64)
    rotation = euler_to_matrix(p[..., 3], p[..., 4], p[..., 5])
    shear = np.zeros(p.shape[:-1] + (3, 3))
    shear[..., [0, 1, 2], [0, 1, 2]] = 1.0
    shear[..., 0, 1], shear[..., 0, 2], shear[..., 1, 2] = p[..., 9], p[..., 10], p[..., 11]
    scales = p[..., 6:9]
    linear = rotation @ shear * scales[..., None, :]
    return affine_matrix(linear, p[..., :3])
