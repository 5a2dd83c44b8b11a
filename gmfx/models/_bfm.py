"""The Basel Face Model (BFM 2009 + Guo et al.'s expression bases) as Deep3DFaceRecon and 3DMM
fitting use it: the model file, and a batched, differentiable torch layer (gmfx's own).

The file is ``BFM_model_front.mat`` (Deep3DFaceRecon) or ``BFM09_model_info.mat`` (3DMM-Fitting):
the same MATLAB 5 keys under two names, written by both projects from the user's BFM 2009 files
(:mod:`gmfx.models._bfm_convert` does the same). 35709 vertices in decimetres; MATLAB's 1-based
indices become 0-based here, and ``point_buf``'s padding id (``F + 1``) becomes ``F``: a zero normal.

The layer follows the published model (Paysan et al. 2009; Deng et al. 2019, section 3):

* shape ``S = mean + idBase @ id + exBase @ exp`` with the mean re-centred to zero centroid;
* albedo ``T = (meantex + texBase @ tex) / 255``;
* vertex normals: the normalised sum of the unit normals of each vertex's triangles (``point_buf``);
* rotation ``R = Rz(c) Ry(b) Rx(a)`` from ``angle = (a, b, c)`` radians, posed ``P = S R^T + trans``;
* Lambertian colour under 27 spherical-harmonic coefficients (9 bands x RGB, band 0 offset by 0.8);
* a pinhole camera on the z axis at ``camera_distance`` (10 dm) looking down ``-z``:
  ``u = focal x / (10 - z) + centre``, ``v = focal y / (10 - z) + centre`` with ``v`` pointing up;
* the 68 landmarks are the vertices ``keypoints``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from gmfx._errors import ModelError
from gmfx.models._files import ModelFile, read_model_file
from gmfx.storage import Location

__all__ = [
    "BFM_CODES",
    "BFM_FILE",
    "BfmLayer",
    "BfmModel",
    "bfm_from_dict",
    "euler_rotation",
    "load_bfm",
    "merge_coefficients",
    "read_bfm",
    "split_coefficients",
]

#: the 257 coefficients of Deep3DFaceRecon and 3DMM fitting: name -> size, in order
BFM_CODES = {"id": 80, "exp": 64, "tex": 80, "angle": 3, "gamma": 27, "trans": 3}
#: keys every loader reads (``is_train=False`` in Deep3DFaceRecon), then the optional training masks
REQUIRED_KEYS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri", "point_buf", "keypoints")
OPTIONAL_KEYS = ("tri_mask2", "frontmask2_idx", "skinmask")
N_KEYPOINTS = 68
#: band-0 offset of the lighting (both projects): zero coefficients light the face evenly at 0.8
AMBIENT_INIT = 0.8
FOCAL = 1015.0
CENTRE = 112.0
CAMERA_DISTANCE = 10.0
_FIX = "use BFM_model_front.mat / BFM09_model_info.mat as Deep3DFaceRecon or 3DMM-Fitting write it, or `gmfx models import-bfm`"

BFM_FILE = ModelFile(
    "bfm",
    ("BFM/BFM_model_front.mat", "BFM/BFM09_model_info.mat"),
    "BFM front model (BFM 2009 + expression bases)",
    "register at https://faces.dmi.unibas.ch/bfm/ for BFM 2009 (01_MorphableModel.mat), take Exp_Pca.bin from "
    "https://github.com/Juyong/3DFace and the BFM/ folder of https://github.com/sicxu/Deep3DFaceRecon_pytorch, then "
    "`gmfx models import-bfm FOLDER` writes BFM/BFM_model_front.mat (or copy the BFM_model_front.mat Deep3DFaceRecon made)",
)


@dataclass(frozen=True, eq=False)
class BfmModel:
    """The arrays of one BFM front-model file: float32 geometry, 0-based int64 indices."""

    meanshape: np.ndarray  # (N, 3) decimetres, as stored (not re-centred)
    id_base: np.ndarray  # (N, 3, K_id)
    exp_base: np.ndarray  # (N, 3, K_exp)
    meantex: np.ndarray  # (N, 3) 0..255
    tex_base: np.ndarray  # (N, 3, K_tex)
    triangles: np.ndarray  # (F, 3)
    point_buf: np.ndarray  # (N, K) triangle ids per vertex; F = padding
    keypoints: np.ndarray  # (68,) vertex ids
    skinmask: np.ndarray | None = None  # (N,) bool
    front_triangles: np.ndarray | None = None  # (F2, 3), tri_mask2
    front_vertices: np.ndarray | None = None  # (M,), frontmask2_idx

    @property
    def n_vertices(self) -> int:
        return int(self.meanshape.shape[0])

    @property
    def sizes(self) -> dict[str, int]:
        return {"id": self.id_base.shape[2], "exp": self.exp_base.shape[2], "tex": self.tex_base.shape[2]}


def _shape_error(key: str, shape: tuple, expected: str, where: str) -> ModelError:
    return ModelError(f"the BFM key {key!r} has shape {shape}, expected {expected}", where=where, fix=_FIX)


def _indices(array: np.ndarray, key: str, where: str, *, upper: int, ndim_shape: tuple) -> np.ndarray:
    """1-based MATLAB ids (stored as floats) -> 0-based int64, checked to lie in ``1..upper``."""
    values = np.asarray(array, dtype=np.float64)
    if values.size and (not np.all(np.isfinite(values)) or np.any(values != np.round(values))):
        raise ModelError(f"the BFM key {key!r} holds non-integer ids", where=where, fix=_FIX)
    ids = values.astype(np.int64).reshape(ndim_shape)
    if ids.size and (ids.min() < 1 or ids.max() > upper):
        raise ModelError(
            f"the BFM key {key!r} holds ids {ids.min()}..{ids.max()}, expected 1-based ids 1..{upper}",
            where=where,
            fix=_FIX,
        )
    return ids - 1


def bfm_from_dict(data: dict[str, Any], *, where: str) -> BfmModel:
    """Check and convert the keys of a BFM front-model file (as ``scipy.io.loadmat`` returns them)."""
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ModelError(f"the BFM file lacks the keys {', '.join(missing)}", where=where, fix=_FIX)
    arrays = {key: np.asarray(data[key]) for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if key in data}
    mean = arrays["meanshape"]
    if mean.ndim != 2 or 1 not in mean.shape or mean.size % 3:
        raise _shape_error("meanshape", mean.shape, "(1, 3N)", where)
    n3 = mean.size
    n = n3 // 3
    bases = {}
    for key in ("idBase", "exBase", "texBase"):
        base = arrays[key]
        if base.ndim != 2 or base.shape[0] != n3 or base.shape[1] < 1:
            raise _shape_error(key, base.shape, f"({n3}, K) for the {n} vertices of meanshape", where)
        bases[key] = base.astype(np.float32).reshape(n, 3, base.shape[1])
    if arrays["meantex"].size != n3:
        raise _shape_error("meantex", arrays["meantex"].shape, f"(1, {n3})", where)
    tri = arrays["tri"]
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise _shape_error("tri", tri.shape, "(F, 3)", where)
    n_tri = tri.shape[0]
    triangles = _indices(tri, "tri", where, upper=n, ndim_shape=tri.shape)
    buf = arrays["point_buf"]
    if buf.ndim != 2 or buf.shape[0] != n:
        raise _shape_error("point_buf", buf.shape, f"({n}, K)", where)
    point_buf = _indices(buf, "point_buf", where, upper=n_tri + 1, ndim_shape=buf.shape)  # F + 1: padding
    keypoints = arrays["keypoints"]
    if keypoints.size != N_KEYPOINTS:
        raise _shape_error("keypoints", keypoints.shape, f"(1, {N_KEYPOINTS})", where)
    optional: dict[str, np.ndarray | None] = {"skinmask": None, "front_triangles": None, "front_vertices": None}
    if "skinmask" in arrays:
        if arrays["skinmask"].size != n:
            raise _shape_error("skinmask", arrays["skinmask"].shape, f"(1, {n})", where)
        optional["skinmask"] = arrays["skinmask"].reshape(n) > 0
    if "tri_mask2" in arrays:
        mask = arrays["tri_mask2"]
        if mask.ndim != 2 or mask.shape[1] != 3:
            raise _shape_error("tri_mask2", mask.shape, "(F2, 3)", where)
        optional["front_triangles"] = _indices(mask, "tri_mask2", where, upper=n, ndim_shape=mask.shape)
    if "frontmask2_idx" in arrays:
        front = arrays["frontmask2_idx"]
        optional["front_vertices"] = _indices(front, "frontmask2_idx", where, upper=n, ndim_shape=(front.size,))
    return BfmModel(
        meanshape=mean.astype(np.float32).reshape(n, 3),
        id_base=bases["idBase"],
        exp_base=bases["exBase"],
        meantex=arrays["meantex"].astype(np.float32).reshape(n, 3),
        tex_base=bases["texBase"],
        triangles=triangles,
        point_buf=point_buf,
        keypoints=_indices(keypoints, "keypoints", where, upper=n, ndim_shape=(N_KEYPOINTS,)),
        **optional,
    )


def read_bfm(data: bytes, *, where: str) -> BfmModel:
    """A :class:`BfmModel` from the bytes of ``BFM_model_front.mat`` / ``BFM09_model_info.mat``."""
    import scipy.io

    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - scipy raises many types on broken or v7.3 (HDF5) files
        raise ModelError(f"the BFM file cannot be read as a MATLAB 5 file ({type(error).__name__}: {error})", where=where, fix=_FIX) from None
    return bfm_from_dict(content, where=where)


@lru_cache(maxsize=4)
def _load_bfm(url: str, storage_options: str) -> BfmModel:
    data, where = read_model_file(Location(url, json.loads(storage_options)), BFM_FILE)
    return read_bfm(data, where=where)


def load_bfm(root: Location) -> BfmModel:
    """The BFM front model of the model directory ``root`` (:data:`BFM_FILE`; read once per process)."""
    return _load_bfm(root.url, json.dumps(root.storage_options, sort_keys=True, default=str))


def split_coefficients(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, 257)`` coefficients -> ``{id, exp, tex, angle, gamma, trans}`` (:data:`BFM_CODES`)."""
    if coefficients.shape[-1] != sum(BFM_CODES.values()):
        raise ModelError(
            f"BFM coefficients have {coefficients.shape[-1]} values, expected {sum(BFM_CODES.values())}",
            where="split_coefficients",
            fix="pass Deep3DFaceRecon's 257 = 80 id + 64 exp + 80 tex + 3 angle + 27 gamma + 3 trans",
        )
    parts, start = {}, 0
    for name, size in BFM_CODES.items():
        parts[name] = coefficients[..., start : start + size]
        start += size
    return parts


