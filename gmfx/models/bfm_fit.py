"""3DMM fitting of the Basel Face Model to 68 landmarks and pixels (``--model bfm-fit``).

A gmfx take on 3DMM-Fitting-Pytorch (reference D.3-D.4), on the BFM layer shared with Deep3DFaceRecon
(:mod:`gmfx.models._bfm`) and gmfx's rasterizer; losses and schedule in :mod:`gmfx.models._fitting`.

Per recording (the recon stage's identity pass, :meth:`BfmFitBackend.estimate_identity`)
    68 landmarks (:mod:`gmfx.models._landmarks68`: FAN, or MediaPipe's mesh through a documented
    correspondence) on the stage's evenly spaced frames; per face, the ``identity_fit_frames`` (16, D.4's
    ``nframes_shape``) best-detected of them are fitted jointly: one ``id`` (80) and ``tex`` (80),
    per-frame expression, pose and light, 1000 rigid + 500 non-rigid iterations by default.
Per segment (:meth:`BfmFitBackend.reconstruct`)
    ``exp`` (64), ``angle`` (3), ``gamma`` (27), ``trans`` (3) per frame with the identity fixed; the
    segment's first frame with a face gets the full schedule, every later batch starts from the last
    fitted frame and runs 50 rigid + 30 non-rigid iterations, its pose pulled toward the previous frame.
Crop and camera
    Each face is fitted in a 224 x 224 crop: the square of :data:`CROP_SCALE` x DECA's landmark box
    (:func:`~gmfx.models._crops.box_from_landmarks`) around its 68 landmarks, where Deep3DFaceRecon's
    camera (focal 1015, centre 112, 10 dm away) sees a BFM face at ``trans = 0`` about as large as the
    landmarks are. ``code_crop`` stores that square (``k, ox, oy``: crop = ``k`` image + ``(ox, oy)``).
Spaces
    ``local``: BFM shape (decimetres, mean re-centred, y up, z towards the camera). ``v``: the exact
    perspective projection in pixels of the original frame (x right, y down) with ``z`` the distance
    from the camera, scaled to pixels at the face's depth. ``mat``: the same with the weak-perspective
    camera at the face's depth (``trans``), so ``mat @ local`` matches ``v`` at the face's centre and
    departs by the perspective of the face's own depth (a few % of its size) elsewhere.
QC
    ``code_fit_loss`` (time, face, 7): :data:`~gmfx.models._fitting.LOSS_TERMS` of the final fit of
    every frame; ``landmark_px`` is the RMS distance between fitted and detected landmarks in pixels.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from gmfx.models._base import Backend, Face, Identity, Outputs, Topology
from gmfx.models._bfm import BFM_FILE, BfmLayer, BfmModel, load_bfm
from gmfx.models._crops import box_from_landmarks, square_crop, warp_crops
from gmfx.models._files import ModelFile
from gmfx.models._files import model_dir as resolve_model_dir
from gmfx.models._lazy_vertices import as_dask, require_codes, vertex_array
from gmfx.models._fitting import CODE_SIZES, FRAME_CODES, IDENTITY_CODES, LOSS_TERMS, Decoded, FitOptions, Renderer, Targets, fit_identity, fit_video
from gmfx.models._landmarks68 import Landmarks68, LandmarkSource, resolve_landmark_source
from gmfx.storage import Location

__all__ = ["CROP_SCALE", "CROP_SIZE", "BfmFitBackend", "bfm_fit_vertices", "frame_space"]

CROP_SIZE = 224
#: crop side / DECA's landmark box: the 68 points then span ~150 of 224 px, as BFM's do at trans = 0
CROP_SCALE = 1.35
#: per-frame codes of the store: the fitted ones, the crop (k, ox, oy) and the QC losses
STORED_CODES = {**{name: CODE_SIZES[name] for name in FRAME_CODES}, "crop": 3, "fit_loss": len(LOSS_TERMS)}


def crop_parameters(points: np.ndarray) -> np.ndarray:
    """``(n, 3)`` squares ``(k, ox, oy)`` (crop = ``k`` image + offset) around ``(n, 68, 2)`` landmarks."""
    centre, size = box_from_landmarks(points)
    matrix = square_crop(centre, size, scale=CROP_SCALE, out=CROP_SIZE)
    return np.stack([matrix[:, 0, 0], matrix[:, 0, 2], matrix[:, 1, 2]], axis=1)


def crop_matrix(crop: np.ndarray) -> np.ndarray:
    """``(n, 3, 3)`` image -> crop similarities of ``(n, 3)`` crop parameters."""
    matrix = np.zeros((len(crop), 3, 3))
    matrix[:, 0, 0] = matrix[:, 1, 1] = crop[:, 0]
    matrix[:, :2, 2] = crop[:, 1:]
    matrix[:, 2, 2] = 1
    return matrix


def crop_coordinates(layer: BfmLayer, posed: torch.Tensor) -> torch.Tensor:
    """``(B, N, 3)``: x, y crop pixels (y down, centres at integers) and the distance from the camera."""
    u, v = layer.project(posed).unbind(-1)
    return torch.stack([u, 2 * layer.centre - 1 - v, layer.camera_distance - posed[..., 2]], dim=-1)


def bfm_decoder(layer: BfmLayer):
    """The :data:`~gmfx.models._fitting.Decoder` of ``layer``: landmarks only (on the 68 keypoints'
    rows of the bases) unless colours are asked for."""
    keypoints = layer.keypoints
    sub = {name: getattr(layer, name)[keypoints] for name in ("mean_shape", "id_base", "exp_base")}

    def decode(params: Mapping[str, torch.Tensor], colours: bool = True) -> Decoded:
        n = params["exp"].shape[0]
        codes = {name: value.expand(n, -1) if value.shape[0] == 1 else value for name, value in params.items()}
        if not colours:
            local = sub["mean_shape"] + torch.einsum("nck,bk->bnc", sub["id_base"], codes["id"]) + torch.einsum("nck,bk->bnc", sub["exp_base"], codes["exp"])
            points = crop_coordinates(layer, layer.pose(local, codes["angle"], codes["trans"]))
            return Decoded(points[..., :2], points, points, points)
        out = layer(codes, colours=True)
        vertices = crop_coordinates(layer, out["posed"])
        return Decoded(vertices[:, keypoints, :2], vertices, out["colour"], out["albedo"])

    return decode


def frame_space(layer: BfmLayer, codes: Mapping[str, torch.Tensor], crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices ``(B, N, 3)``, the 68 landmarks ``(B, 68, 3)`` and ``mat`` ``(B, 4, 4)`` in pixels of
    the original frames (see the module's *Spaces*) of codes with ``id`` and ``exp``, ``angle``,
    ``trans`` per frame, fitted in the crops ``crop`` ``(B, 3)``."""
    from gmfx.models._bfm import euler_rotation

    with torch.no_grad():
        local = layer.shape(codes["id"], codes["exp"])
        posed = layer.pose(local, codes["angle"], codes["trans"])
        in_crop = crop_coordinates(layer, posed).double().cpu().numpy()
        rotation = euler_rotation(codes["angle"].double()).cpu().numpy()
    trans = codes["trans"].double().cpu().numpy()
    depth = layer.camera_distance - trans[:, 2]
    scale = layer.focal / depth  # crop px per dm at the face's depth
    k, offset = crop[:, 0], crop[:, 1:]
    world = np.empty_like(in_crop)
    world[..., :2] = (in_crop[..., :2] - offset[:, None]) / k[:, None, None]
    world[..., 2] = in_crop[..., 2] * (scale / k)[:, None]
    # mat: image <- crop (1 / k) @ weak perspective (s, -s, -s) @ [R | t]
    camera = np.zeros((len(crop), 4, 4))
    camera[:, 0, 0], camera[:, 1, 1], camera[:, 2, 2] = scale, -scale, -scale
    camera[:, 0, 3] = layer.centre
    camera[:, 1, 3] = layer.centre - 1
    camera[:, 2, 3] = scale * layer.camera_distance
    camera[:, 3, 3] = 1
    pose = np.zeros((len(crop), 4, 4))
    pose[:, :3, :3], pose[:, :3, 3], pose[:, 3, 3] = rotation, trans, 1
    to_image = np.zeros((len(crop), 4, 4))
    to_image[:, 0, 0] = to_image[:, 1, 1] = to_image[:, 2, 2] = 1 / k
    to_image[:, :2, 3] = -offset / k[:, None]
    to_image[:, 3, 3] = 1
    mat = to_image @ camera @ pose
    keypoints = layer.keypoints.cpu().numpy()
    return world.astype(np.float32), world[:, keypoints].astype(np.float32), mat.astype(np.float32)


