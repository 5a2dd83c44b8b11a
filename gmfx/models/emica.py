"""EMICA (inferno's default face reconstruction) as gmfx backends: MICA identity, DECA pose and camera,
EMOCA expression, FLAME 2020 with 300 shape and 100 expression components.

Two passes per recording (:mod:`gmfx.stages.recon`):

identity
    On ``identity_frames`` frames evenly spaced over the recording, each face with a detection score
    of at least ``identity_min_score`` is cropped onto ArcFace's 5-point template (points from
    MediaPipe's or FAN's landmarks, :mod:`gmfx.models._arcface`) and MICA gives its normalised ArcFace
    embedding and 300 shape codes. Faces are grouped across frames by embedding (cosine similarity,
    one-to-one per frame, the frame with most faces as seeds); each face's shape is the element-wise
    median over its frames (robust to a bad crop), stored once as ``identity_shape`` (face, 300) with
    the frames used and the mean embedding as ``identity_signature``.
segments
    Per frame, DECA's crop (224 px) feeds the DECA encoder (``texcode``, ``globalpose``, ``cam``,
    ``lightcode`` and, unless the expression encoder predicts it, ``jawpose``) and the expression
    encoder (``expcode`` 100, and ``jawpose`` in the ``*_jaw`` models), in the order ``cfg.yaml``
    lists them; with several identities each face is matched to one by its ArcFace embedding. FLAME
    decodes the recording's shape with the frame's expression and jaw; ``mat`` and the 68 landmarks
    follow DECA's camera as in :mod:`gmfx.models.deca`.

The store keeps codes only (``code_exp`` 100, ``code_pose`` = global 3 + jaw 3, ``code_cam``,
``code_tex``, ``code_light``; ``identity_shape``); :func:`emica_vertices` derives ``v`` lazily.
``emica_detail`` adds DECA's detail encoder: a 128-d ``code_detail`` per frame, from which
:func:`detail_displacements` derives DECA's 256 x 256 UV displacement maps lazily.

Files in the model directory: ``EMICA/EMICA-CVT_flame2020_notexture/`` (``cfg.yaml`` + ``**/*.ckpt``,
inferno's ``FaceReconstruction`` zip), the FLAME 2020 files of :mod:`gmfx.models.deca`,
``MICA/mica.tar`` when the checkpoint carries no MICA weights, and ``DECA/deca_model.tar`` for detail.
The checkpoint's key prefixes are checked: a missing one is reported beside what the file holds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from scipy.optimize import linear_sum_assignment

from gmfx._errors import ModelError
from gmfx.models._arcface import MicaNetwork, arcface_crop, arcface_input, five_points, load_mica_state
from gmfx.models._base import Face, Identity, Outputs
from gmfx.models._crops import crop_to_image, orthographic_camera, square_crop, warp_crops
from gmfx.models._detail import DetailGenerator, displacement_input
from gmfx.models._files import ModelFile, find_model_file, read_model_file
from gmfx.models._files import model_dir as resolve_model_dir
from gmfx.models._flame import FlameLayer, read_landmark_embedding, rodrigues
from gmfx.models._lazy_vertices import as_dask, require_codes, vertex_array
from gmfx.models._pickle import load_torch
from gmfx.models._resnet import ResNetEncoder, load_strict
from gmfx.models.deca import (
    DECA_FILE,
    FLAME_FILE,
    FLAME_MASKS_FILE,
    LANDMARK_FILE,
    DecaBackend,
    _options_key,
    adopt_model_dir,
    load_flame_model,
    to_world,
)
from gmfx.models.emoca import best_checkpoint
from gmfx.storage import Location

__all__ = [
    "EMICA_CODES",
    "MICA_FILE",
    "EmicaBackend",
    "EmicaDetailBackend",
    "detail_displacements",
    "emica_files",
    "emica_vertices",
    "load_mica",
]

_OBTAIN_EMICA = (
    "register at https://emoca.is.tue.mpg.de, run inferno_apps/FaceReconstruction/download_assets.sh of "
    "https://github.com/radekd91/inferno and copy assets/FaceReconstruction/models/<name>/ to EMICA/<name>/"
)
MICA_FILE = ModelFile(
    "mica",
    ("MICA/mica.tar",),
    "MICA model (only when the EMICA checkpoint lacks MICA's weights)",
    "register at https://zielon.github.io/mica/ and download mica.tar (link in install.sh of https://github.com/Zielon/MICA) into MICA/",
)
DEFAULT_FOLDER = "EMICA-CVT_flame2020_notexture"

#: per-frame codes of the store: name -> size (pose = global axis-angle 3 + jaw 3, as DECA's)
EMICA_CODES = {"exp": 100, "pose": 6, "cam": 3, "tex": 50, "light": 27}
N_SHAPE = 300
#: what inferno's encoders predict (cfg.yaml ``predicts``) -> gmfx's code and its size
_PREDICTS = {"expcode": ("exp", 100), "texcode": ("tex", 50), "globalpose": ("global", 3), "jawpose": ("jaw", 3),
             "cam": ("cam", 3), "lightcode": ("light", 27)}  # fmt: skip
_PREFIX = {
    "mica arcface": "face_encoder.mica_deca_encoder.mica_encoder.E_mica.arcface.",
    "mica regressor": "face_encoder.mica_deca_encoder.mica_encoder.E_mica.flameModel.regressor.",
    "deca encoder": "face_encoder.mica_deca_encoder.deca_encoder.encoder.",
    "expression encoder": "face_encoder.expression_encoder.encoder.",
}
#: prefixes of the checkpoint that inference does not use (FLAME and renderer buffers)
_IGNORED = ("shape_model.", "renderer.")
#: faces whose detection score is below this do not enter the identity (MediaPipe's BlazeFace scores
#: real, frontal faces above 0.9 in the clips of tests/data)
IDENTITY_MIN_SCORE = 0.7


def emica_files(folder: str) -> tuple[ModelFile, ModelFile]:
    """The ``cfg.yaml`` and checkpoint entries of the EMICA model folder ``EMICA/<folder>``."""
    return (
        ModelFile(f"emica_cfg:{folder}", (f"EMICA/{folder}/cfg.yaml",), f"EMICA configuration ({folder})", _OBTAIN_EMICA),
        ModelFile(f"emica_ckpt:{folder}", (f"EMICA/{folder}/**/*.ckpt",), f"EMICA checkpoint ({folder})", _OBTAIN_EMICA),
    )


def load_mica(root: Location) -> MicaNetwork:
    """MICA's networks from ``MICA/mica.tar``: ``arcface`` and ``flameModel.regressor.*`` strictly; the
    FLAME buffers ``flameModel.generator.*`` are ignored; any other key is an error."""
    data, where = read_model_file(root, MICA_FILE)
    checkpoint = load_torch(data, where=where)
    if not isinstance(checkpoint, Mapping) or not {"arcface", "flameModel"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ModelError(f"mica.tar holds {found}, expected 'arcface' and 'flameModel'", where=where, fix="use the original mica.tar")
    flame_model = checkpoint["flameModel"]
    regressor = {k.removeprefix("regressor."): v for k, v in flame_model.items() if k.startswith("regressor.")}
    other = sorted(k for k in flame_model if not k.startswith(("regressor.", "generator.")))
    if other:
        raise ModelError(
            f"mica.tar's flameModel holds keys other than regressor.* and generator.*: {', '.join(other[:5])}",
            where=where,
            fix="use the original mica.tar",
        )
    network = MicaNetwork()
    load_mica_state(network, checkpoint["arcface"], regressor, where=where)
    return network.eval()


def _emica_config(text: bytes, where: str) -> tuple[dict[str, int], dict[str, int]]:
    """The ``predicts`` (ordered name -> size) of the DECA and the expression encoder in ``cfg.yaml``."""
    try:
        cfg = yaml.safe_load(text)
        encoders = (cfg.get("model") or cfg)["face_encoder"]["encoders"]
        deca = dict(encoders["mica_deca_encoder"]["encoders"]["deca_encoder"]["predicts"])
        expression = dict(encoders["expression_encoder"]["predicts"])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        raise ModelError(
            f"cfg.yaml has no EMICA encoder settings (model.face_encoder.encoders.{{mica_deca_encoder.encoders.deca_encoder,"
            f"expression_encoder}}.predicts; {type(error).__name__}: {error})",
            where=where,
            fix="use the cfg.yaml of the EMICA model folder",
        ) from None
    problems = [
        f"{name}: {size}" for name, size in {**deca, **expression}.items() if name not in _PREDICTS or _PREDICTS[name][1] != size
    ]
    produced = set(deca) | set(expression)
    missing = [name for name in _PREDICTS if name not in produced]
    if problems or missing:
        raise ModelError(
            f"cfg.yaml's encoders predict {'unexpected ' + ', '.join(problems) if problems else ''}"
            f"{'; ' if problems and missing else ''}{'nothing for ' + ', '.join(missing) if missing else ''}",
            where=where,
            fix=f"gmfx's EMICA reads {', '.join(f'{k} {v[1]}' for k, v in _PREDICTS.items())}: use the cfg.yaml of a ResNet-50 EMICA model",
        )
    return deca, expression


def _prefix_report(state: Mapping[str, Any], expected: Sequence[str]) -> str:
    found = sorted({next((p for p in expected if key.startswith(p)), ".".join(key.split(".")[:2]) + ".") + "*" for key in state})
    return f"expected {', '.join(p + '*' for p in expected)}; the file holds {', '.join(found[:12]) or 'nothing'}"


class EmicaBackend(DecaBackend):
    """EMICA, coarse (``EMICA-CVT_flame2020_notexture``). Options as
    :class:`~gmfx.models.deca.DecaBackend` plus ``checkpoint`` (another folder under ``EMICA/``) and
    ``identity_min_score`` (:data:`IDENTITY_MIN_SCORE`)."""

    name = "emica"
    version = "emica-coarse-flame2020"
    batch_size = 32
    outputs = Outputs(codes=dict(EMICA_CODES), n_landmarks=68)
    identity = {"shape": N_SHAPE}
    identity_frames = 32
    identity_signature = 512
    default_folder: ClassVar[str] = DEFAULT_FOLDER
    model_files: ClassVar[tuple[ModelFile, ...]] = (FLAME_FILE, LANDMARK_FILE, *emica_files(DEFAULT_FOLDER), MICA_FILE, FLAME_MASKS_FILE)

    def __init__(self, networks: dict[str, torch.nn.Module], predicts: tuple[dict, dict], flame: FlameLayer, device: str, *,
                 identity_min_score: float = IDENTITY_MIN_SCORE, **options: Any) -> None:  # fmt: skip
        super().__init__(networks["deca"], flame, device, **options)
        self.expression_encoder = self._on_device(networks["expression"])
        self.mica = networks["mica"].to(self.device).eval()
        self.detail_encoder = self._on_device(networks["detail"]) if "detail" in networks else None
        self.deca_predicts, self.expression_predicts = predicts
        self.identity_min_score = float(identity_min_score)
        self._lock = threading.Lock()

    @classmethod
    def _split_options(cls, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        own = {k: options[k] for k in ("checkpoint", "identity_min_score") if k in options}
        return own, {k: v for k, v in options.items() if k not in own}

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        own, rest = cls._split_options(options)
        attrs = super().attrs(**rest)
        return {
            **attrs,
            "emica_folder": own.get("checkpoint") or cls.default_folder,
            "identity": "MICA shape: element-wise median over the sampled frames of each face (ArcFace 5-point crop)",
            "identity_min_score": float(own.get("identity_min_score", IDENTITY_MIN_SCORE)),
            "crop": attrs["crop"] + "; ArcFace: 5 points -> 112 px template, least-squares similarity",
        }

    @classmethod
    def load(cls, device: str, **options: Any) -> EmicaBackend:
        own, rest = cls._split_options(options)
        checked = cls._check_options(**rest)
        root = resolve_model_dir(checked.pop("model_dir"))
        adopt_model_dir(root)
        networks, predicts = _shared_networks(cls, root.url, _options_key(root), own.get("checkpoint") or cls.default_folder, device)
        if own.get("identity_min_score") is not None:
            checked["identity_min_score"] = float(own["identity_min_score"])
        return cls(networks, predicts, cls._emica_flame(root), device, **checked)

    @classmethod
    def _emica_flame(cls, root: Location) -> FlameLayer:
        model = load_flame_model(root)
        data, where = read_model_file(root, LANDMARK_FILE)
        embedding = read_landmark_embedding(data, where=where, n_faces=len(model.faces))
        return FlameLayer(model, n_shape=N_SHAPE, n_expression=EMICA_CODES["exp"], embedding=embedding)

    @classmethod
    def _load_networks(cls, root: Location, folder: str) -> tuple[dict[str, torch.nn.Module], tuple[dict, dict]]:
        cfg_file, ckpt_file = emica_files(folder)
        text, cfg_where = read_model_file(root, cfg_file)
        deca_predicts, expression_predicts = _emica_config(text, cfg_where)
        if find_model_file(root, ckpt_file) is None:
            read_model_file(root, ckpt_file)  # the missing-file error, saying where to get it
        fs, base = root.filesystem()
        chosen = best_checkpoint(sorted(fs.glob(f"{base.rstrip('/')}/{ckpt_file.paths[0]}")))
        with fs.open(chosen, "rb") as handle:
            checkpoint = load_torch(handle.read(), where=chosen, lightning=True)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
        if not isinstance(state, Mapping):
            raise ModelError("the EMICA checkpoint has no 'state_dict'", where=chosen, fix="use the checkpoint of the EMICA model folder")
        parts = {name: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for name, p in _PREFIX.items()}
        required = ["deca encoder", "expression encoder"]
        absent = [name for name in required if not parts[name]]
        unknown = sorted(k for k in state if not k.startswith((*_PREFIX.values(), *_IGNORED)))
        if absent or unknown:
            raise ModelError(
                f"the EMICA checkpoint {'lacks ' + ', '.join(_PREFIX[n] + '*' for n in absent) if absent else ''}"
                f"{'; ' if absent and unknown else ''}{'holds unknown keys ' + ', '.join(unknown[:5]) if unknown else ''} "
                f"({_prefix_report(state, list(_PREFIX.values()))})",
                where=chosen,
                fix="use the checkpoint of inferno's EMICA model folder (ResNet-50 encoders)",
            )
        deca = ResNetEncoder(sum(deca_predicts.values()))
        load_strict(deca, parts["deca encoder"], where=f"{chosen} [{_PREFIX['deca encoder']}*]")
        expression = ResNetEncoder(sum(expression_predicts.values()))
        load_strict(expression, parts["expression encoder"], where=f"{chosen} [{_PREFIX['expression encoder']}*]")
        if parts["mica arcface"] or parts["mica regressor"]:
            mica = MicaNetwork()
            load_mica_state(mica, parts["mica arcface"], parts["mica regressor"], where=f"{chosen} [{_PREFIX['mica arcface'][:-9]}*]")
        else:
            mica = load_mica(root)
        return {"deca": deca, "expression": expression, "mica": mica.eval()}, (deca_predicts, expression_predicts)

    # -- identity ------------------------------------------------------------------------------------
    def _mica(self, frames: np.ndarray, owners: list[tuple[int, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings (N, 512), shapes (N, 300))`` of the faces ``owners`` (frame, landmarks, score)."""
        matrices = arcface_crop(five_points(np.stack([points for _, points, _ in owners])))
        with self._lock, torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            index = torch.tensor([i for i, _, _ in owners], device=self.device)
            inputs = arcface_input(images, torch.from_numpy(matrices).to(self.device), index)
            embedding, shape = self.mica(inputs)
        return embedding.double().cpu().numpy(), shape.double().cpu().numpy()

    def estimate_identity(self, frames: np.ndarray, *, max_faces: int) -> list[Identity]:
        owners = []
        for i, frame in enumerate(frames):
            self.detector.reset()  # sampled frames are far apart: detect afresh in each
            owners += [(i, points, score) for points, score in self.detector(frame[None], max_faces)[0] if score >= self.identity_min_score]
        self.detector.reset()
        if not owners:
            return []
        embeddings, shapes = self._mica(frames, owners)
        frame_of = np.array([i for i, _, _ in owners])
        counts = np.bincount(frame_of, minlength=len(frames))
        seeds = embeddings[frame_of == int(np.argmax(counts))]
        members: list[list[int]] = [[] for _ in seeds]
        for i in np.unique(frame_of):
            rows = np.flatnonzero(frame_of == i)
            faces, slots = linear_sum_assignment(-(embeddings[rows] @ seeds.T))
            for face, slot in zip(faces, slots):
                members[slot].append(int(rows[face]))
        identities = []
        for group in members:
            mean = embeddings[group].mean(axis=0)
            identities.append(Identity(
                codes={"shape": np.median(shapes[group], axis=0).astype(np.float32)},
                frames=frame_of[group].astype(np.int64),
                signature=(mean / np.linalg.norm(mean)).astype(np.float32),
            ))  # fmt: skip
        return identities

    # -- segments ------------------------------------------------------------------------------------
    def encode(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """EMICA's per-frame codes (:data:`EMICA_CODES`, plus ``detail`` with the detail encoder) of 224 px crops."""
        parts: dict[str, torch.Tensor] = {}
        for predicts, encoder in ((self.deca_predicts, self.encoder), (self.expression_predicts, self.expression_encoder)):
            code, start = self._run_encoder(encoder, crops), 0
            for name, size in predicts.items():  # in cfg order; the expression encoder's jaw wins, as in inferno
                parts[_PREDICTS[name][0]] = code[:, start : start + size]
                start += size
        codes = {"exp": parts["exp"], "pose": torch.cat([parts["global"], parts["jaw"]], dim=1), "cam": parts["cam"],
                 "tex": parts["tex"], "light": parts["light"]}  # fmt: skip
        if self.detail_encoder is not None:
            codes["detail"] = self._run_encoder(self.detail_encoder, crops)
        return codes

    def _match(self, frames: np.ndarray, owners: list, identities: Sequence[Identity]) -> list[int]:
        """The identity of each detected face (-1: none left in its frame), by ArcFace embedding."""
        if len(identities) == 1 and all(np.bincount([i for i, _, _ in owners]) <= 1):
            return [0] * len(owners)
        embeddings, _ = self._mica(frames, owners)
        signatures = np.stack([np.asarray(identity.signature, np.float64) for identity in identities])
        frame_of = np.array([i for i, _, _ in owners])
        assigned = [-1] * len(owners)
        for i in np.unique(frame_of):
            rows = np.flatnonzero(frame_of == i)
            faces, slots = linear_sum_assignment(-(embeddings[rows] @ signatures.T))
            for face, slot in zip(faces, slots):
                assigned[int(rows[face])] = int(slot)
        return assigned

    def reconstruct(self, frames: np.ndarray, *, max_faces: int, identities: Sequence[Identity] = ()) -> list[list[Face]]:
        if not identities:
            raise ModelError(
                f"the model {self.name!r} reconstructs with the identities of its identity pass, and got none",
                where=f"{type(self).__name__}.reconstruct",
                fix="run it through gmfx recon (run_recon), which estimates the identities first",
            )
        detections = self.detector(frames, max_faces)
        owners = [(i, points, score) for i, found in enumerate(detections) for points, score in found]
        result: list[list[Face]] = [[] for _ in frames]
        if not owners:
            return result
        matched = self._match(frames, owners, identities)
        owners, slots = [o for o, k in zip(owners, matched) if k >= 0], [k for k in matched if k >= 0]
        centre, size = self._boxes(owners)
        crop = square_crop(centre, size)
        shape = torch.from_numpy(np.stack([np.asarray(identities[k].codes["shape"], np.float32) for k in slots]))
        with self._lock, torch.inference_mode():
            images = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            index = torch.tensor([i for i, _, _ in owners], device=self.device)
            crops = warp_crops(images, torch.from_numpy(crop).to(self.device), index)
            codes = self.encode(crops)
            local, landmarks, root = self._decode({**codes, "shape": shape.to(self.device)})
        codes_np = {name: value.float().cpu().numpy() for name, value in codes.items()}
        global_rotation = rodrigues(codes["pose"][:, :3].double()).cpu().numpy()
        mats = (crop_to_image(crop) @ orthographic_camera(codes_np["cam"]) @ self._root_rotation(global_rotation, root)).astype(np.float32)
        vertices = to_world(local.float().cpu().numpy(), mats)
        points = to_world(landmarks.float().cpu().numpy(), mats)
        for k, ((i, _, score), slot) in enumerate(zip(owners, slots)):
            result[i].append(Face(
                vertices=vertices[k], mat=mats[k], score=float(score),
                codes={name: value[k] for name, value in codes_np.items()}, landmarks=points[k], identity=slot,
            ))  # fmt: skip
        return result

    @classmethod
    def vertices(cls, ds: Any) -> Any:
        return emica_vertices(ds)


class EmicaDetailBackend(EmicaBackend):
    """EMICA with DECA's detail encoder (``E_detail`` of ``DECA/deca_model.tar``): adds a 128-d
    ``code_detail`` per frame; :func:`detail_displacements` derives the UV displacement maps."""

    name = "emica_detail"
    version = "emica-detail-flame2020"
    outputs = Outputs(codes={**EMICA_CODES, "detail": 128}, n_landmarks=68)
    model_files = (*EmicaBackend.model_files, DECA_FILE)

    @classmethod
    def _load_networks(cls, root: Location, folder: str) -> tuple[dict[str, torch.nn.Module], tuple[dict, dict]]:
        networks, predicts = super()._load_networks(root, folder)
        data, where = read_model_file(root, DECA_FILE)
        checkpoint = load_torch(data, where=where)
        if not isinstance(checkpoint, Mapping) or "E_detail" not in checkpoint:
            found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ModelError(f"deca_model.tar lacks 'E_detail' (it holds {found})", where=where, fix="use the original deca_model.tar")
        detail = ResNetEncoder(128)
        load_strict(detail, checkpoint["E_detail"], where=f"{where} [E_detail]")
        return {**networks, "detail": detail}, predicts

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        return {**super().attrs(**options), "detail": "DECA E_detail code (128); D_detail(jaw 3, exp[:50], detail) -> UV displacements"}


@lru_cache(maxsize=2)
def _shared_networks(
    cls: type[EmicaBackend], url: str, storage_options: str, folder: str, device: str
) -> tuple[dict[str, torch.nn.Module], tuple[dict, dict]]:
    """The networks of a model folder on ``device``, read once per process and device: every thread's
    backend (each has its own detector state) runs the same modules, which inference does not modify
    (measured here, loaded 2-core box: a 4-frame recording in 3 tasks on 2 threads took 22 s with a
    load per thread, 14 s shared)."""
    networks, predicts = cls._load_networks(Location(url, json.loads(storage_options)), folder)
    return {name: network.to(device) for name, network in networks.items()}, predicts


# -- lazy derivations ---------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _emica_decoder(url: str) -> FlameLayer:
    return FlameLayer(load_flame_model(Location(url)), n_shape=N_SHAPE, n_expression=EMICA_CODES["exp"])


def _emica_vertex_block(block: np.ndarray, shapes: np.ndarray, *, url: str) -> np.ndarray:
    """Vertices ``(t, f, V, 3)`` of a ``(t, f, 100 + 6 + 16)`` block of exp, pose and flattened ``mat``
    with the faces' ``(f, 300)`` shapes."""
    layer = _emica_decoder(url)
    t, f = block.shape[:2]
    flat = block.reshape(t * f, -1)
    shape = np.broadcast_to(shapes[None], (t, f, N_SHAPE)).reshape(t * f, N_SHAPE)
    out = np.full((t * f, layer.n_vertices, 3), np.nan, np.float32)
    rows = np.flatnonzero(np.isfinite(flat).all(axis=1) & np.isfinite(shape).all(axis=1))
    if len(rows):
        codes = torch.from_numpy(flat[rows, :106].astype(np.float32))
        with torch.inference_mode():
            local, _, _ = layer(torch.from_numpy(shape[rows].astype(np.float32)), codes[:, :100], jaw=codes[:, 103:106])
        out[rows] = to_world(local.numpy(), flat[rows, 106:].reshape(-1, 4, 4))
    return out.reshape(t, f, layer.n_vertices, 3)


def emica_vertices(ds: Any, *, model_dir: str | None = None) -> Any:
    """The vertices ``v`` (time, face, vertex, coord) of an EMICA recon store, lazily: one Dask task
    per time chunk decodes each face's ``identity_shape`` with the frame's ``code_exp`` and the jaw of
    ``code_pose`` through FLAME (300 shape, 100 expression components) and applies ``mat``."""
    import dask.array as da

    require_codes(ds, ("code_exp", "code_pose", "mat", "identity_shape"), deriving="EMICA vertices", fix="pass a recon store written by gmfx recon --model emica")
    root = resolve_model_dir(model_dir or ds.attrs.get("model_dir"))
    model = load_flame_model(root)
    parts = [as_dask(ds["code_exp"]), as_dask(ds["code_pose"]), as_dask(ds["mat"]).reshape(*ds["mat"].shape[:2], 16)]
    inputs = da.concatenate(parts, axis=2).rechunk({1: -1, 2: -1})
    shapes = np.asarray(ds["identity_shape"].values, np.float32)
    data = inputs.map_blocks(
        _emica_vertex_block, shapes, url=root.url, dtype=np.float32, drop_axis=2, new_axis=[2, 3],
        chunks=(*inputs.chunks[:2], (model.n_vertices,), (3,)),
    )  # fmt: skip
    return vertex_array(data, ds, derived="FLAME(identity_shape, code_exp, jaw) through mat")


@lru_cache(maxsize=4)
def _detail_generator(url: str, storage_options: str) -> DetailGenerator:
    root = Location(url, json.loads(storage_options))
    data, where = read_model_file(root, DECA_FILE)
    checkpoint = load_torch(data, where=where)
    if not isinstance(checkpoint, Mapping) or "D_detail" not in checkpoint:
        raise ModelError("deca_model.tar lacks 'D_detail'", where=where, fix="use the original deca_model.tar")
    generator = DetailGenerator()
    load_strict(generator, checkpoint["D_detail"], where=f"{where} [D_detail]")
    return generator.eval()


def _displacement_block(block: np.ndarray, *, url: str, storage_options: str) -> np.ndarray:
    generator = _detail_generator(url, storage_options)
    t, f = block.shape[:2]
    flat = block.reshape(t * f, -1)
    out = np.full((t * f, 256, 256), np.nan, np.float32)
    rows = np.flatnonzero(np.isfinite(flat).all(axis=1))
    if len(rows):
        with torch.inference_mode():
            out[rows] = generator(torch.from_numpy(flat[rows].astype(np.float32)))[:, 0].numpy()
    return out.reshape(t, f, 256, 256)


def detail_displacements(ds: Any, *, model_dir: str | None = None) -> Any:
    """DECA's UV displacement maps ``(time, face, uv_v, uv_u)`` (256 x 256) of a recon store with
    ``code_detail``, lazily: one Dask task per time chunk runs ``D_detail`` of ``DECA/deca_model.tar``
    on (jaw, the first 50 expression codes, detail), the input DECA's generator was trained on."""
    import dask.array as da
    import xarray as xr

    require_codes(ds, ("code_detail", "code_exp", "code_pose"), deriving="displacement maps", fix="pass a recon store written by gmfx recon --model emica --mode detail")
    root = resolve_model_dir(model_dir or ds.attrs.get("model_dir"))
    inputs = displacement_input(as_dask(ds["code_pose"]), as_dask(ds["code_exp"]), as_dask(ds["code_detail"]))
    inputs = inputs.rechunk({1: -1, 2: -1})
    data = inputs.map_blocks(
        _displacement_block, url=root.url, storage_options=json.dumps(root.storage_options, sort_keys=True, default=str),
        dtype=np.float32, drop_axis=2, new_axis=[2, 3], chunks=(*inputs.chunks[:2], (256,), (256,)),
    )  # fmt: skip
    return xr.DataArray(data, dims=("time", "face", "uv_v", "uv_u"), coords={k: ds.coords[k] for k in ("time", "face") if k in ds.coords},
                        attrs={"units": "FLAME model units (m) along the normal", "derived": "DECA D_detail(jaw, exp[:50], detail)"})