def merge_coefficients(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`split_coefficients`."""
    return torch.cat([parts[name] for name in BFM_CODES], dim=-1)


def euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotations ``Rz(c) @ Ry(b) @ Rx(a)`` of ``(..., 3)`` angles ``(a, b, c)`` in radians
    (column-vector convention: a point ``p`` turns into ``R @ p``; the layer uses row vectors ``p @ R^T``)."""
    a, b, c = angles[..., 0], angles[..., 1], angles[..., 2]
    one, zero = torch.ones_like(a), torch.zeros_like(a)

    def matrix(*rows) -> torch.Tensor:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    rx = matrix((one, zero, zero), (zero, a.cos(), -a.sin()), (zero, a.sin(), a.cos()))
    ry = matrix((b.cos(), zero, b.sin()), (zero, one, zero), (-b.sin(), zero, b.cos()))
    rz = matrix((c.cos(), -c.sin(), zero), (c.sin(), c.cos(), zero), (zero, zero, one))
    return rz @ ry @ rx


def _sh_constants() -> list[float]:
    """Deep3DFaceRecon's factor per band: ``a_l c_l`` with the SH normalisations ``c_l = 1/sqrt(4 pi),
    sqrt(3)/sqrt(4 pi), 3 sqrt(5)/sqrt(12 pi)`` and ``a_l = pi, 2 pi/sqrt(3), 2 pi/sqrt(8)``. The last two
    are not Ramamoorthi & Hanrahan's Lambertian weights (2 pi/3, pi/4); they are kept because the
    released network and the fitting defaults were made with them."""
    a = (np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0))
    c = (1 / np.sqrt(4 * np.pi), np.sqrt(3.0) / np.sqrt(4 * np.pi), 3 * np.sqrt(5.0) / np.sqrt(12 * np.pi))
    return [float(a[k] * c[k]) for k in range(3)]


