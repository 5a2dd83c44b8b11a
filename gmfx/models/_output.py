"""The backend output contract: per-frame faces -> the recon store's arrays, checked face by face.

Beside the backend contract (:mod:`gmfx.models._base`) so that a backend and its tests
(:func:`gmfx.testing.check_backend`) use it without importing a stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gmfx._errors import ModelError
from gmfx.models._base import Backend, Face
from gmfx.models._tracking import track_faces

__all__ = ["pack_faces"]


def pack_faces(
    faces: Sequence[Sequence[Face]], backend: type[Backend], *, max_faces: int, first_frame: int = 0, n_identities: int | None = None
) -> dict[str, np.ndarray]:
    """Arrays ``(time, face, ...)`` of the recon store from per-frame faces, tracked to stable slots.

    Frames without a face are NaN rows with ``detected=False``. A face that breaks the backend's
    declared contract (shapes, codes, landmarks, too many faces) raises :class:`ModelError` naming the
    frame (``first_frame`` + its position). Faces of a backend that declares ``identity`` (given
    ``n_identities`` identities) are not tracked: each goes to the slot of its ``Face.identity``.
    """
    n, n_vertices = len(faces), backend.topology().n_vertices
    codes, n_landmarks = dict(backend.outputs.codes), backend.outputs.n_landmarks
    arrays = {
        "v": np.full((n, max_faces, n_vertices, 3), np.nan, np.float32),
        "mat": np.full((n, max_faces, 4, 4), np.nan, np.float32),
        "detected": np.zeros((n, max_faces), bool),
        "score": np.full((n, max_faces), np.nan, np.float32),
        **{f"code_{name}": np.full((n, max_faces, size), np.nan, np.float32) for name, size in codes.items()},
    }
    if n_landmarks:
        arrays["landmarks"] = np.full((n, max_faces, n_landmarks, 3), np.nan, np.float32)
    for i, frame_faces in enumerate(faces):
        _check_faces(frame_faces, backend, max_faces, n_vertices, first_frame + i, n_identities)
    if backend.identity:
        assigned = [[face.identity for face in frame_faces] for frame_faces in faces]
    else:
        centroids = [np.array([f.vertices[:, :2].mean(axis=0) for f in ff]).reshape(-1, 2) for ff in faces]
        sizes = [np.array([np.ptp(f.vertices[:, :2], axis=0).max() for f in ff]) for ff in faces]
        assigned = track_faces(centroids, sizes, max_faces)
    for i, slots in enumerate(assigned):
        for face, slot in zip(faces[i], slots):
            arrays["v"][i, slot] = face.vertices
            arrays["mat"][i, slot] = face.mat
            arrays["detected"][i, slot] = True
            arrays["score"][i, slot] = face.score
            for name in codes:
                arrays[f"code_{name}"][i, slot] = face.codes[name]
            if n_landmarks:
                arrays["landmarks"][i, slot] = face.landmarks
    return arrays


def _check_faces(
    faces: Sequence[Face], backend: type[Backend], max_faces: int, n_vertices: int, frame: int, n_identities: int | None
) -> None:
    def broken(what: str) -> ModelError:
        return ModelError(
            f"the model {backend.name!r} broke its contract: {what}",
            where=f"frame {frame}",
            fix="fix the backend (gmfx.testing.check_backend checks it against the contract)",
        )

    if len(faces) > max_faces:
        raise broken(f"{len(faces)} faces returned with max_faces={max_faces}")
    if backend.identity:
        known = range(min(max_faces, max_faces if n_identities is None else n_identities))
        identities = [face.identity for face in faces]
        if any(i not in known for i in identities) or len(set(identities)) != len(identities):
            raise broken(f"Face.identity {identities}: each face needs its own index into the {len(known)} identities")
    for face in faces:
        if np.shape(face.vertices) != (n_vertices, 3):
            raise broken(f"vertices of shape {np.shape(face.vertices)}, expected ({n_vertices}, 3)")
        if np.shape(face.mat) != (4, 4):
            raise broken(f"mat of shape {np.shape(face.mat)}, expected (4, 4)")
        if not np.isfinite(face.vertices).all():
            raise broken("non-finite vertices for a detected face")
        if set(face.codes) != set(backend.outputs.codes):
            raise broken(f"codes {sorted(face.codes)}, declared {sorted(backend.outputs.codes)}")
        for name, size in backend.outputs.codes.items():
            if np.shape(face.codes[name]) != (size,):
                raise broken(f"code {name!r} of shape {np.shape(face.codes[name])}, declared ({size},)")
        n_landmarks = backend.outputs.n_landmarks
        if n_landmarks and np.shape(face.landmarks) != (n_landmarks, 3):
            raise broken(f"landmarks of shape {np.shape(face.landmarks)}, declared ({n_landmarks}, 3)")
