"""Face-model files in their official formats, with random values (gmfx can ship no licensed file).

Each writer produces the same container, key names, shapes and dtypes as the original (see the
docstrings), so loaders, checks and the whole pipeline run on them; the values are random, chosen
only so that forward passes give finite, face-sized results:

* :func:`write_flame_pkl`: FLAME 2020/2023 ``generic_model.pkl`` (a protocol-2 pickle of a dict with a
  chumpy ``Ch`` and a SciPy ``csc_matrix``, globals named as in the 2017-2020 files);
* :func:`write_landmark_embedding`: DECA's ``landmark_embedding.npy`` (dynamic entries as torch tensors);
* :func:`write_deca_model`: DECA's ``deca_model.tar`` (``E_flame``, ``E_detail``, ``D_detail`` state dicts);
* :func:`write_emoca_model`: an EMOCA model folder (``cfg.yaml`` + a Lightning ``.ckpt``);
* :func:`write_model_dir`: all of them in a model directory laid out as ``gmfx models`` expects.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import scipy.sparse

__all__ = [
    "flame_mesh",
    "write_deca_model",
    "write_emoca_model",
    "write_flame_masks",
    "write_flame_pkl",
    "write_landmark_embedding",
    "write_lightning_checkpoint",
    "write_model_dir",
]

FULL_GRID = (70, 71)  # 4970 grid vertices + 53 eye vertices = FLAME's 5023
FULL_VERTICES, FULL_FACES = 5023, 9976


def flame_mesh(grid: tuple[int, int] = FULL_GRID, n_eye: int = 53, n_faces: int | None = FULL_FACES, seed: int = 0):
    """A head-like mesh ``(vertices (V, 3) metres, faces (F, 3) uint32, region (V,) str)``.

    A ``rows x cols`` grid bent onto a half ellipsoid (y up, z towards the viewer, ~0.16 m wide),
    plus ``n_eye`` points in two eyeballs; triangles of the grid, padded with random triangles on the
    eye points up to ``n_faces``. ``region`` is ``neck``, ``jaw``, ``head`` or ``left_eye``/``right_eye``.
    """
    rng = np.random.default_rng(seed)
    rows, cols = grid
    lat = np.linspace(-1.2, 1.3, rows)[:, None] * np.ones((1, cols))
    lon = np.linspace(-1.4, 1.4, cols)[None, :] * np.ones((rows, 1))
    x = 0.08 * np.cos(lat) * np.sin(lon)
    y = 0.11 * np.sin(lat)
    z = 0.09 * np.cos(lat) * np.cos(lon)
    grid_v = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = (r * cols + c).ravel()
    tris = np.concatenate([np.stack([a, a + cols, a + 1], 1), np.stack([a + 1, a + cols, a + cols + 1], 1)])
    half = n_eye // 2
    eyes = []
    for centre, count in (((0.03, 0.03, 0.085), half), ((-0.03, 0.03, 0.085), n_eye - half)):
        direction = rng.normal(size=(count, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        eyes.append(np.asarray(centre) + 0.012 * direction)
    vertices = np.concatenate([grid_v, *eyes])
    n_grid = grid_v.shape[0]
    region = np.full(len(vertices), "head", dtype=object)
    region[:n_grid][grid_v[:, 1] < -0.07] = "neck"
    region[:n_grid][(grid_v[:, 1] < -0.02) & (grid_v[:, 1] >= -0.07) & (grid_v[:, 2] > 0.03)] = "jaw"
    region[n_grid : n_grid + half] = "left_eye"
    region[n_grid + half :] = "right_eye"
    if n_faces is not None and n_faces > len(tris):
        extra = np.stack([rng.choice(np.arange(n_grid, len(vertices)), 3, replace=False) for _ in range(n_faces - len(tris))])
        tris = np.concatenate([tris, extra])
    return vertices, tris.astype(np.uint32), region


def _skinning_weights(vertices: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``(V, 5)`` weights summing to one: regions bound to their joint, blended across the jaw/neck edges."""
    weights = np.zeros((len(vertices), 5))
    joint = {"neck": 0, "head": 1, "jaw": 2, "left_eye": 3, "right_eye": 4}
    for name, k in joint.items():
        weights[region == name, k] = 1.0
    y = vertices[:, 1]
    near_neck = (region == "head") & (y < -0.05)
    weights[near_neck, 0], weights[near_neck, 1] = 0.3, 0.7
    jaw_edge = (region == "jaw") & (y > -0.035)
    weights[jaw_edge, 1], weights[jaw_edge, 2] = 0.4, 0.6
    return weights


