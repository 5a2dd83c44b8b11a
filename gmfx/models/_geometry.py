"""Pure geometry shared by reconstruction and preprocessing: the one weighted Procrustes fit and the one 4x4 builder."""

from __future__ import annotations

import numpy as np

__all__ = ["affine_matrix", "fit_transforms"]


def fit_transforms(points: np.ndarray, reference: np.ndarray, weights: np.ndarray, *, scale: bool = False) -> np.ndarray:
    """Weighted least-squares rotation + translation (+ uniform scale) mapping ``points`` onto ``reference``.

    Closed form of Umeyama (1991): one 3x3 SVD per frame, all frames at once.

    Parameters
    ----------
    points
        ``(..., vertex, 3)`` point sets (e.g. one per frame and face), or one ``(vertex, 3)`` set fitted to a
        batch of references.
    reference
        ``(vertex, 3)`` or an array broadcastable with ``points``.
    weights
        ``(vertex,)`` non-negative weights; vertices with weight 0 are ignored.
    scale
        Also fit a uniform scale.

    Returns
    -------
    ``(..., 4, 4)`` affines ``M`` with ``M @ [p, 1] ~ [reference, 1]``; NaN where a weighted point or
    the reference is not finite.
    """
    used = np.asarray(weights, dtype=np.float64) > 0
    w = np.asarray(weights, dtype=np.float64)[used]
    w = w / w.sum()
    # only the weighted vertices are ever copied (and made float64); a shared reference stays unbroadcast
    index = np.flatnonzero(used)
    x = np.take(np.asarray(points), index, axis=-2).astype(np.float64)  # np.take: ~3x a boolean mask here
    y = np.take(np.asarray(reference), index, axis=-2).astype(np.float64)
    valid = np.isfinite(x).all(axis=(-2, -1)) & np.isfinite(y).all(axis=(-2, -1))
    if not valid.all():
        x = np.where(valid[..., None, None], x, 0.0)
        y = np.where(valid[..., None, None], y, 0.0)
    mean_x = np.einsum("...vi,v->...i", x, w)
    mean_y = np.einsum("...vi,v->...i", y, w)
    xc = x - mean_x[..., None, :]
    yc = y - mean_y[..., None, :]
    covariance = np.matmul(np.swapaxes(yc * w[:, None], -1, -2), xc)
    u, d, vt = np.linalg.svd(covariance)
    determinant = np.linalg.det(u) * np.linalg.det(vt)
    sign = np.where(determinant < 0, -1.0, 1.0)  # a proper rotation, never a reflection
    correction = np.ones(d.shape)
    correction[..., 2] = sign
    rotation = np.einsum("...ij,...j,...jk->...ik", u, correction, vt)
    if scale:
        variance = np.einsum("...vi,...vi->...", xc * w[:, None], xc)
        factor = (d * correction).sum(-1) / np.where(variance > 0, variance, np.nan)
    else:
        factor = np.ones(valid.shape)
    linear = factor[..., None, None] * rotation
    translation = mean_y - np.einsum("...ij,...j->...i", linear, mean_x)
    out = affine_matrix(linear, translation)
    out[~valid] = np.nan
    return out


def affine_matrix(linear: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The ``(..., 4, 4)`` affines ``x -> linear @ x + translation`` of ``(..., 3, 3)`` and ``(..., 3)`` parts."""
    linear = np.asarray(linear, dtype=np.float64)
    out = np.zeros(linear.shape[:-2] + (4, 4))
    out[..., :3, :3] = linear
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out
