"""FLAME: the model file, its landmark embedding, and a batched torch layer (gmfx's own).

The layer follows the published FLAME equations (Li et al. 2017, "Learning a model of facial shape
and expression from 4D scans"), written from them:

1. ``v_shaped = v_template + shapedirs[:, :, :n_shape] @ shape + shapedirs[:, :, 300:300+n_exp] @ expression``
2. joints ``J = J_regressor @ v_shaped`` (5 joints: global, neck, jaw, left eye, right eye)
3. Rodrigues rotations of the 15 pose values; pose blendshapes from ``(R_k - I)`` of the 4 non-root joints
4. linear blend skinning along the kinematic tree ``parents = [-1, 0, 1, 1, 1]``.

The file is FLAME 2020 (``generic_model.pkl``), FLAME 2023 (``flame2023*.pkl``) or FLAME 2023 Open,
read by :mod:`gmfx.models._pickle` (never ``pickle.load``), or the ``.npz`` that ``gmfx models
import-flame`` writes from one of them. Every key is checked for presence and shape.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from gmfx._errors import ModelError
from gmfx.models._pickle import Record, load_pickle, read_npy_object

__all__ = [
    "FLAME_KEYS",
    "FlameLayer",
    "FlameModel",
    "LandmarkEmbedding",
    "contour_rows",
    "read_flame",
    "read_landmark_embedding",
    "rodrigues",
    "write_flame_npz",
]

#: identity components stored before the expression components in every FLAME file's ``shapedirs``
N_IDENTITY = 300
N_JOINTS = 5
#: FLAME's kinematic tree: global (root), neck, jaw, left eye, right eye
PARENTS = (-1, 0, 1, 1, 1)
FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


@dataclass(frozen=True, eq=False)
class FlameModel:
    """The arrays of one FLAME model file (float32 geometry, int64 triangles)."""

    v_template: np.ndarray  # (V, 3) metres
    shapedirs: np.ndarray  # (V, 3, 300 + n_expression)
    posedirs: np.ndarray  # (V, 3, 36)
    j_regressor: np.ndarray  # (5, V) dense
    weights: np.ndarray  # (V, 5)
    parents: np.ndarray  # (5,) int64, parents[0] == -1
    faces: np.ndarray  # (F, 3) int64

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_expression(self) -> int:
        return int(self.shapedirs.shape[2] - N_IDENTITY)


def _dense(value: Any, key: str, where: str) -> np.ndarray:
    """The array behind a pickled value: an ndarray, a chumpy ``Ch`` (state ``x``) or a SciPy sparse matrix."""
    if isinstance(value, Record):
        state = value.state if isinstance(value.state, dict) else {}
        if value.module.startswith("chumpy") and "x" in state:
            return np.asarray(state["x"])
        if value.module.startswith("scipy.sparse") and {"data", "indices", "indptr"} <= set(state):
            import scipy.sparse

            shape = state.get("_shape", state.get("shape"))
            kind = scipy.sparse.csr_matrix if value.name.startswith("csr") else scipy.sparse.csc_matrix
            return kind((state["data"], state["indices"], state["indptr"]), shape=shape).toarray()
        raise ModelError(
            f"the FLAME key {key!r} holds a {value.module}.{value.name} gmfx cannot read",
            where=where,
            fix="use the FLAME file as downloaded from flame.is.tue.mpg.de",
        )
    if hasattr(value, "toarray"):
        return value.toarray()
    return np.asarray(value)


def _check_shape(array: np.ndarray, expected: tuple, key: str, where: str) -> None:
    if array.ndim != len(expected) or any(e is not None and a != e for a, e in zip(array.shape, expected)):
        shown = tuple("N" if e is None else e for e in expected)
        raise ModelError(
            f"the FLAME key {key!r} has shape {array.shape}, expected {shown}",
            where=where,
            fix="use an unmodified FLAME 2020/2023 file (generic_model.pkl, flame2023.pkl, flame2023_Open.pkl)",
        )


def flame_from_dict(data: dict, *, where: str) -> FlameModel:
    """Check and convert the dict of a FLAME file (pickle or imported npz) into a :class:`FlameModel`."""
    if not isinstance(data, dict):
        raise ModelError(f"the file holds a {type(data).__name__}, not FLAME's dict", where=where, fix="check the file")
    missing = [key for key in FLAME_KEYS if key not in data]
    if missing:
        raise ModelError(
            f"the FLAME file lacks the keys {', '.join(missing)}",
            where=where,
            fix="use an unmodified FLAME 2020/2023 file (generic_model.pkl, flame2023.pkl, flame2023_Open.pkl)",
        )
    arrays = {key: _dense(data[key], key, where) for key in FLAME_KEYS}
    template = arrays["v_template"]
    _check_shape(template, (None, 3), "v_template", where)
    n = template.shape[0]
    _check_shape(arrays["shapedirs"], (n, 3, None), "shapedirs", where)
    if arrays["shapedirs"].shape[2] <= N_IDENTITY:
        raise ModelError(
            f"the FLAME key 'shapedirs' has {arrays['shapedirs'].shape[2]} components, expected 300 identity + expression",
            where=where,
            fix="use a full FLAME file (300 shape + 100 expression components)",
        )
    _check_shape(arrays["posedirs"], (n, 3, 9 * (N_JOINTS - 1)), "posedirs", where)
    _check_shape(arrays["J_regressor"], (N_JOINTS, n), "J_regressor", where)
    _check_shape(arrays["weights"], (n, N_JOINTS), "weights", where)
    _check_shape(arrays["kintree_table"], (2, N_JOINTS), "kintree_table", where)
    _check_shape(arrays["f"], (None, 3), "f", where)
    parents = arrays["kintree_table"][0].astype(np.int64)
    parents[0] = -1
    if tuple(parents) != PARENTS:
        raise ModelError(
            f"the FLAME kinematic tree has parents {parents.tolist()}, expected {list(PARENTS)}",
            where=where,
            fix="use an unmodified FLAME file",
        )
    faces = arrays["f"].astype(np.int64)
    if faces.min() < 0 or faces.max() >= n:
        raise ModelError(f"the FLAME triangles index outside the {n} vertices", where=where, fix="use an unmodified FLAME file")
    f32 = np.float32
    return FlameModel(
        v_template=template.astype(f32),
        shapedirs=arrays["shapedirs"].astype(f32),
        posedirs=arrays["posedirs"].astype(f32),
        j_regressor=arrays["J_regressor"].astype(f32),
        weights=arrays["weights"].astype(f32),
        parents=parents,
        faces=faces,
    )


def read_flame(data: bytes, *, where: str) -> FlameModel:
    """A FLAME model from the bytes of its ``.pkl`` (restricted unpickler) or imported ``.npz``."""
    if data[:4] == b"PK\x03\x04":  # an npz written by write_flame_npz
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                content = {key: npz[key] for key in npz.files}
        except Exception as error:  # noqa: BLE001 - zipfile/numpy raise many types on broken files
            raise ModelError(
                f"the FLAME .npz cannot be read ({type(error).__name__}: {error})",
                where=where,
                fix="import the FLAME .pkl again with `gmfx models import-flame`",
            ) from None
        content["J_regressor"] = content.pop("j_regressor", content.get("J_regressor"))
        content["kintree_table"] = np.stack([content.pop("parents"), np.arange(N_JOINTS)]) if "parents" in content else None
        content["f"] = content.pop("faces", None)
        return flame_from_dict({k: v for k, v in content.items() if v is not None}, where=where)
    return flame_from_dict(load_pickle(data, where=where), where=where)


def write_flame_npz(model: FlameModel, file: Any) -> None:
    """Write ``model`` as a plain ``.npz`` (no pickles; what ``gmfx models import-flame`` produces)."""
    np.savez(file, **{f.name: getattr(model, f.name) for f in fields(model)})


# -- landmark embedding --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LandmarkEmbedding:
    """Where FLAME's 68 landmarks sit on the mesh: a triangle and barycentric coordinates each.

    ``static`` 51 inner points; ``dynamic`` 79 rows of 17 contour points, one row per head yaw;
    ``full`` the 68 points of the frontal 3D landmarks.
    """

    static_faces: np.ndarray  # (51,) int64
    static_bary: np.ndarray  # (51, 3) float32
    dynamic_faces: np.ndarray  # (79, 17) int64
    dynamic_bary: np.ndarray  # (79, 17, 3) float32
    full_faces: np.ndarray  # (68,) int64
    full_bary: np.ndarray  # (68, 3) float32


_EMBEDDING_KEYS = {
    "static_lmk_faces_idx": (51,),
    "static_lmk_bary_coords": (51, 3),
    "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3),
    "full_lmk_faces_idx": (1, 68),
    "full_lmk_bary_coords": (1, 68, 3),
}


def read_landmark_embedding(data: bytes, *, where: str, n_faces: int | None = None) -> LandmarkEmbedding:
    """DECA's ``landmark_embedding.npy`` (a pickled dict holding arrays and torch tensors)."""
    content = read_npy_object(data, where=where)
    if not isinstance(content, dict):
        raise ModelError("the landmark embedding is not a dict", where=where, fix="use DECA's landmark_embedding.npy")
    missing = [key for key in _EMBEDDING_KEYS if key not in content]
    if missing:
        raise ModelError(
            f"the landmark embedding lacks the keys {', '.join(missing)}",
            where=where,
            fix="use DECA's data/landmark_embedding.npy",
        )
    arrays = {}
    for key, shape in _EMBEDDING_KEYS.items():
        value = content[key]
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.shape != shape:
            raise ModelError(
                f"the landmark embedding key {key!r} has shape {array.shape}, expected {shape}",
                where=where,
                fix="use DECA's data/landmark_embedding.npy",
            )
        arrays[key] = array
    embedding = LandmarkEmbedding(
        static_faces=arrays["static_lmk_faces_idx"].astype(np.int64),
        static_bary=arrays["static_lmk_bary_coords"].astype(np.float32),
        dynamic_faces=arrays["dynamic_lmk_faces_idx"].astype(np.int64),
        dynamic_bary=arrays["dynamic_lmk_bary_coords"].astype(np.float32),
        full_faces=arrays["full_lmk_faces_idx"][0].astype(np.int64),
        full_bary=arrays["full_lmk_bary_coords"][0].astype(np.float32),
    )
    if n_faces is not None:
        largest = max(int(embedding.static_faces.max()), int(embedding.dynamic_faces.max()), int(embedding.full_faces.max()))
        if largest >= n_faces or min(embedding.static_faces.min(), embedding.dynamic_faces.min(), embedding.full_faces.min()) < 0:
            raise ModelError(
                f"the landmark embedding names triangle {largest}, but the FLAME mesh has {n_faces}",
                where=where,
                fix="use the landmark embedding that belongs to this FLAME version",
            )
    return embedding


