"""The 68 iBUG landmarks that 3DMM fitting needs, from FAN or from MediaPipe's 478-point mesh.

FAN (face-alignment's 2D-FAN, :class:`gmfx.models._detect.FanDetector`) predicts the 68 iBUG points
themselves; it needs ``2DFAN4-11f355bf06.pth.tar`` in ``$TORCH_HOME/hub/checkpoints``. Without it, gmfx
derives the 68 points from MediaPipe's mesh (offline, Apache-2.0) through :func:`mediapipe_to_ibug68`.

How the MediaPipe correspondence is built (gmfx's own derivation, computed from MediaPipe's files)
    iBUG's 68-point scheme (Sagonas et al., 300-W, 2013) places its points along facial curves: the
    jaw (0-16, from the subject's right ear through the chin), the upper edge of each brow (17-21,
    22-26), the nose ridge (27-30), the nostril base (31-35), each eyelid (36-47), the outer (48-59)
    and inner (60-67) lip contours; corners and midline points are anatomical landmarks, the points
    between them are spread evenly along the curve. gmfx follows that definition on MediaPipe's mesh:
    each iBUG curve is a path of MediaPipe vertices (:data:`CURVES`: taken from the curves of
    MediaPipe's own ``face_mesh_connections``: ``FACEMESH_FACE_OVAL``'s lower half, ``*_EYEBROW``'s
    upper row, ``*_EYE``'s lids, ``FACEMESH_LIPS``' outer and inner rings, ``FACEMESH_NOSE``'s ridge
    and nostril base), its end points are the anatomical ones (eye corners 33/133 and 362/263, mouth
    corners 61/291 and inner corners 78/308, nasion 168, pronasale 4 (the most anterior vertex of the
    canonical model), subnasale 2, menton 152), and the points between are placed at equal arc
    length along the path on MediaPipe's canonical face model, each a blend of the two mesh vertices
    around it. The result is a ``(68, 478)`` matrix with at most two non-zero weights per row.
    Checked in the tests: iBUG's mirror pairs map onto mirror images on the (symmetric) canonical
    model, midline points lie on its midline, and on real faces the points come in iBUG's order.
    The contour (0-16) is a fixed band of the mesh, like BFM's keypoints, not the silhouette a human
    annotator would trace on a turned head.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np

from gmfx._errors import ModelError

__all__ = ["CURVES", "IBUG_MIRROR", "Landmarks68", "LandmarkSource", "mediapipe_to_ibug68", "resolve_landmark_source"]

#: iBUG ids -> (MediaPipe vertex path, arc-length fractions of those ids along it). Subject's right = image left.
CURVES: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]], ...] = (
    # jaw: lower half of FACEMESH_FACE_OVAL, right ear -> menton (152, the middle) -> left ear
    (tuple(range(0, 17)),
     (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356),
     tuple(k / 16 for k in range(17))),
    # brows: upper row of FACEMESH_RIGHT/LEFT_EYEBROW, outer -> inner, inner -> outer
    ((17, 18, 19, 20, 21), (70, 63, 105, 66, 107), (0, 0.25, 0.5, 0.75, 1)),
    ((22, 23, 24, 25, 26), (336, 296, 334, 293, 300), (0, 0.25, 0.5, 0.75, 1)),
    # nose ridge: nasion -> pronasale; nostril base: right alar base -> subnasale (2) -> left
    ((27, 28, 29, 30), (168, 6, 197, 195, 5, 4), (0, 1 / 3, 2 / 3, 1)),
    ((31, 32, 33, 34, 35), (98, 97, 2, 326, 327), (0, 0.25, 0.5, 0.75, 1)),
    # right eye: outer corner -> upper lid -> inner corner, then the lower lid back
    ((36, 37, 38, 39), (33, 246, 161, 160, 159, 158, 157, 173, 133), (0, 1 / 3, 2 / 3, 1)),
    ((40, 41), (133, 155, 154, 153, 145, 144, 163, 7, 33), (1 / 3, 2 / 3)),
    # left eye: inner corner -> upper lid -> outer corner, then the lower lid back
    ((42, 43, 44, 45), (362, 398, 384, 385, 386, 387, 388, 466, 263), (0, 1 / 3, 2 / 3, 1)),
    ((46, 47), (263, 249, 390, 373, 374, 380, 381, 382, 362), (1 / 3, 2 / 3)),
    # outer lips: right corner -> upper lip (0 in the middle) -> left corner, lower lip back (17 in the middle)
    ((48, 49, 50, 51, 52, 53, 54), (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291), tuple(k / 6 for k in range(7))),
    ((55, 56, 57, 58, 59), (291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 61), tuple(k / 6 for k in range(1, 6))),
    # inner lips: right inner corner -> upper (13) -> left inner corner, lower (14) back
    ((60, 61, 62, 63, 64), (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308), (0, 0.25, 0.5, 0.75, 1)),
    ((65, 66, 67), (308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78), (0.25, 0.5, 0.75)),
)  # fmt: skip

#: iBUG id -> its mirror image's id (left <-> right); midline points map to themselves
IBUG_MIRROR = np.array(
    [*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)  # fmt: skip


def _curve_weights(path: tuple[int, ...], fractions: tuple[float, ...], canonical: np.ndarray) -> list[dict[int, float]]:
    """Per fraction, ``{vertex: weight}`` of the point at that fraction of ``path``'s arc length."""
    points = canonical[list(path)]
    cumulative = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    rows = []
    for fraction in fractions:
        distance = fraction * cumulative[-1]
        segment = min(int(np.searchsorted(cumulative, distance, side="right")) - 1, len(path) - 2)
        along = (distance - cumulative[segment]) / (cumulative[segment + 1] - cumulative[segment])
        weights = {path[segment]: 1.0 - along, path[segment + 1]: along}
        rows.append({vertex: weight for vertex, weight in weights.items() if weight > 1e-9})
    return rows


