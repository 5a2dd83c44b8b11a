"""DECA (coarse) as a gmfx backend: crop -> ResNet-50 encoder -> FLAME codes -> meshes in image space.

Per frame: a detector's landmarks give each face's box (``--detector mediapipe|fan``); DECA's crop
rule (1.25 x the face, 224 x 224) cuts it out; the encoder of ``deca_model.tar`` (``E_flame``)
predicts 236 numbers split into shape 100, tex 50, exp 50, pose 6 (global, jaw), cam 3 (s, tx, ty)
and light 27; gmfx's FLAME layer decodes them. Frames are batched through the network on the
backend's device, optionally in mixed precision (the encoder only; FLAME runs in float32).

Spaces
    ``local``: FLAME in metres with the global rotation left out (neck, jaw and eyes applied).
    ``mat`` = image <- crop (inverse crop similarity, z scaled alike) @ crop <- model (DECA's
    orthographic camera) @ the global rotation about FLAME's root joint; ``v = mat @ local`` are
    pixels of the original frame (x right, y down, z away from the camera), so meshes overlay it.
Landmarks
    FLAME's 68 landmarks (17 contour points chosen by head yaw, 51 inner points) in the same space.

The model directory (:mod:`gmfx.models._files`) holds ``FLAME2020/generic_model.pkl`` (or the
``.npz`` of ``gmfx models import-flame``), ``FLAME2020/landmark_embedding.npy`` and
``DECA/deca_model.tar``. Only ``E_flame`` is read (strictly: every key and shape); the detail networks
are not used by the coarse reconstruction.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from gmfx._errors import ModelError
from gmfx.models._base import Backend, Face, Outputs, Topology
from gmfx.models._crops import box_from_landmarks, crop_to_image, orthographic_camera, square_crop, warp_crops
from gmfx.models._detect import make_detector
from gmfx.models._files import MODEL_DIR_ENV, ModelFile, read_model_file
from gmfx.models._files import model_dir as resolve_model_dir
from gmfx.models._lazy_vertices import as_dask, check_topology, require_codes, vertex_array
from gmfx.models._flame import FlameLayer, FlameModel, read_flame, read_landmark_embedding, rodrigues
from gmfx.models._pickle import load_pickle, load_torch
from gmfx.models._resnet import ResNetEncoder, load_strict
from gmfx.storage import Location

__all__ = [
    "DECA_FILE",
    "FLAME_FILE",
    "FLAME_MASKS_FILE",
    "LANDMARK_FILE",
    "DecaBackend",
    "flame_topology",
    "flame_vertices",
    "split_deca_code",
    "to_world",
]

FLAME_FILE = ModelFile(
    "flame",
    ("FLAME2020/generic_model.npz", "FLAME2020/generic_model.pkl"),
    "FLAME 2020 model",
    "register at https://flame.is.tue.mpg.de, download FLAME 2020 (FLAME2020.zip) and put generic_model.pkl in "
    "FLAME2020/ (then `gmfx models import-flame FLAME2020/generic_model.pkl` converts it to a pickle-free .npz)",
)
LANDMARK_FILE = ModelFile(
    "landmark_embedding",
    ("FLAME2020/landmark_embedding.npy",),
    "FLAME landmark embedding",
    "take data/landmark_embedding.npy of DECA (https://github.com/yfeng95/DECA) and put it in FLAME2020/",
)
FLAME_MASKS_FILE = ModelFile(
    "flame_masks",
    ("FLAME2020/FLAME_masks.pkl",),
    "FLAME vertex masks (optional: rigid vertices for alignment)",
    "download FLAME_masks.zip from https://flame.is.tue.mpg.de and put FLAME_masks.pkl in FLAME2020/",
)
DECA_FILE = ModelFile(
    "deca_model",
    ("DECA/deca_model.tar",),
    "DECA model",
    "register at https://deca.is.tue.mpg.de and download deca_model.tar (link in the README of "
    "https://github.com/yfeng95/DECA) into DECA/",
)

#: DECA's code layout: name -> size, in the order of the encoder's 236 outputs
DECA_CODES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
#: mask regions of FLAME_masks.pkl that move least with expression and jaw: the rigid default with masks
RIGID_MASKS = ("scalp", "forehead", "nose")
#: without masks: vertices whose jaw/eye skinning weight is below this ...
RIGID_MAX_JAW_EYE_WEIGHT = 0.01
#: ... and whose expression displacement is in this lowest fraction
RIGID_EXPRESSION_QUANTILE = 0.5


def split_deca_code(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """DECA's ``(B, 236)`` encoder output split into its named parts (:data:`DECA_CODES`)."""
    parts, start = {}, 0
    for name, size in DECA_CODES.items():
        parts[name] = code[:, start : start + size]
        start += size
    return parts