def _joint_regressor(vertices: np.ndarray, region: np.ndarray) -> scipy.sparse.csc_matrix:
    """``(5, V)`` sparse regressor: each joint the mean of a few vertices of its region (rows sum to one)."""
    order = ["neck", "head", "jaw", "left_eye", "right_eye"]
    rows, cols, vals = [], [], []
    for k, name in enumerate(order):
        ids = np.flatnonzero(region == name)[:: max(1, int(np.sum(region == name)) // 8)][:8]
        rows += [k] * len(ids)
        cols += ids.tolist()
        vals += [1.0 / len(ids)] * len(ids)
    return scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(5, len(vertices)))


class _FakeCh:
    """Pickled exactly like chumpy's ``Ch``: a plain object whose state is a dict holding ``x``."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x


def write_flame_pkl(
    path: str | Path,
    *,
    grid: tuple[int, int] = FULL_GRID,
    n_eye: int = 53,
    n_faces: int | None = FULL_FACES,
    n_expression: int = 100,
    seed: int = 0,
) -> Path:
    """Write a FLAME ``.pkl`` in the format of ``generic_model.pkl`` (FLAME 2020) and return its path.

    Keys (A.1 of the format notes): ``v_template`` (V,3) f64, ``shapedirs`` chumpy ``Ch`` (V,3,300+E)
    f64, ``posedirs`` (V,3,36) f64, ``J_regressor`` ``scipy.sparse.csc_matrix`` (5,V), ``J`` (5,3),
    ``weights`` (V,5), ``kintree_table`` (2,5) with the root's parent 2**32-1, ``f`` (F,3) uint32,
    ``bs_style``/``bs_type``. Protocol 2, with the globals ``numpy.core.multiarray`` and
    ``scipy.sparse.csc`` of the original files. The default size is FLAME's (5023 vertices, 9976
    triangles, ~73 MB); a smaller ``grid`` gives a quick file with the same structure.
    """
    rng = np.random.default_rng(seed)
    vertices, faces, region = flame_mesh(grid, n_eye, n_faces, seed)
    n = len(vertices)
    regressor = _joint_regressor(vertices, region)
    shapedirs = rng.normal(scale=2e-4, size=(n, 3, 300 + n_expression))
    content = {
        "v_template": vertices.astype(np.float64),
        "shapedirs": _FakeCh(shapedirs),
        "posedirs": rng.normal(scale=1e-4, size=(n, 3, 36)),
        "J_regressor": regressor,
        "J": regressor @ vertices,
        "weights": _skinning_weights(vertices, region),
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": faces,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    module = types.ModuleType("chumpy.ch")
    _FakeCh.__module__, _FakeCh.__qualname__, _FakeCh.__name__ = "chumpy.ch", "Ch", "Ch"
    module.Ch = _FakeCh
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), module
    try:
        data = pickle.dumps(content, protocol=2)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n").replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
    path = Path(path)
    path.write_bytes(data)
    return path


FLAME_MASK_NAMES = (
    "eye_region", "neck", "left_eyeball", "right_eyeball", "right_ear", "right_eye_region", "forehead",
    "lips", "nose", "scalp", "boundary", "face", "left_ear", "left_eye_region",
)  # fmt: skip


def write_flame_masks(path: str | Path, n_vertices: int, *, seed: int = 0) -> Path:
    """Write ``FLAME_masks.pkl``: a protocol-2 pickle of a dict, region name -> vertex indices (int64)."""
    rng = np.random.default_rng(seed)
    masks = {name: np.sort(rng.choice(n_vertices, size=max(1, n_vertices // 20), replace=False)).astype(np.int64) for name in FLAME_MASK_NAMES}
    data = pickle.dumps(masks, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path = Path(path)
    path.write_bytes(data)
    return path


def write_landmark_embedding(path: str | Path, n_faces: int = FULL_FACES, *, seed: int = 0) -> Path:
    """Write DECA's ``landmark_embedding.npy``: ``np.save`` of a 0-d object array holding a dict.

    ``static_lmk_faces_idx`` (51,) int64, ``static_lmk_bary_coords`` (51,3) f64,
    ``dynamic_lmk_faces_idx`` torch (79,17) int64, ``dynamic_lmk_bary_coords`` torch (79,17,3) f32,
    ``full_lmk_faces_idx`` (1,68) int64, ``full_lmk_bary_coords`` (1,68,3) f32; barycentric rows sum to one.
    """
    import torch

    rng = np.random.default_rng(seed)

    def bary(*shape: int) -> np.ndarray:
        b = rng.uniform(0.05, 1.0, size=(*shape, 3))
        return b / b.sum(axis=-1, keepdims=True)

    content = {
        "static_lmk_faces_idx": rng.integers(0, n_faces, 51).astype(np.int64),
        "static_lmk_bary_coords": bary(51),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, n_faces, (79, 17)).astype(np.int64)),
        "dynamic_lmk_bary_coords": torch.from_numpy(bary(79, 17).astype(np.float32)),
        "full_lmk_faces_idx": rng.integers(0, n_faces, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": bary(1, 68).astype(np.float32),
    }
    holder = np.empty((), dtype=object)
    holder[()] = content
    path = Path(path)
    with path.open("wb") as handle:
        np.save(handle, holder, allow_pickle=True)
    return path


def _random_state(module, rng: np.random.Generator, scale: float) -> OrderedDict:
    """``module``'s state dict with random weights (BatchNorm at identity statistics)."""
    import torch

    state = OrderedDict()
    for key, value in module.state_dict().items():
        if key.endswith("running_var"):
            state[key] = torch.ones_like(value)
        elif key.endswith("running_mean") or key.endswith(".bias") and ".bn" in key:
            state[key] = torch.zeros_like(value)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif value.dim() >= 2:  # conv/linear weights, scaled to keep activations of order one
            fan_in = int(np.prod(value.shape[1:]))
            state[key] = torch.from_numpy(rng.normal(scale=scale / np.sqrt(fan_in), size=tuple(value.shape)).astype(np.float32))
        elif "bn" in key or "downsample.1" in key:
            state[key] = torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)
        else:
            state[key] = torch.from_numpy(rng.normal(scale=0.01, size=tuple(value.shape)).astype(np.float32))
    return state