@cache
def mediapipe_to_ibug68() -> np.ndarray:
    """``(68, 478)`` float64 weights: ``weights @ mediapipe_points`` gives the 68 iBUG points (rows sum to 1)."""
    from gmfx.models.mediapipe import N_VERTICES, mediapipe_template

    canonical = mediapipe_template()
    matrix = np.zeros((68, N_VERTICES))
    for ids, path, fractions in CURVES:
        for row, weights in zip(ids, _curve_weights(path, fractions, canonical)):
            for vertex, weight in weights.items():
                matrix[row, vertex] = weight
    matrix.setflags(write=False)
    return matrix


LandmarkSource = Literal["auto", "fan", "mediapipe"]


def resolve_landmark_source(source: LandmarkSource) -> Literal["fan", "mediapipe"]:
    """``auto`` -> ``fan`` when FAN's weights are where face-alignment looks for them, else ``mediapipe``."""
    if source == "auto":
        import os

        from gmfx.models._detect import fan_weights_path

        return "fan" if os.path.exists(fan_weights_path()) else "mediapipe"
    if source not in ("fan", "mediapipe"):
        raise ModelError(f"unknown landmark source {source!r}", where="model option landmarks", fix="use auto, fan or mediapipe")
    return source


class Landmarks68:
    """Per frame, ``(points (68, 2) pixels, score)`` for each face (at most ``max_faces``), from the
    resolved source: FAN's own 68, or MediaPipe's 478 through :func:`mediapipe_to_ibug68`."""

    def __init__(self, source: LandmarkSource, device: str = "cpu", min_detection_confidence: float = 0.5) -> None:
        from gmfx.models._detect import make_detector

        self.source = resolve_landmark_source(source)
        self._detector = make_detector(self.source, device, min_detection_confidence)
        self._weights = mediapipe_to_ibug68() if self.source == "mediapipe" else None

    def reset(self) -> None:
        self._detector.reset()

    def __call__(self, frames: np.ndarray, max_faces: int) -> list[list[tuple[np.ndarray, float]]]:
        found = self._detector(frames, max_faces)
        if self._weights is None:
            return found
        return [[(self._weights @ points, score) for points, score in faces] for faces in found]
