"""Motion parameters (confounds) derived from the local -> world affines ``mat``.

``motion`` is never interpolated or filtered itself: Euler angles wrap at +/-180 degrees, and MediaPipe's
image space (y down) puts a face's x rotation right there, so treating the angles as numbers turns a
1-degree nod into a 358-degree jump. Every operation resamples or keeps ``mat`` (rotations by slerp) and
derives ``motion`` from it again with :func:`motion_from_mat`.
"""

from __future__ import annotations

import numpy as np

from gmfx.preproc._rigid import MOTION_PARAMS, decompose_affine

__all__ = ["ANGLE_RANGE", "motion_from_mat"]

#: every angle except ry (which is in [-90, 90]) lies in [low, low + 360): continuous for a face within
#: 90 degrees of an upright rest pose (angles near 0) or of a rest pose in image space (x or z rotation
#: near 180, e.g. MediaPipe's y-down coordinates); a head never turns 90 degrees away from either while
#: its face is tracked. A fixed range needs no pass over the recording, so any chunk of frames gets the
#: same angles on its own.
ANGLE_RANGE = (-90.0, 270.0)

_WRAPPED = [MOTION_PARAMS.index(name) for name in ("rx", "rz")]


def motion_from_mat(mat: np.ndarray) -> np.ndarray:
    """``(..., 4, 4)`` (or ``(..., 16)``) affines -> ``(..., 12)`` motion parameters (float64, NaN stays NaN),
    with rx and rz in :data:`ANGLE_RANGE`."""
    mat = np.asarray(mat, dtype=np.float64)
    if mat.shape[-1] == 16:
        mat = mat.reshape(mat.shape[:-1] + (4, 4))
    params = decompose_affine(mat)
    low = ANGLE_RANGE[0]
    params[..., _WRAPPED] = (params[..., _WRAPPED] - low) % 360.0 + low
    return params
