"""The contract every reconstruction backend follows (no implementation here).

A backend turns a batch of RGB frames into, for every frame, the faces it found: a mesh in world
(image) space, a local -> world pose, a detection score and the model's codes. The recon stage owns
everything else: reading frames, tracking faces across frames, packing NaN rows for missing faces,
writing regions. A backend declares what it needs and produces as class attributes, so the stage can
place its tasks (``requires_gpu``) and lay out its store (``topology``, ``outputs``) before loading it.

The life cycle on a worker process is::

    backend = Backend.load(device, **options)   # once per process (cached by gmfx)
    backend.reset()                             # at the start of every time segment
    faces = backend.reconstruct(frames, max_faces=n)   # per batch, frames in time order

Backends whose model has a per-person identity (MICA's shape, a fitted 3DMM's identity and texture)
declare it in ``identity``; the stage then runs two passes over each recording::

    found = backend.estimate_identity(frames, max_faces=n)        # pass 1: once per recording, on
                                                                   # ``identity_frames`` evenly spaced frames
    faces = backend.reconstruct(frames, max_faces=n, identities=found)   # pass 2: every segment

and stores each identity once, as ``identity_<code>`` (face, <code>_param), with the frames it used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = ["Backend", "Face", "Identity", "Outputs", "Topology"]


@dataclass(frozen=True, eq=False)
class Topology:
    """The mesh a backend produces: its vertex count, triangles and canonical template.

    Attributes
    ----------
    name
        Identifies the topology (two backends with the same name produce interchangeable meshes).
    template
        ``(n_vertices, 3)`` float32 canonical (local-space) mesh; ``mat`` maps it to world space.
    triangles
        ``(n_triangles, 3)`` int32 vertex indices.
    units
        Units of ``template`` (e.g. ``"cm"``).
    rigid
        ``(n_vertices,)`` bool: the default vertex subset for rigid alignment.
    rigid_weight
        Optional ``(n_vertices,)`` float32 weights of the rigid fit (zero outside ``rigid``).
    """

    name: str
    template: np.ndarray
    triangles: np.ndarray
    units: str
    rigid: np.ndarray
    rigid_weight: np.ndarray | None = None

    @property
    def n_vertices(self) -> int:
        return int(self.template.shape[0])


@dataclass(frozen=True)
class Outputs:
    """What a backend returns besides vertices, pose and score.

    Attributes
    ----------
    codes
        Model code name -> number of parameters (e.g. ``{"shape": 100, "exp": 50}``); stored as
        ``code_<name>`` with dims ``(time, face, <name>_param)``.
    n_landmarks
        Number of sparse landmarks returned per face (0: none).
    """

    codes: Mapping[str, int] = field(default_factory=dict)
    n_landmarks: int = 0


@dataclass(frozen=True, eq=False)
class Face:
    """One face found in one frame.

    Attributes
    ----------
    vertices
        ``(n_vertices, 3)`` world-space vertices (units declared by ``Backend.units``).
    mat
        ``(4, 4)`` local -> world affine (``vertices ~ mat @ template``).
    score
        Detection confidence in ``[0, 1]``.
    codes
        Code name -> ``(n_params,)`` array, exactly the declared ``Outputs.codes``.
    landmarks
        ``(n_landmarks, 3)`` or ``None`` when the backend declares no landmarks.
    identity
        For backends that declare ``Backend.identity``: the index of this face's identity in the
        ``identities`` given to :meth:`Backend.reconstruct` (the stage stores the face in that slot);
        ``None`` otherwise.
    """

    vertices: np.ndarray
    mat: np.ndarray
    score: float
    codes: Mapping[str, np.ndarray] = field(default_factory=dict)
    landmarks: np.ndarray | None = None
    identity: int | None = None


@dataclass(frozen=True, eq=False)
class Identity:
    """One face's identity over a recording, estimated once (:meth:`Backend.estimate_identity`).

    Attributes
    ----------
    codes
        Code name -> ``(n_params,)`` array, exactly the backend's declared ``Backend.identity``.
    frames
        ``(n,)`` int64 indices, into the frames given to ``estimate_identity``, of the frames it used.
    signature
        Optional ``(Backend.identity_signature,)`` float array that tells this face from others in later
        frames (e.g. a face-recognition embedding); stored as ``identity_signature``.
    """

    codes: Mapping[str, np.ndarray]
    frames: np.ndarray
    signature: np.ndarray | None = None


class Backend(ABC):
    """A reconstruction model behind gmfx's recon stage.

    Subclasses set the class attributes and implement :meth:`topology`, :meth:`load` and
    :meth:`reconstruct`. Register one for ``gmfx recon --model NAME`` with an entry point in the
    ``gmfx.models`` group (``NAME = "package.module:Class"``).

    Attributes
    ----------
    name, version
        Model identity, recorded in the store's attributes.
    requires_gpu
        Tasks must run on a worker offering the ``GPU`` resource.
    devices
        Devices the backend can run on (``"cpu"``, ``"cuda"``).
    batch_size
        Preferred number of frames per :meth:`reconstruct` call.
    units
        Units of the world-space vertices (e.g. ``"pixels"``).
    outputs
        Codes and landmarks returned per face.
    derives_vertices
        The vertices are a function of the stored codes and ``mat`` (:meth:`vertices`), so the recon
        store keeps only those unless asked to save the vertices too.
    identity
        Codes fixed per face per recording, name -> size (e.g. ``{"shape": 300}``); ``{}``: no
        identity pass. Such a backend implements :meth:`estimate_identity`, accepts ``identities`` in
        :meth:`reconstruct` and sets ``Face.identity``.
    identity_frames
        How many frames, evenly spaced over the recording, the identity pass reads.
    identity_signature
        Size of ``Identity.signature`` (0: the backend gives none).
    """

    name: ClassVar[str]
    version: ClassVar[str]
    requires_gpu: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    batch_size: ClassVar[int] = 32
    units: ClassVar[str] = "pixels"
    outputs: ClassVar[Outputs] = Outputs()
    derives_vertices: ClassVar[bool] = False
    identity: ClassVar[Mapping[str, int]] = {}
    identity_frames: ClassVar[int] = 32
    identity_signature: ClassVar[int] = 0

    @classmethod
    @abstractmethod
    def topology(cls) -> Topology:
        """The mesh topology (cheap: no model weights are loaded)."""

    @classmethod
    @abstractmethod
    def load(cls, device: str, **options: Any) -> Backend:
        """Load the model on ``device``; gmfx calls this once per worker process and options."""

    @abstractmethod
    def reconstruct(
        self, frames: np.ndarray, *, max_faces: int, identities: Sequence[Identity] = ()
    ) -> list[list[Face]]:
        """Faces found in each frame of ``frames`` (``(n, height, width, 3)`` uint8 RGB, time order).

        Returns one list per frame with at most ``max_faces`` faces, in any order (gmfx tracks them),
        and an empty list for a frame without a face. Backends that declare ``identity`` receive the
        recording's ``identities`` (never empty: a recording without any is not reconstructed), use
        them for every face, and set each ``Face.identity`` to the index of the one it belongs to (at
        most one face per identity and frame); gmfx stores the face in that slot, so no tracking is needed.
        Backends without ``identity`` may leave the parameter out of their signature.
        """

    def estimate_identity(self, frames: np.ndarray, *, max_faces: int) -> list[Identity]:
        """At most ``max_faces`` identities seen in ``frames`` (``(n, h, w, 3)`` uint8 RGB, time order,
        evenly spaced over the recording); ``[]`` when no face is seen. Called once per recording,
        before any :meth:`reconstruct`, by backends that declare ``identity``."""
        raise NotImplementedError(f"the model {self.name!r} declares no identity")

    @classmethod
    def vertices(cls, ds: Any) -> Any:
        """The lazy ``v`` (time, face, vertex, coord) of a recon store ``ds`` written without vertices
        (backends with ``derives_vertices`` implement it)."""
        raise NotImplementedError(f"the model {cls.name!r} stores its vertices")

    def reset(self) -> None:
        """Forget any state carried between frames (called at the start of every time segment)."""

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        """Provenance for the store given the :meth:`load` options (thresholds, library versions).

        JSON-serialisable, and computed without loading the model (it runs in the client process).
        """
        return {}
