"""Face boxes for the crop-based families: landmarks per face from MediaPipe (offline) or FAN.

A detector turns a batch of frames into, per frame, ``(landmarks (n, 2) pixels, score)`` per face;
the crop rules of :mod:`gmfx.models._crops` turn the landmarks into boxes.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from gmfx._errors import ModelError

__all__ = ["FAN_WEIGHTS", "Detector", "FanDetector", "MediaPipeDetector", "make_detector"]

#: face-alignment 1.5's 2D FAN file in ``$TORCH_HOME/hub/checkpoints`` and where it comes from
FAN_WEIGHTS = "2DFAN4-11f355bf06.pth.tar"
FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar"

Detection = tuple[np.ndarray, float]


class MediaPipeDetector:
    """MediaPipe's 478-point face mesh (gmfx's ``mediapipe`` backend, tracking within a segment);
    its x, y landmarks in pixels. DECA's box rule for landmarks applies to them as to FAN's 68
    (EMOCA treats MediaPipe landmarks the same way)."""

    def __init__(self, min_detection_confidence: float = 0.5) -> None:
        from gmfx.models.mediapipe import MediaPipeBackend

        self._mesh = MediaPipeBackend(min_detection_confidence=min_detection_confidence)

    def reset(self) -> None:
        self._mesh.reset()

    def __call__(self, frames: np.ndarray, max_faces: int) -> list[list[Detection]]:
        found = self._mesh.reconstruct(frames, max_faces=max_faces)
        return [[(face.vertices[:, :2].astype(np.float64), face.score) for face in faces] for faces in found]


def fan_weights_path() -> str:
    """Where face-alignment looks for the 2D FAN weights (``torch.hub.get_dir()/checkpoints``)."""
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", FAN_WEIGHTS)


class FanDetector:
    """face-alignment's 2D FAN: 68 landmarks inside the boxes MediaPipe finds (FAN's own detectors
    need further weights). Needs ``2DFAN4-11f355bf06.pth.tar`` in ``$TORCH_HOME/hub/checkpoints``;
    without it, a :class:`ModelError` says so (face-alignment would try to download it)."""

    def __init__(self, device: str, min_detection_confidence: float = 0.5) -> None:
        path = fan_weights_path()
        if not os.path.exists(path):
            raise ModelError(
                f"--detector fan needs face-alignment's FAN weights, which are not at {path}",
                where="--detector fan",
                fix=f"download {FAN_URL} into that folder (or set TORCH_HOME to a folder whose hub/checkpoints holds it), "
                "or use --detector mediapipe",
            )
        import face_alignment

        self._boxes = MediaPipeDetector(min_detection_confidence)
        self._fan = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, face_detector="folder", compile=False, flip_input=False
        )

    def reset(self) -> None:
        self._boxes.reset()

    def __call__(self, frames: np.ndarray, max_faces: int) -> list[list[Detection]]:
        result = []
        for frame, faces in zip(frames, self._boxes(frames, max_faces)):
            boxes = [np.array([*points.min(axis=0), *points.max(axis=0)]) for points, _ in faces]
            landmarks = self._fan.get_landmarks_from_image(frame, detected_faces=boxes) if boxes else None
            result.append([(np.asarray(points, np.float64)[:, :2], score) for points, (_, score) in zip(landmarks or [], faces)])
        return result


Detector = MediaPipeDetector | FanDetector


def make_detector(kind: Literal["mediapipe", "fan"], device: str, min_detection_confidence: float = 0.5) -> Detector:
    if kind == "mediapipe":
        return MediaPipeDetector(min_detection_confidence)
    if kind == "fan":
        return FanDetector(device, min_detection_confidence)
    raise ModelError(f"unknown detector {kind!r}", where="--detector", fix="use mediapipe or fan")