def _layer_of(root: Location) -> BfmLayer:
    return _layers(load_bfm(root))


@lru_cache(maxsize=4)
def _layers(model: BfmModel) -> BfmLayer:
    return BfmLayer(model)


def _vertex_block(block: np.ndarray, *, url: str) -> np.ndarray:
    """Vertices ``(t, f, N, 3)`` of a ``(t, f, 80 + 64 + 3 + 3 + 3)`` block of id, exp, angle, trans, crop."""
    layer = _layer_of(Location(url, {}))
    t, f = block.shape[:2]
    flat = block.reshape(t * f, -1)
    out = np.full((t * f, layer.n_vertices, 3), np.nan, np.float32)
    rows = np.flatnonzero(np.isfinite(flat).all(axis=1))
    if len(rows):
        values = torch.from_numpy(flat[rows].astype(np.float32))
        codes = dict(zip(("id", "exp", "angle", "trans"), torch.split(values[:, :150], [80, 64, 3, 3], dim=1)))
        out[rows] = frame_space(layer, codes, flat[rows, 150:].astype(np.float64))[0]
    return out.reshape(t, f, layer.n_vertices, 3)


def bfm_fit_vertices(ds: Any, *, model_dir: str | None = None) -> Any:
    """The vertices ``v`` (time, face, vertex, coord) of a ``bfm-fit`` recon store, lazily from its
    codes: per time chunk, ``identity_id`` of the face with ``code_exp``, ``code_angle``,
    ``code_trans`` through the BFM of the model directory (``model_dir``, else the store's), placed
    in the frame with ``code_crop``; equal to the vertices recon computed."""
    import dask.array as da

    needed = ("identity_id", "code_exp", "code_angle", "code_trans", "code_crop")
    require_codes(ds, needed, deriving="BFM vertices", fix="pass a recon store written by --model bfm-fit")
    root = resolve_model_dir(model_dir or ds.attrs.get("model_dir"))
    layer = _layer_of(root)
    codes = [as_dask(ds[name]) for name in needed[1:]]
    identity = as_dask(ds["identity_id"])  # (face, 80)
    times = codes[0].chunks[0]
    identity = da.broadcast_to(identity[None], (ds.sizes["time"], *identity.shape), chunks=(times, *identity.chunks))
    inputs = da.concatenate([identity, *codes], axis=2).rechunk({1: -1, 2: -1})
    data = inputs.map_blocks(_vertex_block, url=root.url, dtype=np.float32, drop_axis=2, new_axis=[2, 3],
                             chunks=(inputs.chunks[0], inputs.chunks[1], (layer.n_vertices,), (3,)))
    return vertex_array(data, ds, derived="BFM(identity, codes) through the perspective camera and code_crop")