def _options_key(root: Location) -> str:
    return json.dumps(root.storage_options, sort_keys=True, default=str)


@lru_cache(maxsize=4)
def _flame_files(url: str, storage_options: str) -> tuple[FlameModel, str]:
    root = Location(url, json.loads(storage_options))
    data, where = read_model_file(root, FLAME_FILE)
    return read_flame(data, where=where), where


def load_flame_model(root: Location) -> FlameModel:
    """The FLAME model of the model directory ``root`` (read once per process)."""
    return _flame_files(root.url, _options_key(root))[0]


def _rigid_from_masks(root: Location, n_vertices: int) -> np.ndarray | None:
    from gmfx.models._files import find_model_file

    found = find_model_file(root, FLAME_MASKS_FILE)
    if found is None:
        return None
    with found.open("rb") as handle:
        masks = load_pickle(handle.read(), where=found.url)
    missing = [name for name in RIGID_MASKS if name not in masks]
    if missing:
        raise ModelError(f"FLAME_masks.pkl lacks {', '.join(missing)}", where=found.url, fix="use the original FLAME_masks.pkl")
    rigid = np.zeros(n_vertices, bool)
    for name in RIGID_MASKS:
        rigid[np.asarray(masks[name], dtype=np.int64)] = True
    return rigid


def adopt_model_dir(root: Location) -> None:
    """Make ``root`` this process's model directory (``$GMFX_MODEL_DIR``) when none is set: a worker
    that loads a model from the ``model_dir`` option then reads the topology from the same files."""
    os.environ.setdefault(MODEL_DIR_ENV, root.url)


def default_rigid(model: FlameModel) -> np.ndarray:
    """Vertices bound to neither jaw nor eyes whose expression displacement is in the lower half."""
    free = model.weights[:, 2:].sum(axis=1) < RIGID_MAX_JAW_EYE_WEIGHT
    motion = np.linalg.norm(model.shapedirs[:, :, 300:], axis=(1, 2))
    return free & (motion <= np.quantile(motion[free], RIGID_EXPRESSION_QUANTILE))


def flame_topology(root: Location | None = None) -> Topology:
    """The FLAME 2020 mesh of the model directory: template (m), triangles, rigid vertices
    (``scalp``, ``forehead`` and ``nose`` of ``FLAME_masks.pkl`` when present, else :func:`default_rigid`).
    Read once per process and directory."""
    root = root or resolve_model_dir()
    return _topology(root.url, _options_key(root))


@lru_cache(maxsize=4)
def _topology(url: str, storage_options: str) -> Topology:
    root = Location(url, json.loads(storage_options))
    model = load_flame_model(root)
    rigid = _rigid_from_masks(root, model.n_vertices)
    return Topology(
        name=f"flame2020-{model.n_vertices}",
        template=model.v_template,
        triangles=model.faces.astype(np.int32),
        units="m",
        rigid=default_rigid(model) if rigid is None else rigid,
    )


