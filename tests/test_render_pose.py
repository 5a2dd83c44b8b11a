"""Out-of-plane pose ground truth: the astronaut's face mesh, textured from the photo, rendered at known
yaw and pitch and reconstructed by MediaPipe through gmfx.

Measured (2026-11, MediaPipe 0.10.14, the errors are angles of ``R_est R_true^T`` between rotations
relative to the frontal render):

======  =====  ==========  ====================
 yaw    pitch   error (°)   estimated yaw/pitch
======  =====  ==========  ====================
 ±15      0     3.6 - 4.0   ±11.0 - 11.8
 ±30      0     9.6 - 9.8   ±20.4 - 20.9
  0     ±10     0.3 - 2.7   -7.3 / +9.7
  0     ±20     1.3 - 2.8   -17.2 / +19.2
======  =====  ==========  ====================

MediaPipe recovers pitch within 3 degrees but underestimates yaw by about a third (its depth, from
which the rendered face is built, is flatter than the canonical model it is fitted to).
"""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gmfx.models import get_backend
from gmfx.render._qc import _pure_rotations
from gmfx.testing._render import rotation, textured_face

pytest.importorskip("skimage")

POSES = [(0, 0), (-30, 0), (-15, 0), (15, 0), (30, 0), (0, -20), (0, -10), (0, 10), (0, 20)]


@pytest.fixture(scope="module")
def estimates():
    from skimage.data import astronaut

    photo = astronaut()
    backend_class = get_backend("mediapipe")
    backend = backend_class.load("cpu")
    tris = backend_class.topology().triangles
    (photo_face,) = backend.reconstruct(photo[None], max_faces=1)[0]
    mats = []
    for yaw, pitch in POSES:
        render = textured_face(photo, photo_face.vertices, tris, rotation(yaw, pitch))
        backend.reset()  # each render is a still, not the next frame of a video
        (face,) = backend.reconstruct(render[None], max_faces=1)[0]
        mats.append(face.mat)
    rotations = _pure_rotations(np.asarray(mats, np.float64)[:, :3, :3])
    return [rotations[k] @ rotations[0].T for k in range(len(POSES))]  # relative to the frontal render


@pytest.mark.slow
def test_mediapipe_recovers_out_of_plane_pose_of_a_rendered_face(estimates):
    rows = []
    for (yaw, pitch), relative in zip(POSES, estimates):
        error = np.rad2deg(Rotation.from_matrix(relative @ rotation(yaw, pitch).T).magnitude())
        about_x, about_y, _ = np.rad2deg(Rotation.from_matrix(relative).as_rotvec())
        rows.append((yaw, pitch, error, about_y, about_x))
        print(f"yaw {yaw:+3d} pitch {pitch:+3d}: error {error:4.1f} deg (estimated yaw {about_y:+5.1f}, pitch {about_x:+5.1f})")
    for yaw, pitch, error, about_y, about_x in rows:
        if yaw == 0:  # pitch alone: within 4 degrees
            assert error < 4.0
        else:  # yaw: the right sign, between half and all of the true angle
            assert 0.5 < about_y / yaw < 1.05 and abs(about_x) < 5
    yaws = [about_y for yaw, pitch, _, about_y, _ in sorted(rows) if pitch == 0]
    assert np.all(np.diff(yaws) > 0)  # monotonic in the true yaw