class BfmFitBackend(Backend):
    """3DMM fitting (BFM 2009 front model with expressions) to landmarks and pixels, CPU or CUDA.

    Options of :meth:`load`: ``model_dir``; ``landmarks`` (``auto``: FAN when its weights are
    installed, else MediaPipe; ``fan``; ``mediapipe``); ``min_detection_confidence`` (0.5);
    ``identity_fit_frames`` (16); and every field of :class:`~gmfx.models._fitting.FitOptions`
    (iteration counts, learning rates, loss weights, ``photometric``).
    """

    name = "bfm-fit"
    version = "3dmm-fit-bfm09"
    requires_gpu = False
    devices = ("cpu", "cuda")
    batch_size = 32
    units = "pixels"
    outputs = Outputs(codes=dict(STORED_CODES), n_landmarks=68)
    identity: ClassVar[Mapping[str, int]] = {name: CODE_SIZES[name] for name in IDENTITY_CODES}
    identity_frames: ClassVar[int] = 32
    identity_signature: ClassVar[int] = 2 * 68
    model_files: ClassVar[tuple[ModelFile, ...]] = (BFM_FILE,)
    derives_vertices = True

    def __init__(self, layer: BfmLayer, device: str, *, landmarks: LandmarkSource = "auto", min_detection_confidence: float = 0.5,
                 identity_fit_frames: int = 16, fit: FitOptions | None = None) -> None:
        self.device = torch.device(device)
        # the process's cached layer stays on the CPU (topology and lazy vertices use it)
        self.layer = layer if self.device.type == "cpu" else copy.deepcopy(layer).to(self.device)
        self.decode = bfm_decoder(self.layer)
        self.fit = fit or FitOptions()
        self.identity_fit_frames = int(identity_fit_frames)
        self.landmarks = Landmarks68(landmarks, device, min_detection_confidence)
        self.renderer = Renderer(layer.triangles.cpu().numpy(), self.device) if self.fit.photometric else None
        self._lock = threading.Lock()
        self._previous: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def topology(cls) -> Topology:
        layer = _layer_of(resolve_model_dir())
        template = layer.mean_shape.cpu().numpy()
        return Topology(name=f"bfm-front-{layer.n_vertices}", template=template, triangles=layer.triangles.cpu().numpy().astype(np.int32),
                        units="dm", rigid=np.ones(layer.n_vertices, bool))

    @classmethod
    def vertices(cls, ds: Any) -> Any:
        return bfm_fit_vertices(ds)

    @staticmethod
    def _check_options(*, model_dir: str | None = None, landmarks: LandmarkSource = "auto", min_detection_confidence: float = 0.5,
                       identity_fit_frames: int = 16, **fit: Any) -> dict[str, Any]:
        if landmarks not in ("auto", "fan", "mediapipe"):
            raise ValueError(f"landmarks must be auto, fan or mediapipe, not {landmarks!r}")
        if isinstance(identity_fit_frames, bool) or not isinstance(identity_fit_frames, int) or identity_fit_frames < 1:
            raise ValueError(f"identity_fit_frames must be a whole number >= 1, not {identity_fit_frames!r}")
        return {"model_dir": model_dir, "landmarks": landmarks, "min_detection_confidence": float(min_detection_confidence),
                "identity_fit_frames": identity_fit_frames, "fit": FitOptions.from_options(**fit)}

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        checked = cls._check_options(**options)
        return {
            "model_dir": resolve_model_dir(checked["model_dir"]).url,
            "landmark_source": resolve_landmark_source(checked["landmarks"]),
            "identity_fit_frames": checked["identity_fit_frames"],
            "fit_options": json.dumps(asdict(checked["fit"])),
            "fit_loss_terms": list(LOSS_TERMS),
            "crop": f"square of {CROP_SCALE} x the landmark box, {CROP_SIZE} px; code_crop = (k, ox, oy)",
            "camera": "perspective, focal 1015, centre 112, 10 dm (Deep3DFaceRecon's); mat = weak perspective at the face's depth",
            "torch_version": torch.__version__,
        }

    @classmethod
    def load(cls, device: str, **options: Any) -> BfmFitBackend:
        checked = cls._check_options(**options)
        root = resolve_model_dir(checked.pop("model_dir"))
        from gmfx.models.deca import adopt_model_dir

        adopt_model_dir(root)
        return cls(_layer_of(root), device, **checked)

    def reset(self) -> None:
        self.landmarks.reset()
        self._previous.clear()

    # -- shared steps -------------------------------------------------------------------------

    def _targets(self, frames: np.ndarray, index: np.ndarray, points: np.ndarray) -> tuple[Targets, np.ndarray]:
        """Crops of ``frames[index]`` around ``points`` ``(n, 68, 2)`` and the crop parameters."""
        crop = crop_parameters(points)
        matrices = crop_matrix(crop)
        in_crop = points @ matrices[:, :2, :2].transpose(0, 2, 1) + matrices[:, None, :2, 2]
        images = None
        if self.fit.photometric:
            with torch.no_grad():
                frames_t = torch.from_numpy(np.ascontiguousarray(frames[np.unique(index)])).to(self.device)
                local_index = torch.as_tensor(np.searchsorted(np.unique(index), index), device=self.device)
                images = warp_crops(frames_t, torch.from_numpy(matrices).to(self.device), local_index, out=CROP_SIZE).permute(0, 2, 3, 1).contiguous()
        landmarks = torch.as_tensor(in_crop, dtype=torch.float32, device=self.device)
        return Targets(landmarks, CROP_SIZE, images), crop

    def _skin(self) -> torch.Tensor | None:
        skin = getattr(self.layer, "skin", None)
        return None if skin is None else skin.to(self.device)

    # -- identity pass ------------------------------------------------------------------------

    def estimate_identity(self, frames: np.ndarray, *, max_faces: int) -> list[Identity]:
        """Per face seen in ``frames`` (at most ``max_faces``), ``id`` and ``tex`` fitted jointly on its
        ``identity_fit_frames`` best-detected frames (highest score, evenly spread among equals)."""
        self.landmarks.reset()
        detections = self.landmarks(frames, max_faces)
        self.landmarks.reset()
        tracks = group_faces(detections, max_faces)
        identities = []
        for track in tracks:
            chosen = best_frames(track, self.identity_fit_frames)
            index = np.array([i for i, _, _ in chosen])
            points = np.stack([p for _, p, _ in chosen])
            targets, _ = self._targets(frames, index, points)
            with self._lock:
                params, _ = fit_identity(self.decode, targets, self.fit, renderer=self.renderer, skin=self._skin())
            codes = {name: params[name][0].cpu().numpy().astype(np.float32) for name in IDENTITY_CODES}
            if all(np.isfinite(value).all() for value in codes.values()):
                identities.append(Identity(codes=codes, frames=index.astype(np.int64), signature=shape_signature(points).astype(np.float32)))
        return identities

    # -- segments -----------------------------------------------------------------------------

    def reconstruct(self, frames: np.ndarray, *, max_faces: int, identities: Sequence[Identity] = ()) -> list[list[Face]]:
        result: list[list[Face]] = [[] for _ in frames]
        detections = self.landmarks(frames, max_faces)
        if not identities:
            return result
        owners = assign_faces(detections, identities)
        for face_index, rows in owners.items():
            index = np.array([i for i, _, _ in rows])
            points = np.stack([p for _, p, _ in rows])
            targets, crop = self._targets(frames, index, points)
            identity = {name: torch.as_tensor(identities[face_index].codes[name], device=self.device) for name in IDENTITY_CODES}
            with self._lock:
                params, losses = fit_video(self.decode, targets, identity, self.fit, start=self._previous.get(face_index),
                                           renderer=self.renderer, skin=self._skin())
            self._previous[face_index] = {name: params[name][-1:].detach() for name in FRAME_CODES}
            codes = {name: params[name].expand(len(index), -1) for name in CODE_SIZES}
            vertices, landmarks, mats = frame_space(self.layer, codes, crop)
            fitted = torch.stack([losses[name] for name in LOSS_TERMS[1:]], dim=1).cpu().numpy()
            residual = landmarks[..., :2].astype(np.float64) - points
            landmark_px = np.sqrt((residual**2).sum(-1).mean(-1))
            qc = np.concatenate([landmark_px[:, None], fitted], axis=1).astype(np.float32)
            frame_codes = {name: params[name].cpu().numpy().astype(np.float32) for name in FRAME_CODES}
            for k, (i, _, score) in enumerate(rows):
                codes_k = {**{name: value[k] for name, value in frame_codes.items()}, "crop": crop[k].astype(np.float32), "fit_loss": qc[k]}
                if not all(np.isfinite(value).all() for value in codes_k.values()):
                    continue  # a diverged fit is no face (a NaN row), never a crash
                result[i].append(Face(vertices=vertices[k], mat=mats[k], score=float(score), codes=codes_k, landmarks=landmarks[k],
                                      identity=face_index))
        return result


