"""A real face with known head motion: ``skimage.data.astronaut()`` turned and shifted frame by frame.

The photo (public domain, shipped inside scikit-image) is warped by a known similarity per frame, so a
reconstruction's pose can be checked against the motion that made the video (encode the frames with
``gmfx.testing._videos.write_video(path, frames=motion.frames)``). Angles are in pixel
coordinates (x right, y down): a positive angle turns +x toward +y, i.e. clockwise on screen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FACE_CENTRE", "FaceMotion", "astronaut_motion"]

#: the astronaut's face centre (x, y) in the 512 x 512 photo: the centre of the applied rotations
FACE_CENTRE = (224.0, 125.0)


@dataclass(frozen=True)
class FaceMotion:
    """Frames of a moving face and the motion applied to each.

    Attributes
    ----------
    frames
        ``(n, height, width, 3)`` uint8 RGB.
    angles
        ``(n,)`` in-plane rotation (degrees) of each frame about :data:`FACE_CENTRE`.
    shifts
        ``(n, 2)`` translation (x, y) in pixels applied after the rotation.
    """

    frames: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray


def astronaut_motion(n_frames: int, *, max_angle: float = 20.0, max_shift: float = 12.0, periods: float = 1.0) -> FaceMotion:
    """The astronaut photo turning (up to ``max_angle`` degrees) and moving, smoothly over ``n_frames``."""
    from skimage.data import astronaut
    from skimage.transform import SimilarityTransform, warp

    image = astronaut()
    phase = 2 * np.pi * periods * np.arange(n_frames) / max(n_frames, 1)
    angles = max_angle * np.sin(phase)
    shifts = max_shift * np.stack([np.sin(2 * phase), 0.5 * (1 - np.cos(phase))], axis=1)
    centre = np.array(FACE_CENTRE)
    frames = np.empty((n_frames, *image.shape), dtype=np.uint8)
    for i, (angle, shift) in enumerate(zip(angles, shifts)):
        motion = (
            SimilarityTransform(translation=-centre)
            + SimilarityTransform(rotation=np.deg2rad(angle))
            + SimilarityTransform(translation=centre + shift)
        )
        frames[i] = np.round(warp(image, motion.inverse, order=1, preserve_range=True)).astype(np.uint8)
    return FaceMotion(frames=frames, angles=angles, shifts=shifts)

