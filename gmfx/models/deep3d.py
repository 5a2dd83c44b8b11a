"""Deep3DFaceRecon (Deng et al. 2019) as a gmfx backend: 5-point alignment -> ResNet-50 -> 257 BFM
coefficients -> meshes in image space.

Per frame: a detector's landmarks (``--detector mediapipe|fan``) give each face's 5 points (eye
centres, nose tip, mouth corners); a least-squares scaled-orthographic fit of the 3D template's same
5 points (``similarity_Lm3D_all.mat``) gives the scale ``s`` and centre ``t``, and the image is
scaled by ``102 / s`` and cut to 224 x 224 around ``t`` (Deep3D's ``align_img``). The network of
``epoch_20.pth`` (``net_recon``: a ResNet-50 and seven 1x1 heads) predicts the 257 coefficients
split into id 80, exp 64, tex 80, angle 3, gamma 27 and trans 3; :class:`~gmfx.models._bfm.BfmLayer`
decodes them.

Spaces
    ``local``: the BFM shape in decimetres (mean re-centred), no pose. World: pixels of the original
    frame (x right, y down, z away from the camera; z in pixels at the face's depth, zero at the
    model's origin). ``v`` is Deep3D's perspective projection (focal 1015, centre 112, camera 10 dm
    away) mapped back through the inverse crop, so meshes overlay the frame exactly; ``mat`` =
    image <- crop @ the weak-perspective camera at the origin's depth @ the pose, exact for points at
    that depth (the nose tip, ~1 dm nearer, is ~10% further from the centre in ``v``).
Codes
    The six parts of the 257 coefficients, plus ``crop`` = ``(s, cx, cy)`` of the image -> crop
    similarity ``x' = s x + cx``, ``y' = s y + cy``. The vertices are derived from the codes
    (:func:`bfm_vertices`); ``--save-vertices`` also stores them.

Differences from upstream, all sub-pixel for faces of 100 px or more: the crop is the exact
similarity (upstream truncates the scaled image size and crop corner to integers) sampled bilinearly
(upstream resizes with PIL's bicubic filter, then crops), and rows follow the landmarks' convention
``223 - v`` (upstream's image crop is offset from its own landmarks by ``s - 1`` pixels).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from gmfx._errors import ModelError
from gmfx.models._base import Backend, Face, Outputs, Topology
from gmfx.models._bfm import BFM_CODES, BFM_FILE, BfmLayer, BfmModel, euler_rotation, load_bfm, split_coefficients
from gmfx.models._crops import crop_to_image, warp_crops
from gmfx.models._detect import make_detector
from gmfx.models._files import ModelFile, read_model_file
from gmfx.models._files import model_dir as resolve_model_dir
from gmfx.models._lazy_vertices import as_dask, check_topology, require_codes, vertex_array
from gmfx.models._pickle import load_torch
from gmfx.models._resnet import ResNet50, load_strict
from gmfx.storage import Location

__all__ = [
    "DEEP3D_FILE",
    "LM3D_FILE",
    "Deep3dBackend",
    "ReconNet",
    "alignment_crop",
    "bfm_topology",
    "bfm_vertices",
    "five_points",
    "pos_fit",
    "to_image",
    "weak_perspective_mat",
]

DEEP3D_FILE = ModelFile(
    "deep3d",
    ("Deep3DFaceRecon/face_recon_feat0.2_augment/epoch_20.pth", "Deep3DFaceRecon/epoch_20.pth"),
    "Deep3DFaceRecon network (epoch_20.pth)",
    "download the released model face_recon_feat0.2_augment (link in the README of "
    "https://github.com/sicxu/Deep3DFaceRecon_pytorch) and put epoch_20.pth in Deep3DFaceRecon/face_recon_feat0.2_augment/",
)
LM3D_FILE = ModelFile(
    "similarity_lm3d",
    ("BFM/similarity_Lm3D_all.mat",),
    "Deep3DFaceRecon's 3D landmark template (5-point alignment)",
    "take BFM/similarity_Lm3D_all.mat of https://github.com/sicxu/Deep3DFaceRecon_pytorch and put it in BFM/",
)

#: head sizes of ``net_recon.final_layers``, in order: id, exp, tex, angle, gamma, (tx, ty), tz
HEADS = (80, 64, 80, 3, 27, 2, 1)
CROP_SIZE = 224
#: Deep3D's ``rescale_factor``: template units (dm) -> crop pixels, ~ focal / camera distance
RESCALE = 102.0
FOCAL, CENTRE, CAMERA_DISTANCE = 1015.0, 112.0, 10.0
#: 0-based iBUG-68 ids of the 5 points: nose tip, then the eyes' corners, then the mouth corners
IBUG_NOSE, IBUG_EYES, IBUG_MOUTH = 30, ((36, 39), (42, 45)), (48, 54)
#: MediaPipe face-mesh ids: eye corners (the image's left eye first), nose tip, mouth corners
MEDIAPIPE_EYES, MEDIAPIPE_NOSE, MEDIAPIPE_MOUTH = ((33, 133), (362, 263)), 1, (61, 291)
#: codes stored per face: the 257 coefficients' parts, and the crop (s, cx, cy)
DEEP3D_CODES = {**BFM_CODES, "crop": 3}
Precision = Literal["float32", "float16", "bfloat16"]


class ReconNet(nn.Module):
    """Deep3D's ``ReconNetWrapper``: ResNet-50 (``backbone.*``, torchvision names, no ``fc``) and seven
    zero-initialised 1x1 convolutions (``final_layers.0..6``) on its pooled 2048 features -> ``(B, 257)``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, size, 1) for size in HEADS)
        for layer in self.final_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)[:, :, None, None]
        return torch.cat([layer(features) for layer in self.final_layers], dim=1).flatten(1)