def shape_signature(points: np.ndarray) -> np.ndarray:
    """``(136,)``: the mean of ``(n, 68, 2)`` landmark sets after removing each one's position and size."""
    centred = points - points.mean(axis=1, keepdims=True)
    scaled = centred / np.sqrt((centred**2).sum(axis=(1, 2), keepdims=True) / points.shape[1])
    return scaled.mean(axis=0).reshape(-1)


Detection = tuple[int, np.ndarray, float]


def group_faces(detections: list[list[tuple[np.ndarray, float]]], max_faces: int) -> list[list[Detection]]:
    """Detections of several frames grouped into at most ``max_faces`` faces: the frame with the most
    faces seeds them, every other frame's faces join the group whose landmark shape is closest (one
    face per group and frame, an optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    found = [(i, points, score) for i, faces in enumerate(detections) for points, score in faces]
    if not found:
        return []
    seed_frame = max(range(len(detections)), key=lambda i: (len(detections[i]), -i))
    groups: list[list[Detection]] = [[(seed_frame, points, score)] for points, score in detections[seed_frame][:max_faces]]
    for i, faces in enumerate(detections):
        if i == seed_frame or not faces:
            continue
        signatures = np.stack([shape_signature(np.stack([p for _, p, _ in group])) for group in groups])
        cost = np.array([[np.linalg.norm(shape_signature(points[None]) - s) for s in signatures] for points, _ in faces])
        for row, column in zip(*linear_sum_assignment(cost)):
            groups[column].append((i, *faces[row]))
    return [sorted(group, key=lambda item: item[0]) for group in groups]


def best_frames(track: list[Detection], count: int) -> list[Detection]:
    """The ``count`` detections with the highest scores, ties resolved by spreading them evenly in time."""
    if len(track) <= count:
        return track
    threshold = sorted((score for _, _, score in track), reverse=True)[count - 1]
    good = [item for item in track if item[2] > threshold]
    equal = [item for item in track if item[2] == threshold]
    picks = np.linspace(0, len(equal) - 1, count - len(good)).round().astype(int)
    return sorted(good + [equal[k] for k in picks], key=lambda item: item[0])


def assign_faces(detections: list[list[tuple[np.ndarray, float]]], identities: Sequence[Identity]) -> dict[int, list[Detection]]:
    """Per identity index, ``(frame, points, score)`` of the face that is it in each frame: the only
    identity takes each frame's best-scored face; several are matched by landmark shape
    (:func:`shape_signature`, an optimal assignment per frame)."""
    from scipy.optimize import linear_sum_assignment

    owners: dict[int, list[Detection]] = {}
    for i, faces in enumerate(detections):
        if not faces:
            continue
        if len(identities) == 1:
            points, score = max(faces, key=lambda face: face[1])
            owners.setdefault(0, []).append((i, points, score))
            continue
        cost = np.array([[np.linalg.norm(shape_signature(points[None]) - identity.signature) for identity in identities] for points, _ in faces])
        for row, column in zip(*linear_sum_assignment(cost)):
            owners.setdefault(int(column), []).append((i, *faces[row]))
    return owners
