"""Pure geometry for reconstruction: weighted similarity Procrustes fits."""

from __future__ import annotations

import numpy as np

__all__ = ["similarity_fit", "similarity_matrix"]


def similarity_fit(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale ``s``, rotation ``R`` and translation ``t`` minimising ``sum w |s R source + t - target|^2``.

    Parameters
    ----------
    source, target
        ``(n, 3)`` corresponding points.
    weights
        ``(n,)`` non-negative weights (default: all ones).

    Returns
    -------
    scale, rotation, translation
        ``rotation`` is a proper rotation (determinant +1), never a reflection.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    source_mean = w @ source
    target_mean = w @ target
    a = source - source_mean
    b = target - target_mean
    covariance = (b * w[:, None]).T @ a
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(3)
    sign[2] = np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0
    rotation = (u * sign) @ vt
    scale = float((singular * sign).sum() / (w @ (a * a).sum(axis=1)))
    translation = target_mean - scale * rotation @ source_mean
    return scale, rotation, translation


def similarity_matrix(scale: float, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` affine ``x -> scale * rotation @ x + translation``."""
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = translation
    return matrix