def _encoder_state(n_outputs: int, rng: np.random.Generator, camera_slice: slice | None = None) -> OrderedDict:
    """A DECA ``ResnetEncoder(outsize=n_outputs)`` state dict; outputs near zero, the camera near a face-filling scale."""
    import torch

    from gmfx.models._resnet import ResNetEncoder

    state = _random_state(ResNetEncoder(n_outputs), rng, scale=1.0)
    state["layers.2.weight"] = state["layers.2.weight"] * 1e-2
    bias = torch.zeros(n_outputs)
    if camera_slice is not None:
        bias[camera_slice] = torch.tensor([9.0, 0.0, 0.01])
    state["layers.2.bias"] = bias
    return state


def _detail_decoder_state(rng: np.random.Generator) -> OrderedDict:
    """DECA's ``D_detail`` (``Generator(latent_dim=181, out_channels=1)``) keys and shapes; gmfx's
    coarse backends never read it."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {"l1.0.weight": (8192, 181), "l1.0.bias": (8192,)}

    def bn(index: int, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"conv_blocks.{index}.{name}"] = (channels,)
        shapes[f"conv_blocks.{index}.num_batches_tracked"] = ()

    bn(0, 128)
    index, channels = 1, 128
    for out in (128, 64, 64, 32, 16):
        shapes[f"conv_blocks.{index + 1}.weight"] = (out, channels, 3, 3)
        shapes[f"conv_blocks.{index + 1}.bias"] = (out,)
        bn(index + 2, out)
        index, channels = index + 4, out
    shapes[f"conv_blocks.{index}.weight"] = (1, channels, 3, 3)
    shapes[f"conv_blocks.{index}.bias"] = (1,)
    def value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith("num_batches_tracked"):
            return torch.zeros(shape, dtype=torch.long)
        if key.endswith("running_var"):  # a variance is positive (random signs made every map NaN)
            return torch.from_numpy(rng.uniform(0.5, 1.5, size=shape).astype(np.float32))
        if "conv_blocks" in key and key.endswith(".weight") and len(shape) == 1:  # batch-norm scales near one
            return torch.from_numpy(rng.uniform(0.8, 1.2, size=shape).astype(np.float32))
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return torch.from_numpy(rng.normal(scale=1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.01, size=shape).astype(np.float32))

    return OrderedDict((key, value(key, shape)) for key, shape in shapes.items())


def write_deca_model(path: str | Path, *, detail: bool = True, seed: int = 0) -> Path:
    """Write DECA's ``deca_model.tar``: ``torch.save`` of ``{'E_flame', 'E_detail', 'D_detail'}``
    state dicts plus the training snapshot's ``opt``/``global_step``/``batch_size`` (~200 MB;
    ``detail=False`` leaves out the detail networks, which gmfx does not read: ~100 MB)."""
    import torch

    rng = np.random.default_rng(seed)
    content = {
        "E_flame": _encoder_state(236, rng, camera_slice=slice(206, 209)),
        "opt": {"state": {}, "param_groups": []},
        "global_step": 0,
        "batch_size": 1,
    }
    if detail:
        content.update(E_detail=_encoder_state(128, rng), D_detail=_detail_decoder_state(rng))
    path = Path(path)
    torch.save(content, path)
    return path


class _FakeModelCheckpoint:
    """Stands for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` while pickling."""


def write_emoca_model(
    folder: str | Path, *, n_expression_outputs: int = 50, version: int = 2, detail: bool = True, seed: int = 0
) -> Path:
    """Write an EMOCA model folder: ``cfg.yaml`` + ``detail/checkpoints/deca-epoch=NN-val_loss=X.ckpt``.

    The checkpoint is a PyTorch-Lightning 1.4 file (``epoch``, ``global_step``,
    ``pytorch-lightning_version``, ``state_dict`` with ``deca.E_flame.*``, ``deca.E_expression.*``,
    ``deca.E_detail.*``, ``deca.D_detail.*``, FLAME buffers ``deca.flame.*`` and an unrelated
    ``emonet_loss.*`` key; ``callbacks`` keyed by the callback *class*). ``n_expression_outputs`` is
    50, 53 (+ jaw pose) or 56 (+ jaw and global pose), matching ``cfg.yaml``. Two checkpoints are
    written; the best (smallest ``val_loss``) holds the weights, the other an empty state dict.
    ``detail=False`` leaves out the detail networks (which gmfx does not read) for a smaller file.
    """
    import torch
    import yaml

    rng = np.random.default_rng(seed)
    state = OrderedDict()
    modules = [
        ("deca.E_flame.", _encoder_state(236, rng, camera_slice=slice(206, 209))),
        ("deca.E_expression.", _encoder_state(n_expression_outputs, rng)),
    ]
    if detail:
        modules += [("deca.E_detail.", _encoder_state(128, rng)), ("deca.D_detail.", _detail_decoder_state(rng))]
    for prefix, module_state in modules:
        state.update((prefix + key, value) for key, value in module_state.items())
    state["deca.flame.v_template"] = torch.zeros(5023, 3)
    state["deca.flame.faces_tensor"] = torch.zeros(9976, 3, dtype=torch.long)
    state["emonet_loss.emonet.fc.weight"] = torch.zeros(8, 16)
    folder = Path(folder)
    write_lightning_checkpoint(folder / "detail" / "checkpoints", "deca", state)
    jaw, global_ = n_expression_outputs in (53, 56), n_expression_outputs == 56
    stage = {
        "model": {
            "n_shape": 100, "n_tex": 50, "n_exp": 50, "n_pose": 6, "n_cam": 3, "n_light": 27,
            "exp_deca_jaw_pose": jaw, "exp_deca_global_pose": global_,
            "expression_backbone": "deca_clone", "use_mediapipe_landmarks": version == 2,
        },
        "inout": {"checkpoint_dir": str(folder / "detail" / "checkpoints"), "name": f"EMOCA_v{version}"},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump({"coarse": stage, "detail": stage}))
    return folder


def write_lightning_checkpoint(folder: str | Path, stem: str, state: OrderedDict) -> None:
    """Write two PyTorch-Lightning 1.4 checkpoints ``<stem>-epoch=03-val_loss={0.41,0.87}.ckpt`` into
    ``folder``: ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict`` (``state`` in
    the best, an empty one in the other), ``callbacks`` keyed by the callback *class* (a stand-in for
    ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``), empty optimizer states."""
    import torch

    _FakeModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    _FakeModelCheckpoint.__qualname__ = _FakeModelCheckpoint.__name__ = "ModelCheckpoint"
    package = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    package.ModelCheckpoint = _FakeModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names[:2]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[names[2]] = package
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for loss, weights in (("0.41", state), ("0.87", OrderedDict())):
            checkpoint = {
                "epoch": 3,
                "global_step": 1000,
                "pytorch-lightning_version": "1.4.9",
                "state_dict": weights,
                "callbacks": {_FakeModelCheckpoint: {"best_model_score": torch.tensor(float(loss)), "monitor": "val_loss"}},
                "optimizer_states": [],
                "lr_schedulers": [],
            }
            torch.save(checkpoint, folder / f"{stem}-epoch=03-val_loss={loss}.ckpt")
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def write_model_dir(
    root: str | Path, *, grid: tuple[int, int] = (24, 25), n_eye: int = 12, seed: int = 0,
    deca: bool = True, emoca: bool = False, detail: bool = True,
) -> Path:  # fmt: skip
    """A model directory with FLAME (small ``grid`` by default), its landmark embedding and, on
    request, DECA's and EMOCA's (v2) files (``detail``: with the detail networks), under the names
    ``gmfx models`` lists."""
    root = Path(root)
    (root / "FLAME2020").mkdir(parents=True, exist_ok=True)
    write_flame_pkl(root / "FLAME2020" / "generic_model.pkl", grid=grid, n_eye=n_eye, n_faces=None, seed=seed)
    n_faces = 2 * (grid[0] - 1) * (grid[1] - 1)
    write_landmark_embedding(root / "FLAME2020" / "landmark_embedding.npy", n_faces, seed=seed)
    if deca:
        (root / "DECA").mkdir(exist_ok=True)
        write_deca_model(root / "DECA" / "deca_model.tar", detail=detail, seed=seed)
    if emoca:
        write_emoca_model(root / "EMOCA" / "EMOCA_v2_lr_mse_20", detail=detail, seed=seed)
    return root
