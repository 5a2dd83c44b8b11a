"""Conformance kit for reconstruction backends: check any backend against gmfx's contract.

::

    from gmfx.testing import check_backend
    check_backend(MyBackend, frames=some_face_frames)   # raises ModelError listing every problem
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from gmfx._errors import ModelError
from gmfx.models import Backend, Face, Outputs, Topology
from gmfx.models._geometry import affine_matrix
from gmfx.models._output import pack_faces

__all__ = ["BrightSquareBackend", "GpuBrightSquareBackend", "check_backend"]


def check_backend(
    backend: type[Backend] | Backend,
    *,
    frames: np.ndarray | None = None,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    max_faces: int = 1,
) -> None:
    """Check ``backend`` (a class, loaded on ``device`` with ``options``, or a loaded instance).

    Checks the declared capabilities, the topology's shapes and dtypes, that blank frames give no
    face, and on ``frames`` (``(n, h, w, 3)`` uint8 showing faces) that every face matches what the
    backend declares (vertices, pose, score in [0, 1], codes, landmarks), that the pose maps the
    template onto the vertices, and that results after :meth:`Backend.reset` do not depend on how the
    frames were split into batches (so retried and resumed tasks write the same bytes).

    Raises
    ------
    ModelError
        Listing every broken rule.
    """
    cls = backend if isinstance(backend, type) else type(backend)
    problems = _class_problems(cls, options or {})
    topology = cls.topology()
    problems += _topology_problems(topology)
    if problems:
        _fail(cls, problems)
    model = backend if not isinstance(backend, type) else cls.load(device, **dict(options or {}))
    if not isinstance(model, cls):
        _fail(cls, [f"load() returned {type(model).__name__}, not a {cls.__name__}"])

    blank = np.zeros((2, 96, 128, 3), np.uint8)
    model.reset()
    if cls.identity:  # the identity pass sees no face in blank frames (the stage then never reconstructs them)
        seen = model.estimate_identity(blank, max_faces=max_faces)
        if seen:
            problems.append(f"blank frames gave {len(seen)} identities, expected none")
        found = [[] for _ in blank]
    else:
        found = model.reconstruct(blank, max_faces=max_faces)
    if len(found) != len(blank) or any(len(faces) for faces in found):
        problems.append(f"blank frames gave {[len(f) for f in found]} faces, expected none")
    else:
        packed = pack_faces(found, cls, max_faces=max_faces)
        if packed["detected"].any() or not np.isnan(packed["v"]).all():
            problems.append("frames without a face must pack to NaN rows with detected=False")

    if frames is not None:
        problems += _face_problems(model, cls, topology, np.asarray(frames), max_faces)
    if problems:
        _fail(cls, problems)


def _class_problems(cls: type, options: Mapping[str, Any]) -> list[str]:
    if not issubclass(cls, Backend):
        return [f"{cls.__name__} is not a gmfx.models.Backend subclass"]
    problems = []
    for attribute, kind in (("name", str), ("version", str), ("units", str), ("requires_gpu", bool), ("batch_size", int)):
        if not isinstance(getattr(cls, attribute, None), kind):
            problems.append(f"class attribute {attribute!r} must be a {kind.__name__}")
    if isinstance(getattr(cls, "batch_size", None), int) and cls.batch_size < 1:
        problems.append("batch_size must be at least 1")
    if not cls.devices or not set(cls.devices) <= {"cpu", "cuda"}:
        problems.append(f"devices {cls.devices!r} must be a non-empty subset of ('cpu', 'cuda')")
    if cls.requires_gpu and "cuda" not in cls.devices:
        problems.append("requires_gpu is true but 'cuda' is not in devices")
    if not isinstance(cls.outputs, Outputs):
        problems.append("outputs must be a gmfx.models.Outputs")
    elif any(not str(name).isidentifier() or size < 1 for name, size in cls.outputs.codes.items()):
        problems.append(f"code names must be identifiers with sizes >= 1: {dict(cls.outputs.codes)}")
    try:
        json.dumps(cls.attrs(**options))
    except (TypeError, ValueError) as error:
        problems.append(f"attrs() must return JSON-serialisable provenance ({error})")
    return problems


def _topology_problems(topology: Topology) -> list[str]:
    if not isinstance(topology, Topology):
        return ["topology() must return a gmfx.models.Topology"]
    problems = []
    template, n = np.asarray(topology.template), topology.n_vertices
    if template.ndim != 2 or template.shape[1] != 3 or template.dtype != np.float32:
        problems.append(f"template must be (n_vertices, 3) float32, got {template.shape} {template.dtype}")
    elif not np.isfinite(template).all():
        problems.append("template has non-finite values")
    triangles = np.asarray(topology.triangles)
    if triangles.ndim != 2 or triangles.shape[1] != 3 or triangles.dtype != np.int32:
        problems.append(f"triangles must be (n_triangles, 3) int32, got {triangles.shape} {triangles.dtype}")
    elif triangles.size and (triangles.min() < 0 or triangles.max() >= n):
        problems.append(f"triangles index vertices outside 0..{n - 1}")
    rigid = np.asarray(topology.rigid)
    if rigid.shape != (n,) or rigid.dtype != bool:
        problems.append(f"rigid must be ({n},) bool, got {rigid.shape} {rigid.dtype}")
    elif rigid.sum() < 3:
        problems.append("rigid must select at least 3 vertices")
    if topology.rigid_weight is not None:
        weight = np.asarray(topology.rigid_weight)
        if weight.shape != (n,) or weight.dtype != np.float32:
            problems.append(f"rigid_weight must be ({n},) float32, got {weight.shape} {weight.dtype}")
        elif (weight < 0).any() or (rigid.shape == (n,) and (weight[~rigid] != 0).any()):
            problems.append("rigid_weight must be >= 0 and zero outside rigid")
    if not topology.name or not topology.units:
        problems.append("topology needs a name and the template's units")
    return problems


def _face_problems(model: Backend, cls: type[Backend], topology: Topology, frames: np.ndarray, max_faces: int) -> list[str]:
    extra: dict[str, Any] = {}
    if cls.identity:
        model.reset()
        identities = model.estimate_identity(frames, max_faces=max_faces)
        if not identities:
            return ["estimate_identity found no face in the given face frames"]
        extra = {"identities": identities, "n_identities": len(identities)}
    model.reset()
    whole = model.reconstruct(frames, max_faces=max_faces, **{k: v for k, v in extra.items() if k == "identities"})
    try:
        packed = pack_faces(whole, cls, max_faces=max_faces, n_identities=extra.get("n_identities"))
    except ModelError as error:
        return [error.what + f" ({error.where})"]
    problems = []
    if not packed["detected"].any():
        problems.append("no face found in the given face frames")
    scores = packed["score"][packed["detected"]]
    if not ((scores >= 0) & (scores <= 1)).all():
        problems.append(f"scores outside [0, 1]: {scores[(scores < 0) | (scores > 1)][:5]}")
    rigid = np.asarray(topology.rigid)
    template = np.asarray(topology.template, dtype=np.float64)
    for t, face in zip(*np.nonzero(packed["detected"])):
        mat = packed["mat"][t, face].astype(np.float64)
        vertices = packed["v"][t, face, rigid].astype(np.float64)
        mapped = template[rigid] @ mat[:3, :3].T + mat[:3, 3]
        extent = np.ptp(vertices, axis=0).max()
        error = np.sqrt(((mapped - vertices) ** 2).sum(axis=1).mean())
        if not np.isfinite(mat).all() or error > 0.25 * extent:
            problems.append(f"frame {t}: mat does not map the template onto the vertices (rms {error:.3g})")
            break
    half = max(1, len(frames) // 2)
    model.reset()
    given = {k: v for k, v in extra.items() if k == "identities"}
    split = model.reconstruct(frames[:half], max_faces=max_faces, **given) + model.reconstruct(frames[half:], max_faces=max_faces, **given)
    again = pack_faces(split, cls, max_faces=max_faces, n_identities=extra.get("n_identities"))
    for name, values in packed.items():
        if not np.array_equal(values, again[name], equal_nan=values.dtype.kind == "f"):
            problems.append(f"{name} differs when the frames come in two batches after reset()")
    return problems


def _fail(cls: type, problems: list[str]) -> None:
    raise ModelError(
        f"the backend {getattr(cls, 'name', cls.__name__)!r} breaks gmfx's backend contract:\n    - "
        + "\n    - ".join(problems),
        where=f"{cls.__module__}.{cls.__qualname__}",
        fix="see gmfx.models.Backend for the contract",
    )


class BrightSquareBackend(Backend):
    """A tiny real backend for testing pipelines: a square mesh around a frame's bright pixels.

    A frame whose pixels are all dark (mean RGB <= 64) has no face. Options of :meth:`load`:

    ``log``
        A local file to which every :meth:`reconstruct` call appends the address of the Dask worker
        running it (placement tests).
    ``exit_once``
        A local marker file: the second :meth:`reconstruct` call of a process exits the process at
        once (as a crash would) unless the marker exists, and creates it first, so exactly one
        worker dies once in the middle of a task (fault-tolerance tests).
    """

    name = "bright-square"
    version = "1"
    batch_size = 4
    units = "pixels"
    outputs = Outputs(codes={"brightness": 1})

    def __init__(self, log: str | None = None, exit_once: str | None = None) -> None:
        self.log = log
        self.exit_once = exit_once
        self.calls = 0

    @classmethod
    def topology(cls) -> Topology:
        template = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32)
        triangles = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
        return Topology("square", template, triangles, "unit", np.ones(4, bool))

    @classmethod
    def load(cls, device: str, **options: Any) -> BrightSquareBackend:
        return cls(**options)

    def reconstruct(self, frames: np.ndarray, *, max_faces: int) -> list[list[Face]]:
        self.calls += 1
        if self.log:
            from distributed import get_worker

            with open(self.log, "a") as handle:
                handle.write(get_worker().address + "\n")
        if self.exit_once and self.calls == 2 and not os.path.exists(self.exit_once):
            open(self.exit_once, "w").close()
            os._exit(1)
        return [self._frame(frame) for frame in frames]

    def _frame(self, frame: np.ndarray) -> list[Face]:
        bright = frame.mean(axis=2) > 64
        if not bright.any():
            return []
        y, x = np.nonzero(bright)
        mat = affine_matrix(max(np.ptp(x), np.ptp(y), 1) / 2 * np.eye(3), np.array([x.mean(), y.mean(), 0.0]))
        vertices = self.topology().template @ mat[:3, :3].T + mat[:3, 3]
        brightness = np.array([frame.mean()], np.float32)
        return [Face(vertices.astype(np.float32), mat.astype(np.float32), float(bright.mean()), {"brightness": brightness})]


class GpuBrightSquareBackend(BrightSquareBackend):
    """:class:`BrightSquareBackend` declaring that it needs a GPU (it computes on the CPU all the same)."""

    name = "bright-square-gpu"
    requires_gpu = True
    devices = ("cuda",)