def to_world(local: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """``(..., V, 3)`` float32 local vertices through ``(..., 4, 4)`` float32 ``mat`` (in float64)."""
    mats = mats.astype(np.float32).astype(np.float64)
    world = local.astype(np.float64) @ np.swapaxes(mats[..., :3, :3], -1, -2) + mats[..., None, :3, 3]
    return world.astype(np.float32)


#: FLAME inputs of a codes-only store, and their sizes
_VERTEX_CODES = {"code_shape": 100, "code_exp": 50, "code_pose": 6}


@lru_cache(maxsize=4)
def _decoder(url: str) -> FlameLayer:
    return FlameLayer(load_flame_model(Location(url)), n_shape=DECA_CODES["shape"], n_expression=DECA_CODES["exp"])


def _vertex_block(block: np.ndarray, *, url: str) -> np.ndarray:
    """Vertices ``(t, f, V, 3)`` of a ``(t, f, 156 + 16)`` block of codes and flattened ``mat``."""
    layer = _decoder(url)
    t, f = block.shape[:2]
    flat = block.reshape(t * f, -1)
    out = np.full((t * f, layer.n_vertices, 3), np.nan, np.float32)
    rows = np.flatnonzero(np.isfinite(flat).all(axis=1))
    if len(rows):
        codes = torch.from_numpy(flat[rows, :156].astype(np.float32))
        with torch.inference_mode():
            local, _, _ = layer(codes[:, :100], codes[:, 100:150], jaw=codes[:, 153:156])
        out[rows] = to_world(local.numpy(), flat[rows, 156:].reshape(-1, 4, 4))
    return out.reshape(t, f, layer.n_vertices, 3)


def flame_vertices(ds: Any, *, model_dir: str | None = None) -> Any:
    """The vertices ``v`` (time, face, vertex, coord) of a FLAME recon store, lazily from its codes.

    One Dask task per time chunk decodes ``code_shape``, ``code_exp`` and the jaw of ``code_pose``
    through FLAME (the file of the model directory: ``model_dir``, else the one recorded in the
    store, else ``$GMFX_MODEL_DIR``) and applies ``mat``; equal to the vertices recon computed.
    """
    import dask.array as da

    require_codes(ds, (*_VERTEX_CODES, "mat"), deriving="FLAME vertices", fix="pass a recon store written by a FLAME model (deca, emoca)")
    root = resolve_model_dir(model_dir or ds.attrs.get("model_dir"))
    model = load_flame_model(root)
    check_topology(ds, f"flame2020-{model.n_vertices}", where=root.url, files="FLAME files")
    parts = [as_dask(ds[name]) for name in _VERTEX_CODES] + [as_dask(ds["mat"]).reshape(*ds["mat"].shape[:2], 16)]
    inputs = da.concatenate(parts, axis=2).rechunk({2: -1})
    data = inputs.map_blocks(
        _vertex_block, url=root.url, dtype=np.float32, drop_axis=2, new_axis=[2, 3],
        chunks=(*inputs.chunks[:2], (model.n_vertices,), (3,)),
    )  # fmt: skip
    return vertex_array(data, ds, derived="FLAME(codes) through mat")


Precision = Literal["float32", "float16", "bfloat16"]


class DecaBackend(Backend):
    """DECA's coarse reconstruction (FLAME 2020 codes and meshes), on CPU or CUDA.

    Options of :meth:`load`: ``model_dir`` (default ``$GMFX_MODEL_DIR``), ``detector``
    (``mediapipe`` or ``fan``), ``precision`` of the encoder (``float32``, ``float16``/``bfloat16``
    autocast), ``min_detection_confidence`` (0.5).
    """

    name = "deca"
    version = "deca-coarse-flame2020"
    requires_gpu = False
    devices = ("cpu", "cuda")
    batch_size = 32
    units = "pixels"
    outputs = Outputs(codes=dict(DECA_CODES), n_landmarks=68)
    model_files: ClassVar[tuple[ModelFile, ...]] = (FLAME_FILE, LANDMARK_FILE, DECA_FILE, FLAME_MASKS_FILE)
    derives_vertices = True

    def __init__(self, encoder: torch.nn.Module, flame: FlameLayer, device: str, *, detector: str = "mediapipe",
                 precision: Precision = "float32", min_detection_confidence: float = 0.5) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed 224 x 224 crops: the autotuned kernels are reused
        self.encoder = self._on_device(encoder)
        self.flame = flame.to(self.device)
        self.precision = precision
        self.detector = make_detector(detector, device, min_detection_confidence)  # type: ignore[arg-type]
        self._lock = threading.Lock()

    def _on_device(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in eval mode on the device (channels-last on CUDA, the tensor-core layout)."""
        module = module.to(self.device).eval()
        return module.to(memory_format=torch.channels_last) if self.device.type == "cuda" else module

    @classmethod
    def topology(cls) -> Topology:
        return flame_topology()

    @classmethod
    def vertices(cls, ds: Any) -> Any:
        return flame_vertices(ds)

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        checked = cls._check_options(**options)
        return {
            "model_dir": resolve_model_dir(checked["model_dir"]).url,
            "flame_version": "FLAME2020",
            "detector": checked["detector"],
            "precision": checked["precision"],
            "crop": "DECA: box from landmarks (1.1 x extent), square of 1.25 x, 224 px, bilinear",
            "camera": "scaled orthographic (s, tx, ty); mat = image <- crop @ camera @ global rotation",
            "torch_version": torch.__version__,
        }

    @staticmethod
    def _check_options(*, model_dir: str | None = None, detector: str = "mediapipe", precision: str = "float32",
                       min_detection_confidence: float = 0.5, **extra: Any) -> dict[str, Any]:
        if extra:
            raise TypeError(f"unknown options {sorted(extra)}")
        if detector not in ("mediapipe", "fan"):
            raise ValueError(f"detector must be mediapipe or fan, not {detector!r}")
        if precision not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"precision must be float32, float16 or bfloat16, not {precision!r}")
        return {"model_dir": model_dir, "detector": detector, "precision": precision,
                "min_detection_confidence": float(min_detection_confidence)}

    @classmethod
    def load(cls, device: str, **options: Any) -> DecaBackend:
        checked = cls._check_options(**options)
        root = resolve_model_dir(checked.pop("model_dir"))
        adopt_model_dir(root)
        encoder = cls._load_encoder(root)
        return cls(encoder, cls._flame_layer(root), device, **checked)

    @classmethod
    def _flame_layer(cls, root: Location) -> FlameLayer:
        model = load_flame_model(root)
        data, where = read_model_file(root, LANDMARK_FILE)
        embedding = read_landmark_embedding(data, where=where, n_faces=len(model.faces))
        return FlameLayer(model, n_shape=DECA_CODES["shape"], n_expression=DECA_CODES["exp"], embedding=embedding)

    @classmethod
    def _load_encoder(cls, root: Location) -> torch.nn.Module:
        data, where = read_model_file(root, DECA_FILE)
        checkpoint = load_torch(data, where=where)
        if not isinstance(checkpoint, Mapping) or "E_flame" not in checkpoint:
            keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ModelError(f"deca_model.tar lacks 'E_flame' (it holds {keys})", where=where, fix="use the original deca_model.tar")
        encoder = ResNetEncoder(sum(DECA_CODES.values()))
        load_strict(encoder, checkpoint["E_flame"], where=f"{where} [E_flame]")
        return encoder

    def reset(self) -> None:
        self.detector.reset()

    def encode(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named codes of ``(N, 3, 224, 224)`` crops (float32)."""
        return split_deca_code(self._run_encoder(self.encoder, crops))

    def _run_encoder(self, encoder: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            crops = crops.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "float32":
                return encoder(crops).float()
            dtype = torch.float16 if self.precision == "float16" else torch.bfloat16
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                return encoder(crops).float()

    def reconstruct(self, frames: np.ndarray, *, max_faces: int) -> list[list[Face]]:
        detections = self.detector(frames, max_faces)
        owners = [(i, points, score) for i, found in enumerate(detections) for points, score in found]
        result: list[list[Face]] = [[] for _ in frames]
        if not owners:
            return result
        centre, size = self._boxes(owners)
        crop = square_crop(centre, size)
        with self._lock, torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            index = torch.tensor([i for i, _, _ in owners], device=self.device)
            crops = warp_crops(images, torch.from_numpy(crop).to(self.device), index)
            codes = self.encode(crops)
            local, landmarks, root = self._decode(codes)
        codes_np = {name: value.cpu().numpy().astype(np.float32) for name, value in codes.items()}
        global_rotation = rodrigues(codes["pose"][:, :3].double()).cpu().numpy()
        mats = (crop_to_image(crop) @ orthographic_camera(codes_np["cam"]) @ self._root_rotation(global_rotation, root)).astype(np.float32)
        vertices = to_world(local.float().cpu().numpy(), mats)
        points = to_world(landmarks.float().cpu().numpy(), mats)
        for k, (i, _, score) in enumerate(owners):
            result[i].append(Face(
                vertices=vertices[k],
                mat=mats[k],
                score=float(score),
                codes={name: value[k] for name, value in codes_np.items()},
                landmarks=points[k],
            ))
        return result

    @staticmethod
    def _boxes(owners) -> tuple[np.ndarray, np.ndarray]:
        centres, sizes = zip(*(box_from_landmarks(points) for _, points, _ in owners))
        return np.stack(centres), np.array(sizes)

    def _decode(self, codes: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Local vertices (global rotation left out), landmarks (contour chosen with it) and root joints."""
        pose = codes["pose"].float()
        vertices, rotations, joints = self.flame(codes["shape"].float(), codes["exp"].float(), jaw=pose[:, 3:])
        rotations = torch.cat([rodrigues(pose[:, None, :3]), rotations[:, 1:]], dim=1)
        return vertices, self.flame.landmarks(vertices, rotations), joints[:, 0].double().cpu().numpy()

    @staticmethod
    def _root_rotation(rotation: np.ndarray, root: np.ndarray) -> np.ndarray:
        """``(N, 4, 4)`` rotations about the root joints: ``T(root) R T(-root)``."""
        matrix = np.zeros((len(rotation), 4, 4))
        matrix[:, :3, :3] = rotation
        matrix[:, :3, 3] = root - (rotation @ root[..., None])[..., 0]
        matrix[:, 3, 3] = 1
        return matrix