class BfmLayer(torch.nn.Module):
    """BFM shape, albedo, normals, lighting, pose and the pinhole camera, batched and differentiable.

    Every method takes batched ``(B, ...)`` tensors on the layer's device; move it with ``.to()``.
    Float32 throughout (the bases are stored as float32 buffers).
    """

    def __init__(self, model: BfmModel, *, focal: float = FOCAL, centre: float = CENTRE, camera_distance: float = CAMERA_DISTANCE) -> None:
        super().__init__()
        self.focal, self.centre, self.camera_distance = float(focal), float(centre), float(camera_distance)
        self.sizes = model.sizes
        mean = model.meanshape - model.meanshape.mean(axis=0, keepdims=True)  # re-centred, as both projects do
        self.register_buffer("mean_shape", torch.from_numpy(np.ascontiguousarray(mean)))
        self.register_buffer("id_base", torch.from_numpy(np.ascontiguousarray(model.id_base)))
        self.register_buffer("exp_base", torch.from_numpy(np.ascontiguousarray(model.exp_base)))
        self.register_buffer("mean_tex", torch.from_numpy(np.ascontiguousarray(model.meantex)))
        self.register_buffer("tex_base", torch.from_numpy(np.ascontiguousarray(model.tex_base)))
        self.register_buffer("triangles", torch.from_numpy(model.triangles))
        self.register_buffer("point_buf", torch.from_numpy(model.point_buf))
        self.register_buffer("keypoints", torch.from_numpy(model.keypoints))

    @property
    def n_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    def shape(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` local vertices (decimetres, mean re-centred) of ``(B, K_id)`` and ``(B, K_exp)`` codes."""
        return (self.mean_shape + torch.einsum("nck,bk->bnc", self.id_base, identity)
                + torch.einsum("nck,bk->bnc", self.exp_base, expression))  # fmt: skip

    def albedo(self, texture: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` RGB albedo in ``[0, 1]`` (for plausible codes) of ``(B, K_tex)`` codes."""
        return (self.mean_tex + torch.einsum("nck,bk->bnc", self.tex_base, texture)) / 255.0

    def normals(self, vertices: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` unit vertex normals: the normalised sum of the unit normals ``(v0 - v1) x (v1 - v2)``
        of the vertex's triangles in ``point_buf`` (the padding id points at a zero normal)."""
        corners = vertices[:, self.triangles]  # (B, F, 3, 3)
        face = torch.linalg.cross(corners[:, :, 0] - corners[:, :, 1], corners[:, :, 1] - corners[:, :, 2], dim=-1)
        face = torch.nn.functional.normalize(face, dim=-1)
        face = torch.cat([face, face.new_zeros(face.shape[0], 1, 3)], dim=1)
        return torch.nn.functional.normalize(face[:, self.point_buf].sum(dim=2), dim=-1)

    def pose(self, vertices: torch.Tensor, angles: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """``vertices @ R^T + translation`` with ``R`` = :func:`euler_rotation` of ``angles``."""
        return vertices @ euler_rotation(angles).transpose(-1, -2) + translation[:, None, :]

    def project(self, posed: torch.Tensor) -> torch.Tensor:
        """``(B, N, 2)`` crop coordinates ``(u, v)`` of posed points, ``v`` pointing up (the image row is
        ``2 * centre - 1 - v``)."""
        depth = self.camera_distance - posed[..., 2:3]
        return self.focal * posed[..., :2] / depth + self.centre

    def shading(self, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` RGB irradiance of unit ``normals`` (already rotated) under ``(B, 27)`` lighting:
        ``gamma`` reshaped ``(3 colours, 9 bands)``, plus :data:`AMBIENT_INIT` on band 0."""
        k0, k1, k2 = _sh_constants()
        x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
        basis = torch.stack([
            torch.full_like(x, k0), -k1 * y, k1 * z, -k1 * x,
            k2 * x * y, -k2 * y * z, 0.5 * k2 / np.sqrt(3.0) * (3 * z * z - 1), -k2 * x * z, 0.5 * k2 * (x * x - y * y),
        ], dim=-1)  # fmt: skip
        lighting = gamma.reshape(-1, 3, 9).clone()
        lighting[:, :, 0] = lighting[:, :, 0] + AMBIENT_INIT
        return torch.einsum("bnk,bck->bnc", basis, lighting)

    def forward(self, codes: dict[str, torch.Tensor], *, colours: bool = False) -> dict[str, torch.Tensor]:
        """Decode named codes (:data:`BFM_CODES`; ``tex``/``gamma`` needed only for ``colours``).

        Returns ``local`` (B, N, 3) shape, ``posed`` (B, N, 3) in camera-world space, ``projected``
        (B, N, 2) crop ``(u, v up)``, ``landmarks`` (B, 68, 2) the keypoints' projections and, with
        ``colours``, ``albedo`` and ``colour`` (B, N, 3) in ``[0, 1]``.
        """
        local = self.shape(codes["id"], codes["exp"])
        posed = self.pose(local, codes["angle"], codes["trans"])
        projected = self.project(posed)
        out = {"local": local, "posed": posed, "projected": projected, "landmarks": projected[:, self.keypoints]}
        if colours:
            rotation = euler_rotation(codes["angle"])
            normals = self.normals(local) @ rotation.transpose(-1, -2)
            out["albedo"] = self.albedo(codes["tex"])
            out["colour"] = out["albedo"] * self.shading(normals, codes["gamma"])
        return out
