"""A tiny real backend with a per-face identity, for testing the two-pass recon stage.

Each face is a bright blob (a connected region of pixels whose brightest channel exceeds 64, at least
:data:`MIN_PIXELS` pixels); its *identity* is the blob's colour. The identity pass finds the faces of
the sampled frames, groups them by colour and takes the per-channel median over the frames (a robust
average); the segments then give every face the identity of the nearest colour and store the
per-frame difference (``code_contrast``), so a test can see which identity a segment used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from gmfx.models import Backend, Face, Identity, Outputs, Topology
from gmfx.models._geometry import affine_matrix

__all__ = ["ColourIdentityBackend", "coloured_blobs"]

#: blobs smaller than this (compression noise) are not faces
MIN_PIXELS = 16


def coloured_blobs(frame: np.ndarray, max_faces: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``max_faces`` largest bright blobs of ``frame``: ``(mask, mean RGB colour)``, largest first."""
    labels, n = ndimage.label(frame.max(axis=2) > 64)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = [k for k in np.argsort(-sizes, kind="stable") if sizes[k] >= MIN_PIXELS][:max_faces]
    return [(labels == k + 1, frame[labels == k + 1].mean(axis=0)) for k in order]


class ColourIdentityBackend(Backend):
    """Bright blobs as faces, their colour as identity (see the module's description).

    Options of :meth:`load`: ``log``, a local file to which every :meth:`estimate_identity` call
    appends ``identity`` and every :meth:`reconstruct` call ``segment`` (resume tests).
    """

    name = "colour-identity"
    version = "1"
    batch_size = 4
    units = "pixels"
    outputs = Outputs(codes={"contrast": 3})
    identity = {"colour": 3}
    identity_frames = 8
    identity_signature = 3

    def __init__(self, log: str | None = None) -> None:
        self.log = log

    @classmethod
    def topology(cls) -> Topology:
        template = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32)
        triangles = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
        return Topology("square", template, triangles, "unit", np.ones(4, bool))

    @classmethod
    def load(cls, device: str, **options: Any) -> ColourIdentityBackend:
        return cls(**options)

    def _note(self, what: str) -> None:
        if self.log:
            with open(self.log, "a") as handle:
                handle.write(what + "\n")

    def estimate_identity(self, frames: np.ndarray, *, max_faces: int) -> list[Identity]:
        self._note("identity")
        found = [coloured_blobs(frame, max_faces) for frame in frames]
        if not any(found):
            return []
        seeds = np.array([colour for _, colour in max(found, key=len)])  # the first frame with most faces
        members: list[list[tuple[int, np.ndarray]]] = [[] for _ in seeds]
        for i, blobs in enumerate(found):
            colours = np.array([colour for _, colour in blobs]).reshape(-1, 3)
            rows, cols = linear_sum_assignment(np.linalg.norm(colours[:, None] - seeds[None], axis=2))
            for row, col in zip(rows, cols):
                members[col].append((i, colours[row]))
        identities = []
        for group in members:
            colour = np.median(np.array([c for _, c in group]), axis=0).astype(np.float32)
            identities.append(Identity({"colour": colour}, np.array([i for i, _ in group], np.int64), colour))
        return identities

    def reconstruct(self, frames: np.ndarray, *, max_faces: int, identities: Sequence[Identity] = ()) -> list[list[Face]]:
        self._note("segment")
        signatures = np.array([identity.signature for identity in identities], np.float64).reshape(-1, 3)
        result = []
        for frame in frames:
            blobs = coloured_blobs(frame, min(max_faces, len(identities)))
            colours = np.array([colour for _, colour in blobs]).reshape(-1, 3)
            rows, cols = linear_sum_assignment(np.linalg.norm(colours[:, None] - signatures[None], axis=2))
            faces = []
            for row, col in zip(rows, cols):
                mask, colour = blobs[row]
                y, x = np.nonzero(mask)
                mat = affine_matrix(max(np.ptp(x), np.ptp(y), 1) / 2 * np.eye(3), np.array([x.mean(), y.mean(), 0.0]))
                vertices = self.topology().template @ mat[:3, :3].T + mat[:3, 3]
                contrast = (colour - identities[col].codes["colour"]).astype(np.float32)
                faces.append(Face(vertices.astype(np.float32), mat.astype(np.float32), float(mask.mean()),
                                  {"contrast": contrast}, identity=int(col)))
            result.append(faces)
        return result