# -- alignment and camera (pure functions) --------------------------------------------------------------
def five_points(landmarks: np.ndarray) -> np.ndarray:
    """``(5, k)`` left eye, right eye (as seen in the image), nose tip, left and right mouth corner of
    ``(68, k)`` iBUG landmarks (eye = mean of its two corners, as Deep3D's ``extract_5p`` and, on
    ``similarity_Lm3D_all.mat``, ``load_lm3d``) or of MediaPipe's ``(468|478, k)`` face mesh."""
    points = np.asarray(landmarks, dtype=np.float64)
    if len(points) == 68:
        eyes, nose, mouth = IBUG_EYES, IBUG_NOSE, IBUG_MOUTH
    elif len(points) in (468, 478):
        eyes, nose, mouth = MEDIAPIPE_EYES, MEDIAPIPE_NOSE, MEDIAPIPE_MOUTH
    else:
        raise ModelError(
            f"the detector gave {len(points)} landmarks; Deep3D's alignment takes 68 (iBUG) or 468/478 (MediaPipe)",
            where="--detector",
            fix="use --detector mediapipe or fan",
        )
    return np.stack([points[list(eyes[0])].mean(0), points[list(eyes[1])].mean(0), points[nose], points[mouth[0]], points[mouth[1]]])


def pos_fit(points: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, float]:
    """Scaled orthographic fit of ``(n, 3)`` ``template`` to ``(n, 2)`` ``points`` (y up): the least-squares
    affine camera ``p = A X + t`` (8 unknowns); returns ``t`` and ``s`` = the mean norm of A's rows."""
    n = len(points)
    system = np.zeros((2 * n, 8))
    system[0::2, 0:3], system[0::2, 3] = template, 1
    system[1::2, 4:7], system[1::2, 7] = template, 1
    solution = np.linalg.lstsq(system, np.asarray(points, np.float64).reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(solution[0:3]) + np.linalg.norm(solution[4:7])) / 2
    return np.array([solution[3], solution[7]]), float(scale)


