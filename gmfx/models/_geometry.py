"""Pure geometry for reconstruction: weighted similarity Procrustes fits."""

from __future__ import annotations

import numpy as np

__all__ = ["similarity_fit", "similarity_matrix"]


def similarity_fit(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale ``s``, rotation ``R`` and translation ``t`` minimising ``sum w |s R source + t - target|^2``.

    Parameters
    ----------
    source
        ``(n, 3)`` points.
    target
        ``(..., n, 3)`` corresponding points; leading dimensions give one fit each (a batch).
    weights
        ``(n,)`` non-negative weights (default: all ones).

    Returns
    -------
    scale, rotation, translation
        Shapes ``(...)``, ``(..., 3, 3)`` and ``(..., 3)``; rotations are proper (determinant +1),
        never reflections.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    source_mean = w @ source
    target_mean = np.einsum("n,...nd->...d", w, target)
    a = source - source_mean
    b = target - target_mean[..., None, :]
    covariance = np.einsum("n,...ni,nj->...ij", w, b, a)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(singular.shape)
    sign[..., 2] = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)
    rotation = (u * sign[..., None, :]) @ vt
    scale = (singular * sign).sum(axis=-1) / (w @ (a * a).sum(axis=1))
    translation = target_mean - scale[..., None] * np.einsum("...ij,j->...i", rotation, source_mean)
    return scale, rotation, translation


def similarity_matrix(scale, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The ``(..., 4, 4)`` affines ``x -> scale * rotation @ x + translation`` (batched like the inputs)."""
    scale = np.asarray(scale, dtype=np.float64)
    matrix = np.zeros((*scale.shape, 4, 4))
    matrix[..., :3, :3] = scale[..., None, None] * rotation
    matrix[..., :3, 3] = translation
    matrix[..., 3, 3] = 1.0
    return matrix
