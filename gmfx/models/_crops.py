"""Face crops and cameras as pure functions with their inverses, shared by the model families.

Conventions: image pixels have x right, y down, pixel centres at integers; a crop is a 2D
similarity ``(3, 3)`` mapping original-image pixels to crop pixels (``to_crop``), and
:func:`transform_points` with its inverse maps back. World (image) space for meshes is
``(x px, y px, z px)`` with z pointing away from the camera, a right-handed frame.

* DECA/EMOCA (:func:`box_from_landmarks`, :func:`box_from_detection`, :func:`square_crop`): a
  square of ``1.25 x`` the face size around the box centre, whose top-left, bottom-left and top-right
  corners map to ``(0, 0)``, ``(0, out-1)``, ``(out-1, 0)`` (DECA's ``bbox2point`` + 3-point similarity).
* :func:`similarity_from_points`: the least-squares similarity between point sets (Umeyama 1991),
  for landmark-template crops such as ArcFace's 5 points or Deep3D's alignment.
* :func:`orthographic_camera`: DECA's scaled orthographic camera ``(s, tx, ty)`` as a ``(4, 4)`` matrix
  from model space (metres, y up, z towards the viewer) to crop pixels.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "DECA_CROP_SIZE",
    "DECA_SCALE",
    "box_from_detection",
    "box_from_landmarks",
    "crop_to_image",
    "lift_similarity",
    "orthographic_camera",
    "similarity_from_points",
    "square_crop",
    "transform_points",
    "warp_crops",
]

DECA_CROP_SIZE = 224
DECA_SCALE = 1.25
#: DECA's box from 68 landmarks is 10% larger than their extent; a detector box is shifted down by 12% of its size
LANDMARK_BOX_ENLARGE = 1.1
DETECTION_SHIFT = 0.12


def box_from_landmarks(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(..., 2)`` and sizes ``(...)`` of boxes around ``(..., n, 2)`` landmarks: the
    extent's centre and ``1.1 x`` the mean of its width and height (DECA's ``kpt68`` rule)."""
    low, high = points.min(axis=-2), points.max(axis=-2)
    size = ((high - low).sum(axis=-1) / 2) * LANDMARK_BOX_ENLARGE
    return (low + high) / 2, size


def box_from_detection(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and sizes of ``(..., 4)`` detector boxes ``x0, y0, x1, y1``: the mean of width and
    height, the centre moved down by 12% of it (DECA's ``bbox`` rule)."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    size = (width + height) / 2
    centre = np.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2 + DETECTION_SHIFT * size], axis=-1)
    return centre, size


def square_crop(centre: np.ndarray, size: np.ndarray, *, scale: float = DECA_SCALE, out: int = DECA_CROP_SIZE) -> np.ndarray:
    """``(..., 3, 3)`` image -> crop similarities of the squares ``int(size * scale)`` wide around ``centre``."""
    centre = np.asarray(centre, dtype=np.float64)
    side = np.floor(np.asarray(size, dtype=np.float64) * scale)
    k = (out - 1) / side
    corner = centre - side[..., None] / 2
    matrix = np.zeros((*side.shape, 3, 3))
    matrix[..., 0, 0] = matrix[..., 1, 1] = k
    matrix[..., :2, 2] = -k[..., None] * corner
    matrix[..., 2, 2] = 1
    return matrix


def similarity_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ``(3, 3)`` similarity (scale, rotation, translation) taking ``(n, 2)`` ``source`` closest to
    ``target`` in least squares (Umeyama's closed form; no reflection)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    a, b = source - mu_s, target - mu_t
    covariance = b.T @ a / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(singular) @ d) / a.var(axis=0).sum()
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = mu_t - scale * rotation @ mu_s
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(..., n, 2)`` points through ``(..., 3, 3)`` affine matrices."""
    return points @ np.swapaxes(matrix[..., :2, :2], -1, -2) + matrix[..., None, :2, 2]


def lift_similarity(matrix: np.ndarray) -> np.ndarray:
    """A 2D similarity ``(..., 3, 3)`` as the ``(..., 4, 4)`` 3D similarity that scales z like x and y."""
    lifted = np.zeros((*matrix.shape[:-2], 4, 4))
    lifted[..., :2, :2] = matrix[..., :2, :2]
    lifted[..., :2, 3] = matrix[..., :2, 2]
    lifted[..., 2, 2] = np.sqrt(np.abs(np.linalg.det(matrix[..., :2, :2])))
    lifted[..., 3, 3] = 1
    return lifted


def crop_to_image(matrix: np.ndarray) -> np.ndarray:
    """``(..., 4, 4)``: crop pixels (z px) -> image pixels, the inverse of the image -> crop similarity ``matrix``."""
    return lift_similarity(np.linalg.inv(matrix))


def orthographic_camera(camera: np.ndarray, *, out: int = DECA_CROP_SIZE) -> np.ndarray:
    """``(..., 4, 4)`` matrices of DECA's camera ``(..., 3)`` = ``(s, tx, ty)``: model space -> crop pixels.

    ``ndc = s * (X + tx, -(Y + ty), -Z)`` (DECA's ``batch_orth_proj`` then its y/z flip), and crop pixels
    ``(ndc + 1) * out / 2`` for x and y, ``ndc * out / 2`` for z.
    """
    camera = np.asarray(camera, np.float64)
    s, tx, ty = camera[..., 0], camera[..., 1], camera[..., 2]
    half = out / 2
    matrix = np.zeros((*s.shape, 4, 4))
    matrix[..., 0, 0] = half * s
    matrix[..., 1, 1] = -half * s
    matrix[..., 2, 2] = -half * s
    matrix[..., 0, 3] = half * s * tx + half
    matrix[..., 1, 3] = -half * s * ty + half
    matrix[..., 3, 3] = 1
    return matrix


def warp_crops(frames: torch.Tensor, matrices: torch.Tensor, frame_index: torch.Tensor, *, out: int = DECA_CROP_SIZE) -> torch.Tensor:
    """Crops ``(N, 3, out, out)`` float in ``[0, 1]`` of ``frames`` (``(B, H, W, 3)`` uint8).

    Crop ``i`` samples frame ``frame_index[i]`` bilinearly through the inverse of the image -> crop
    similarity ``matrices[i]``, zero outside the frame (as ``skimage.transform.warp`` with its default
    order 1, which DECA uses).
    """
    height, width = frames.shape[1:3]
    images = frames.permute(0, 3, 1, 2)[frame_index].float() / 255.0
    inverse = torch.linalg.inv(matrices.to(torch.float64))
    axis = torch.arange(out, dtype=torch.float64, device=frames.device)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    crop_points = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    source = crop_points @ inverse.transpose(1, 2)  # (N, out*out, 3)
    grid = torch.stack([source[..., 0] * 2 / (width - 1) - 1, source[..., 1] * 2 / (height - 1) - 1], dim=-1)
    grid = grid.reshape(-1, out, out, 2).to(images.dtype)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