def alignment_crop(points: np.ndarray, template: np.ndarray, height: int, *, rescale: float = RESCALE, size: int = CROP_SIZE) -> np.ndarray:
    """The ``(3, 3)`` image -> crop similarity of Deep3D's ``align_img`` for 5 image points (y down).

    The points are flipped to y up (``height - 1 - y``), fitted by :func:`pos_fit`, and the image is
    scaled by ``s = rescale / scale`` about ``t``, which lands on the crop's centre: crop ``u = s (x - t0)
    + size/2`` and, with ``v = s (y_up - t1) + size/2`` pointing up, crop row ``size - 1 - v``.
    """
    flipped = np.asarray(points, np.float64).copy()
    flipped[:, 1] = height - 1 - flipped[:, 1]
    t, scale = pos_fit(flipped, template)
    s = rescale / scale
    centre = size / 2
    return np.array([[s, 0.0, centre - s * t[0]], [0.0, s, size - 1 - centre - s * (height - 1 - t[1])], [0.0, 0.0, 1.0]])


def weak_perspective_mat(trans: np.ndarray, *, focal: float = FOCAL, centre: float = CENTRE,
                         distance: float = CAMERA_DISTANCE, size: int = CROP_SIZE) -> np.ndarray:  # fmt: skip
    """``(..., 4, 4)``: posed BFM points -> crop ``(u, row, z)`` pixels, the perspective camera with every
    point at the depth of ``trans`` (z: pixels at that depth, away from the camera, zero at ``trans``)."""
    trans = np.asarray(trans, np.float64)
    k = focal / (distance - trans[..., 2])
    matrix = np.zeros((*trans.shape[:-1], 4, 4))
    matrix[..., 0, 0], matrix[..., 1, 1], matrix[..., 2, 2] = k, -k, -k
    matrix[..., 0, 3], matrix[..., 1, 3], matrix[..., 2, 3] = centre, size - 1 - centre, k * trans[..., 2]
    matrix[..., 3, 3] = 1
    return matrix


def _crop_matrices(crop_codes: np.ndarray) -> np.ndarray:
    """``(..., 3, 3)`` similarities of ``(..., 3)`` crop codes ``(s, cx, cy)``."""
    crop_codes = np.asarray(crop_codes, np.float64)
    matrix = np.zeros((*crop_codes.shape[:-1], 3, 3))
    matrix[..., 0, 0] = matrix[..., 1, 1] = crop_codes[..., 0]
    matrix[..., 0, 2], matrix[..., 1, 2], matrix[..., 2, 2] = crop_codes[..., 1], crop_codes[..., 2], 1
    return matrix


def to_image(posed: np.ndarray, trans: np.ndarray, crop: np.ndarray, *, focal: float = FOCAL, centre: float = CENTRE,
             distance: float = CAMERA_DISTANCE, size: int = CROP_SIZE) -> np.ndarray:  # fmt: skip
    """``(N, V, 3)`` world (original-image pixel) points of ``(N, V, 3)`` posed BFM points: perspective
    ``u = f x / (d - z) + c``, row ``size - 1 - (f y / (d - z) + c)``, z as :func:`weak_perspective_mat`,
    then back through the ``(N, 3, 3)`` image -> crop similarities ``crop``."""
    posed = np.asarray(posed, np.float64)
    depth = distance - posed[..., 2:3]
    u = focal * posed[..., 0:1] / depth + centre
    row = size - 1 - (focal * posed[..., 1:2] / depth + centre)
    z = (focal / (distance - trans[:, None, 2:3])) * (trans[:, None, 2:3] - posed[..., 2:3])
    back = crop_to_image(crop)  # (N, 4, 4): crop pixels -> image pixels, z scaled like x and y
    crop_points = np.concatenate([u, row, z], axis=-1)
    return crop_points @ np.swapaxes(back[:, :3, :3], -1, -2) + back[:, None, :3, 3]


def _pose_matrix(angles: np.ndarray, trans: np.ndarray) -> np.ndarray:
    rotation = euler_rotation(torch.from_numpy(np.asarray(angles, np.float64))).numpy()
    matrix = np.zeros((len(angles), 4, 4))
    matrix[:, :3, :3], matrix[:, :3, 3], matrix[:, 3, 3] = rotation, trans, 1
    return matrix