# -- the layer -----------------------------------------------------------------------------------
def rodrigues(axis_angle: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(..., 3, 3)`` rotation matrices of ``(..., 3)`` axis-angle vectors.

    ``R = I + sin(t) K + (1 - cos(t)) K^2`` with ``t = |r + eps|`` (the ``eps`` shift keeps zero
    rotations differentiable, as DECA's layer does; it changes R by under 1e-7).
    """
    angle = torch.linalg.vector_norm(axis_angle + eps, dim=-1, keepdim=True)
    axis = axis_angle / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis.shape[:-1], 3, 3)
    sin, cos = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin * k + (1 - cos) * (k @ k)


def contour_rows(rotations: torch.Tensor) -> torch.Tensor:
    """The dynamic-contour row (0..78) for each head: from the yaw of ``R_global @ R_neck``.

    ``rotations`` is ``(B, 5, 3, 3)``. The yaw (euler y, ``atan2(-R20, hypot(R00, R10))``) in degrees
    is rounded after clamping at 39; yaws 0..39 pick rows 0..39, -1..-39 rows 40..78, below -39 row 78.
    """
    relative = rotations[:, 0] @ rotations[:, 1]
    yaw = torch.atan2(-relative[:, 2, 0], torch.hypot(relative[:, 0, 0], relative[:, 1, 0]))
    degrees = torch.round(torch.clamp(torch.rad2deg(yaw), max=39)).long()
    negative = torch.where(degrees < -39, torch.full_like(degrees, 78), 39 - degrees)
    return torch.where(degrees < 0, negative, degrees)


class FlameLayer(torch.nn.Module):
    """FLAME as a batched torch module: codes -> vertices (metres) and landmarks.

    ``n_shape`` identity and ``n_expression`` expression components are used (DECA: 100 and 50).
    Inputs are ``(B, n)`` tensors; pose is axis-angle: ``global_pose`` (3), ``neck`` (3), ``jaw`` (3)
    and ``eyes`` (6, left then right); missing ones are zero.
    """

    def __init__(self, model: FlameModel, *, n_shape: int = 100, n_expression: int = 50, embedding: LandmarkEmbedding | None = None) -> None:
        super().__init__()
        if not 0 < n_shape <= N_IDENTITY or not 0 < n_expression <= model.n_expression:
            raise ModelError(
                f"FLAME has {N_IDENTITY} shape and {model.n_expression} expression components; "
                f"{n_shape} and {n_expression} were asked for",
                where="FLAME layer",
                fix="ask for at most 300 shape and the file's expression components",
            )
        self.n_shape, self.n_expression, self.n_vertices = n_shape, n_expression, model.n_vertices
        dirs = np.concatenate([model.shapedirs[:, :, :n_shape], model.shapedirs[:, :, N_IDENTITY : N_IDENTITY + n_expression]], axis=2)
        self.register_buffer("v_template", torch.from_numpy(model.v_template))
        self.register_buffer("shapedirs", torch.from_numpy(np.ascontiguousarray(dirs.reshape(-1, dirs.shape[2]).T)))  # (K, V*3)
        self.register_buffer("posedirs", torch.from_numpy(np.ascontiguousarray(model.posedirs.reshape(-1, 36).T)))  # (36, V*3)
        self.register_buffer("j_regressor", torch.from_numpy(model.j_regressor))
        self.register_buffer("weights", torch.from_numpy(model.weights))
        self.register_buffer("faces", torch.from_numpy(model.faces))
        self.parents = tuple(int(p) for p in model.parents)
        self.embedding = embedding
        if embedding is not None:
            for name in ("static_faces", "static_bary", "dynamic_faces", "dynamic_bary", "full_faces", "full_bary"):
                self.register_buffer(f"lmk_{name}", torch.from_numpy(getattr(embedding, name)))

    def full_pose(self, batch: int, reference: torch.Tensor, global_pose=None, neck=None, jaw=None, eyes=None) -> torch.Tensor:
        """``(B, 15)`` pose of the five joints, zeros where not given."""
        parts = []
        for value, size in ((global_pose, 3), (neck, 3), (jaw, 3), (eyes, 6)):
            parts.append(reference.new_zeros(batch, size) if value is None else value.to(reference))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        shape: torch.Tensor,
        expression: torch.Tensor,
        *,
        global_pose: torch.Tensor | None = None,
        neck: torch.Tensor | None = None,
        jaw: torch.Tensor | None = None,
        eyes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(vertices (B, V, 3), rotations (B, 5, 3, 3), rest joints (B, 5, 3))``."""
        batch = shape.shape[0]
        betas = torch.cat([shape, expression], dim=1).to(self.v_template)
        pose = self.full_pose(batch, betas, global_pose, neck, jaw, eyes)
        v_shaped = self.v_template + (betas @ self.shapedirs).view(batch, -1, 3)
        joints = torch.einsum("jv,bvk->bjk", self.j_regressor, v_shaped)
        rotations = rodrigues(pose.view(batch, N_JOINTS, 3))
        eye = torch.eye(3, dtype=betas.dtype, device=betas.device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(batch, -1, 3)
        transforms = self._skinning_transforms(rotations, joints)  # (B, 5, 3, 4)
        blended = torch.einsum("vj,bjrc->bvrc", self.weights, transforms)
        vertices = (blended[..., :3] @ v_posed[..., None])[..., 0] + blended[..., 3]
        return vertices, rotations, joints

    def _skinning_transforms(self, rotations: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Each joint's world transform relative to its rest position, ``(B, 5, 3, 4)``."""
        world_r, world_t = [], []
        for k, parent in enumerate(self.parents):
            if parent < 0:
                world_r.append(rotations[:, k])
                world_t.append(joints[:, k])
            else:
                offset = joints[:, k] - joints[:, parent]
                world_r.append(world_r[parent] @ rotations[:, k])
                world_t.append((world_r[parent] @ offset[..., None])[..., 0] + world_t[parent])
        r = torch.stack(world_r, dim=1)
        t = torch.stack(world_t, dim=1) - (r @ joints[..., None])[..., 0]
        return torch.cat([r, t[..., None]], dim=-1)

    def _points(self, vertices: torch.Tensor, faces: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
        """Barycentric points: ``faces`` ``(B, L)`` triangle ids, ``bary`` ``(B, L, 3)``."""
        corners = self.faces[faces]  # (B, L, 3)
        batch = torch.arange(vertices.shape[0], device=vertices.device)[:, None, None]
        return (vertices[batch, corners] * bary[..., None].to(vertices)).sum(dim=2)

    def landmarks(self, vertices: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """The 68 landmarks ``(B, 68, 3)``: 17 contour points chosen by head yaw, then the 51 static ones."""
        if self.embedding is None:
            raise ModelError("this FLAME layer has no landmark embedding", where="FLAME layer", fix="pass embedding=")
        batch = vertices.shape[0]
        rows = contour_rows(rotations)
        faces = torch.cat([self.lmk_dynamic_faces[rows], self.lmk_static_faces.expand(batch, -1)], dim=1)
        bary = torch.cat([self.lmk_dynamic_bary[rows], self.lmk_static_bary.expand(batch, -1, -1)], dim=1)
        return self._points(vertices, faces, bary)

    def landmarks3d(self, vertices: torch.Tensor) -> torch.Tensor:
        """The 68 frontal 3D landmarks ``(B, 68, 3)`` of the ``full`` embedding."""
        batch = vertices.shape[0]
        return self._points(vertices, self.lmk_full_faces.expand(batch, -1), self.lmk_full_bary.expand(batch, -1, -1))