def deep3d_mat(angles: np.ndarray, trans: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """``(N, 4, 4)`` local -> world: image <- crop @ :func:`weak_perspective_mat` @ pose."""
    return crop_to_image(crop) @ weak_perspective_mat(trans) @ _pose_matrix(angles, trans)


# -- the model directory ----------------------------------------------------------------------------------
def _options_key(root: Location) -> str:
    return json.dumps(root.storage_options, sort_keys=True, default=str)


def bfm_topology(root: Location | None = None) -> Topology:
    """The BFM front mesh of the model directory: the re-centred mean shape (dm), its triangles, and
    as rigid vertices the half that the expression bases move least."""
    root = root or resolve_model_dir()
    return _topology(root.url, _options_key(root))


@lru_cache(maxsize=4)
def _topology(url: str, storage_options: str) -> Topology:
    model = load_bfm(Location(url, json.loads(storage_options)))
    motion = np.linalg.norm(model.exp_base, axis=(1, 2))
    return Topology(
        name=f"bfm-front-{model.n_vertices}",
        template=(model.meanshape - model.meanshape.mean(axis=0)).astype(np.float32),
        triangles=model.triangles.astype(np.int32),
        units="dm",
        rigid=motion <= np.median(motion),
    )


@lru_cache(maxsize=4)
def _decoder(url: str, storage_options: str) -> BfmLayer:
    return BfmLayer(load_bfm(Location(url, json.loads(storage_options))))


#: the codes that fix the vertices, in the order of a derivation block
_VERTEX_CODES = {"code_id": 80, "code_exp": 64, "code_angle": 3, "code_trans": 3, "code_crop": 3}


def _vertex_block(block: np.ndarray, *, url: str, storage_options: str) -> np.ndarray:
    """World vertices ``(t, f, V, 3)`` of a ``(t, f, 153)`` block of codes."""
    layer = _decoder(url, storage_options)
    t, f = block.shape[:2]
    flat = block.reshape(t * f, -1).astype(np.float64)
    out = np.full((t * f, layer.n_vertices, 3), np.nan, np.float32)
    rows = np.flatnonzero(np.isfinite(flat).all(axis=1))
    if len(rows):
        parts = np.split(flat[rows], np.cumsum(list(_VERTEX_CODES.values()))[:-1], axis=1)
        codes = dict(zip(("id", "exp", "angle", "trans", "crop"), parts))
        out[rows] = _world_vertices(layer, codes)
    return out.reshape(t, f, layer.n_vertices, 3)


def _world_vertices(layer: BfmLayer, codes: Mapping[str, np.ndarray]) -> np.ndarray:
    """World vertices of float64 codes (id, exp, angle, trans, crop), decoded in float32 as recon does."""
    with torch.inference_mode():
        tensor = {name: torch.from_numpy(np.asarray(codes[name], np.float32)) for name in ("id", "exp", "angle", "trans")}
        posed = layer.pose(layer.shape(tensor["id"], tensor["exp"]), tensor["angle"], tensor["trans"])
    return to_image(posed.double().numpy(), np.asarray(codes["trans"], np.float64), _crop_matrices(codes["crop"])).astype(np.float32)


def bfm_vertices(ds: Any, *, model_dir: str | None = None) -> Any:
    """The vertices ``v`` (time, face, vertex, coord) of a Deep3D recon store, lazily from its codes.

    One Dask task per time chunk decodes ``code_id`` and ``code_exp`` through the BFM of the model
    directory (``model_dir``, else the store's, else ``$GMFX_MODEL_DIR``), poses them with
    ``code_angle``/``code_trans`` and projects them through ``code_crop``: what recon computed.
    """
    import dask.array as da

    require_codes(ds, _VERTEX_CODES, deriving="BFM vertices", fix="pass a recon store written by --model deep3d")
    root = resolve_model_dir(model_dir or ds.attrs.get("model_dir"))
    topology = bfm_topology(root)
    check_topology(ds, topology.name, where=root.url, files="BFM file")
    parts = [as_dask(ds[name]) for name in _VERTEX_CODES]
    inputs = da.concatenate(parts, axis=2).rechunk({2: -1})
    data = inputs.map_blocks(
        _vertex_block, url=root.url, storage_options=_options_key(root), dtype=np.float32, drop_axis=2, new_axis=[2, 3],
        chunks=(*inputs.chunks[:2], (topology.n_vertices,), (3,)),
    )  # fmt: skip
    return vertex_array(data, ds, derived="BFM(codes), perspective camera, inverse crop")


# -- the backend ------------------------------------------------------------------------------------------
class Deep3dBackend(Backend):
    """Deep3DFaceRecon (BFM 2009 front model, 257 coefficients per face), on CPU or CUDA.

    Options of :meth:`load`: ``model_dir`` (default ``$GMFX_MODEL_DIR``), ``detector`` (``mediapipe``
    or ``fan``), ``precision`` of the network (``float32``, ``float16``/``bfloat16`` autocast; the BFM
    decoding stays float32), ``min_detection_confidence`` (0.5).
    """

    name = "deep3d"
    version = "deep3d-face_recon_feat0.2_augment-bfm09"
    requires_gpu = False
    devices = ("cpu", "cuda")
    batch_size = 32
    units = "pixels"
    outputs = Outputs(codes=dict(DEEP3D_CODES), n_landmarks=68)
    model_files: ClassVar[tuple[ModelFile, ...]] = (BFM_FILE, LM3D_FILE, DEEP3D_FILE)
    derives_vertices = True

    def __init__(self, network: ReconNet, bfm: BfmModel, template: np.ndarray, device: str, *, detector: str = "mediapipe",
                 precision: Precision = "float32", min_detection_confidence: float = 0.5) -> None:  # fmt: skip
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed 224 x 224 crops: the autotuned kernels are reused
        self.network = network.to(self.device).eval()
        if self.device.type == "cuda":
            self.network = self.network.to(memory_format=torch.channels_last)
        self.layer = BfmLayer(bfm).to(self.device)
        self.template = template
        self.precision = precision
        self.detector = make_detector(detector, device, min_detection_confidence)  # type: ignore[arg-type]
        self._lock = threading.Lock()

    #: the model directory this process last loaded the model from: the workers' topology comes from the
    #: same BFM file even when their ``$GMFX_MODEL_DIR`` names another folder (e.g. one a FLAME model adopted)
    _loaded_from: ClassVar[Location | None] = None

    @classmethod
    def topology(cls) -> Topology:
        return bfm_topology(cls._loaded_from)

    @classmethod
    def vertices(cls, ds: Any) -> Any:
        return bfm_vertices(ds)

    @staticmethod
    def _check_options(*, model_dir: str | None = None, detector: str = "mediapipe", precision: str = "float32",
                       min_detection_confidence: float = 0.5, **extra: Any) -> dict[str, Any]:  # fmt: skip
        if extra:
            raise TypeError(f"unknown options {sorted(extra)}")
        if detector not in ("mediapipe", "fan"):
            raise ValueError(f"detector must be mediapipe or fan, not {detector!r}")
        if precision not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"precision must be float32, float16 or bfloat16, not {precision!r}")
        return {"model_dir": model_dir, "detector": detector, "precision": precision, "min_detection_confidence": float(min_detection_confidence)}

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        checked = cls._check_options(**options)
        return {
            "model_dir": resolve_model_dir(checked["model_dir"]).url,
            "bfm": "BFM 2009 front model (35709 vertices) + Guo et al. expressions, decimetres",
            "detector": checked["detector"],
            "precision": checked["precision"],
            "crop": "Deep3D align_img: 5 points, POS fit to similarity_Lm3D_all, scale 102 / s, 224 px, bilinear",
            "camera": "perspective: focal 1015, centre 112, camera at z = 10 dm; mat = image <- crop @ weak perspective @ pose",
            "torch_version": torch.__version__,
        }

    @classmethod
    def load(cls, device: str, **options: Any) -> Deep3dBackend:
        import scipy.io

        checked = cls._check_options(**options)
        root = resolve_model_dir(checked.pop("model_dir"))
        data, where = read_model_file(root, LM3D_FILE)
        try:
            lm3d = np.asarray(scipy.io.loadmat(io.BytesIO(data))["lm"], np.float64)
        except Exception as error:  # noqa: BLE001 - scipy raises many types on broken files
            raise ModelError(f"similarity_Lm3D_all.mat cannot be read ({type(error).__name__}: {error})", where=where,
                             fix=LM3D_FILE.obtain) from None  # fmt: skip
        if lm3d.shape != (68, 3):
            raise ModelError(f"similarity_Lm3D_all.mat 'lm' has shape {lm3d.shape}, expected (68, 3)", where=where, fix=LM3D_FILE.obtain)
        bfm = load_bfm(root)
        if bfm.sizes != {"id": 80, "exp": 64, "tex": 80}:
            raise ModelError(f"the BFM file has {bfm.sizes} components; Deep3D needs 80 id, 64 exp and 80 tex",
                             where=root.url, fix="use the BFM_model_front.mat of transferBFM09 (or `gmfx models import-bfm`)")  # fmt: skip
        model = cls(load_recon_net(root), bfm, five_points(lm3d), device, **checked)
        Deep3dBackend._loaded_from = root
        return model

    def reset(self) -> None:
        self.detector.reset()

    def coefficients(self, crops: torch.Tensor) -> torch.Tensor:
        """``(N, 257)`` float32 coefficients of ``(N, 3, 224, 224)`` RGB crops in ``[0, 1]``."""
        if self.device.type == "cuda":
            crops = crops.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "float32":
                return self.network(crops).float()
            dtype = torch.float16 if self.precision == "float16" else torch.bfloat16
            with torch.autocast(device_type=self.device.type, dtype=dtype):
                return self.network(crops).float()

    def reconstruct(self, frames: np.ndarray, *, max_faces: int) -> list[list[Face]]:
        detections = self.detector(frames, max_faces)
        owners = [(i, points, score) for i, found in enumerate(detections) for points, score in found]
        result: list[list[Face]] = [[] for _ in frames]
        if not owners:
            return result
        height = frames.shape[1]
        crops = np.stack([alignment_crop(five_points(points), self.template, height) for _, points, _ in owners])
        with self._lock, torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            index = torch.tensor([i for i, _, _ in owners], device=self.device)
            coefficients = self.coefficients(warp_crops(images, torch.from_numpy(crops).to(self.device), index))
            codes = split_coefficients(coefficients)
            posed = self.layer.pose(self.layer.shape(codes["id"], codes["exp"]), codes["angle"], codes["trans"])
        codes_np = {name: value.cpu().numpy().astype(np.float32) for name, value in codes.items()}
        codes_np["crop"] = np.stack([crops[:, 0, 0], crops[:, 0, 2], crops[:, 1, 2]], axis=1).astype(np.float32)
        trans = codes_np["trans"].astype(np.float64)
        world = to_image(posed.double().cpu().numpy(), trans, _crop_matrices(codes_np["crop"])).astype(np.float32)
        mats = deep3d_mat(codes_np["angle"].astype(np.float64), trans, _crop_matrices(codes_np["crop"])).astype(np.float32)
        keypoints = self.layer.keypoints.cpu().numpy()
        for k, (i, _, score) in enumerate(owners):
            result[i].append(Face(
                vertices=world[k],
                mat=mats[k],
                score=float(score),
                codes={name: value[k] for name, value in codes_np.items()},
                landmarks=world[k, keypoints],
            ))  # fmt: skip
        return result


def load_recon_net(root: Location) -> ReconNet:
    """``net_recon`` of ``epoch_20.pth`` loaded strictly (every key and shape) into :class:`ReconNet`."""
    data, where = read_model_file(root, DEEP3D_FILE)
    checkpoint = load_torch(data, where=where)
    if not isinstance(checkpoint, Mapping) or "net_recon" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ModelError(f"epoch_20.pth lacks 'net_recon' (it holds {keys})", where=where, fix="use the released epoch_20.pth of Deep3DFaceRecon_pytorch")
    network = ReconNet()
    load_strict(network, checkpoint["net_recon"], where=f"{where} [net_recon]")
    return network
