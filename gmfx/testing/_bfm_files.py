"""BFM-family files in their official formats, with random values (gmfx can ship no licensed file).

* :func:`write_bfm_model`: ``BFM_model_front.mat`` / ``BFM09_model_info.mat`` (MATLAB 5, the keys,
  shapes, dtypes and 1-based ids of Deep3DFaceRecon's ``transferBFM09``), on a valid face-shaped mesh;
* :func:`write_bfm_lm3d`: Deep3DFaceRecon's ``similarity_Lm3D_all.mat`` (the 68 mean 3D landmarks);
* :func:`write_bfm09_sources`: the original BFM 2009 + expression files a front model is converted from;
* :func:`write_deep3d_checkpoint`: Deep3DFaceRecon's ``epoch_20.pth``; :func:`write_deep3d_model_dir`: all of them;
* :func:`bfm_mesh`: the mesh behind them (a Delaunay triangulation of a disc bent into a face).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "BFM_FACES",
    "BFM_VERTICES",
    "bfm_mesh",
    "face_landmark_layout",
    "write_bfm09_sources",
    "write_bfm_lm3d",
    "write_bfm_model",
    "write_deep3d_checkpoint",
    "write_deep3d_model_dir",
]

#: the front model's size: 35709 vertices, 70789 triangles, 8 triangles per vertex in ``point_buf``
BFM_VERTICES, BFM_FACES, POINT_BUF_WIDTH = 35709, 70789, 8
#: a face ~1.6 dm wide and ~2 dm high, like BFM's front model (decimetres)
HALF_WIDTH, HALF_HEIGHT, DEPTH = 0.8, 1.0, 0.7


def face_landmark_layout() -> np.ndarray:
    """``(68, 2)`` x (right), y (up) positions in decimetres of the 68 landmarks on a frontal face, in
    the iBUG order (jaw 0-16 from the image's left, brows 17-26, nose 27-35, eyes 36-47, mouth 48-67)."""
    theta = np.radians(np.linspace(-100, 100, 17))
    jaw = np.stack([0.75 * np.sin(theta), -0.95 * np.cos(theta)], 1)
    brow = np.stack([np.linspace(-0.6, -0.15, 5), 0.45 + 0.05 * np.sin(np.linspace(0, np.pi, 5))], 1)
    brows = np.concatenate([brow, brow[::-1] * [-1, 1]])
    nose = np.concatenate([np.stack([np.zeros(4), np.linspace(0.35, 0.0, 4)], 1), np.stack([np.linspace(-0.15, 0.15, 5), np.full(5, -0.1)], 1)])
    angles = np.radians([180, 120, 60, 0, -60, -120])  # outer corner, over the top to the inner corner, back below
    eye = np.stack([0.12 * np.cos(angles), 0.05 * np.sin(angles)], 1)
    left_eye = eye + [-0.35, 0.25]
    right_eye = eye * [-1, 1] + [0.35, 0.25]  # starts at its inner corner, as in the iBUG order
    outer = np.radians(np.linspace(180, -150, 12))
    inner = np.radians(np.linspace(180, -135, 8))
    mouth = np.concatenate([np.stack([0.3 * np.cos(outer), 0.12 * np.sin(outer)], 1), np.stack([0.2 * np.cos(inner), 0.05 * np.sin(inner)], 1)]) + [0, -0.45]
    return np.concatenate([jaw, brows, nose, left_eye, right_eye, mouth])


def bfm_mesh(n_vertices: int = BFM_VERTICES, n_faces: int | None = BFM_FACES, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (N, 3) decimetres, triangles (F, 3) 0-based)``: a Delaunay triangulation of a disc
    (``2N - 2 - F`` points on its rim, the rest inside), stretched to a face and bent towards the
    camera (+z) with a nose. The triangles' order makes ``(v0 - v1) x (v1 - v2)`` point outwards (+z).
    ``n_faces=None``: a rim of ``4 sqrt(N)`` points."""
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    rim = int(round(4 * np.sqrt(n_vertices))) if n_faces is None else 2 * n_vertices - 2 - n_faces
    if not 3 <= rim <= n_vertices // 2:
        raise ValueError(f"{n_faces} triangles cannot triangulate {n_vertices} vertices in a disc")
    angle = np.linspace(0, 2 * np.pi, rim, endpoint=False)
    inside = n_vertices - rim
    radius = 0.97 * np.cos(np.pi / rim) * np.sqrt(rng.uniform(0, 1, inside))
    phi = rng.uniform(0, 2 * np.pi, inside)
    disc = np.concatenate([np.stack([np.cos(angle), np.sin(angle)], 1), np.stack([radius * np.cos(phi), radius * np.sin(phi)], 1)])
    triangles = Delaunay(disc).simplices.astype(np.int64)
    if n_faces is not None and len(triangles) != n_faces:
        raise ValueError(f"the triangulation has {len(triangles)} triangles, not {n_faces}")
    a, b, c = (disc[triangles[:, k]] for k in range(3))
    ccw = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) > 0
    triangles[~ccw] = triangles[~ccw][:, ::-1]  # counter-clockwise in (x, y): (v0 - v1) x (v1 - v2) points to +z
    x, y = disc[:, 0] * HALF_WIDTH, disc[:, 1] * HALF_HEIGHT
    r2 = np.clip(disc[:, 0] ** 2 + disc[:, 1] ** 2, 0, 1)
    z = DEPTH * np.sqrt(1 - 0.9 * r2) + 0.3 * np.exp(-(x**2 + (y + 0.05) ** 2) / 0.02)
    return np.stack([x, y, z], 1), triangles


def _point_buf(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """``(N, 8)`` 1-based ids of (up to 8 of) each vertex's triangles, padded with ``F + 1``."""
    n_faces = len(triangles)
    buf = np.full((n_vertices, POINT_BUF_WIDTH), n_faces + 1, np.int64)
    count = np.zeros(n_vertices, np.int64)
    for face, corners in enumerate(triangles):
        for vertex in corners:
            if count[vertex] < POINT_BUF_WIDTH:
                buf[vertex, count[vertex]] = face + 1
                count[vertex] += 1
    return buf


def _smooth_bases(points: np.ndarray, n_components: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """``(3N, K)`` bases that vary smoothly over the face (random mixtures of low-order polynomials and
    waves of ``x, y``), each column with root-mean-square ``rms``; rows ordered ``x0, y0, z0, x1, ...``."""
    x, y = points[:, 0] / HALF_WIDTH, points[:, 1] / HALF_HEIGHT
    frequencies = rng.uniform(1, 4, size=(6, 2))
    phases = rng.uniform(0, 2 * np.pi, 6)
    features = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y, x**3, y**3,
                         *(np.sin(f[0] * x + f[1] * y + p) for f, p in zip(frequencies, phases))], 1)  # fmt: skip
    weights = rng.normal(size=(features.shape[1], 3 * n_components))
    bases = (features @ weights).reshape(len(points), 3, n_components)
    bases *= rms / np.sqrt((bases**2).mean(axis=(0, 1), keepdims=True))
    return bases.reshape(3 * len(points), n_components)


def write_bfm_model(
    path: str | Path, *, n_vertices: int = BFM_VERTICES, n_faces: int | None = BFM_FACES,
    n_id: int = 80, n_exp: int = 64, n_tex: int = 80, seed: int = 0,
) -> Path:  # fmt: skip
    """Write a BFM front model in the format of ``BFM_model_front.mat`` and return its path.

    MATLAB 5 (``scipy.io.savemat``) with the keys of C.1 of the format notes: ``meanshape`` (1, 3N) f32
    decimetres, ``idBase`` (3N, 80) f32, ``exBase`` (3N, 64) **f64**, ``meantex`` (1, 3N) f32 0..255,
    ``texBase`` (3N, 80) f32, ``tri`` (F, 3) f32 1-based, ``point_buf`` (N, 8) f32 1-based with ``F + 1``
    as padding, ``tri_mask2`` (F2, 3), ``keypoints`` (1, 68), ``frontmask2_idx`` (M, 1), ``skinmask``
    (1, N), all f32. The default size is the official one (35709 vertices, 70789 triangles, 127 MB);
    ``n_vertices=2000, n_faces=None`` gives a quick file with the same structure.
    """
    import scipy.io

    rng = np.random.default_rng(seed)
    vertices, triangles = bfm_mesh(n_vertices, n_faces, seed=seed)
    n = len(vertices)
    layout = face_landmark_layout()
    keypoints = np.argmin(((vertices[None, :, :2] - layout[:, None]) ** 2).sum(-1), axis=1)
    offset = np.array([0.05, -0.1, 0.2])  # a stored mean that is not centred, as BFM's is not
    tone = np.array([200.0, 150.0, 130.0]) * (1 - 0.15 * (vertices[:, 1:2] / HALF_HEIGHT) ** 2)
    front = np.flatnonzero(np.hypot(vertices[:, 0] / HALF_WIDTH, vertices[:, 1] / HALF_HEIGHT) < 0.8)
    in_front = np.zeros(n, bool)
    in_front[front] = True
    f32 = np.float32
    content = {
        "meanshape": (vertices + offset).reshape(1, -1).astype(f32),
        "idBase": _smooth_bases(vertices, n_id, 0.03, rng).astype(f32),
        "exBase": _smooth_bases(vertices, n_exp, 0.01, rng).astype(np.float64),
        "meantex": tone.reshape(1, -1).astype(f32),
        "texBase": _smooth_bases(vertices, n_tex, 8.0, rng).astype(f32),
        "tri": (triangles + 1).astype(f32),
        "point_buf": _point_buf(triangles, n).astype(f32),
        "tri_mask2": (triangles[in_front[triangles].all(axis=1)] + 1).astype(f32),
        "keypoints": (keypoints + 1).reshape(1, -1).astype(f32),
        "frontmask2_idx": (front + 1).reshape(-1, 1).astype(f32),
        "skinmask": in_front.reshape(1, -1).astype(f32),
    }
    path = Path(path)
    scipy.io.savemat(path, content)
    return path


def write_bfm_lm3d(path: str | Path, model_path: str | Path) -> Path:
    """Write ``similarity_Lm3D_all.mat`` (``lm`` (68, 3) f32) for the model at ``model_path``: its
    68 keypoints on the re-centred mean shape, the 3D template of Deep3DFaceRecon's 5-point alignment."""
    import scipy.io

    content = scipy.io.loadmat(str(model_path))
    mean = content["meanshape"].reshape(-1, 3).astype(np.float64)
    mean -= mean.mean(axis=0)
    keypoints = content["keypoints"].reshape(-1).astype(np.int64) - 1
    path = Path(path)
    scipy.io.savemat(path, {"lm": mean[keypoints].astype(np.float32)})
    return path


def write_bfm09_sources(folder: str | Path, front_model: str | Path, *, n_exp_model: int | None = None, n_bfm: int | None = None,
                        seed: int = 0) -> Path:  # fmt: skip
    """Write the original files a front model is made from, such that converting them gives back
    ``front_model`` (a file of :func:`write_bfm_model`): ``01_MorphableModel.mat`` (199 components, single
    precision, micrometres), ``Exp_Pca.bin`` (int32 79, float32 mean and 79 rows of components),
    ``std_exp.txt``, ``BFM_front_idx.mat`` (``idx``), ``BFM_exp_idx.mat`` (``trimIndex``) and
    ``facemodel_info.mat``, the front vertices scattered at random among ``n_exp_model`` expression-model
    and ``n_bfm`` BFM vertices (default: 1.5 and 1.6 times as many)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    front = scipy.io.loadmat(str(front_model))
    n = front["meanshape"].size // 3
    n_exp_model = n_exp_model or int(1.5 * n)
    n_bfm = n_bfm or int(1.6 * n_exp_model)
    index_exp = rng.permutation(n_exp_model)[:n]  # front vertex -> expression-model vertex
    trim = rng.permutation(n_bfm)[:n_exp_model]  # expression-model vertex -> BFM vertex
    index_shape = trim[index_exp]

    def scatter(values: np.ndarray, rows: np.ndarray, total: int, fill_scale: float) -> np.ndarray:
        """(3n, k) front rows placed at vertices ``rows`` of a (3 total, k) array, random elsewhere."""
        out = rng.normal(scale=fill_scale, size=(total, 3, values.shape[-1]))
        out[rows] = values.reshape(n, 3, -1)
        return out.reshape(3 * total, -1)

    def components(base: np.ndarray, rows: np.ndarray, total: int, scale: float, count: int) -> tuple[np.ndarray, np.ndarray]:
        deviation = np.sort(rng.uniform(0.5, 2.0, count))[::-1]
        k = base.shape[1]
        pc = rng.normal(scale=1e-3, size=(3 * total, count))
        pc[:, :k] = scatter(base.astype(np.float64) * scale / deviation[:k], rows, total, 1e-3)
        return pc, deviation

    shape_pc, shape_ev = components(front["idBase"], index_shape, n_bfm, 1e5, 199)
    tex_pc, tex_ev = components(front["texBase"], index_shape, n_bfm, 1.0, 199)
    exp_pc, exp_std = components(front["exBase"], index_exp, n_exp_model, 1e5, 79)
    f32 = np.float32
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "01_MorphableModel.mat", {
        "shapeMU": scatter(front["meanshape"].reshape(-1, 1).astype(np.float64) * 1e5, index_shape, n_bfm, 1e4).astype(f32),
        "shapePC": shape_pc.astype(f32), "shapeEV": shape_ev.reshape(-1, 1).astype(f32),
        "texMU": scatter(front["meantex"].reshape(-1, 1), index_shape, n_bfm, 50).astype(f32),
        "texPC": tex_pc.astype(f32), "texEV": tex_ev.reshape(-1, 1).astype(f32),
    })  # fmt: skip
    exp_mean = rng.normal(scale=1e3, size=3 * n_exp_model)
    payload = np.concatenate([exp_mean, exp_pc.T.reshape(-1)]).astype("<f4")
    (folder / "Exp_Pca.bin").write_bytes(np.array([79], "<i4").tobytes() + payload.tobytes())
    np.savetxt(folder / "std_exp.txt", exp_std)
    scipy.io.savemat(folder / "BFM_front_idx.mat", {"idx": (index_exp + 1).reshape(-1, 1).astype(f32)})
    scipy.io.savemat(folder / "BFM_exp_idx.mat", {"trimIndex": (trim + 1).reshape(-1, 1).astype(np.uint16 if n_bfm < 65536 else np.int64)})
    info = {key: front[key] for key in ("tri", "point_buf", "tri_mask2", "keypoints", "frontmask2_idx", "skinmask")}
    info["frontmask2"] = front["skinmask"]  # the original also holds this key, which the conversion drops
    scipy.io.savemat(folder / "facemodel_info.mat", info)
    return folder


def write_deep3d_checkpoint(path: str | Path, *, coefficients: np.ndarray | None = None, head_scale: float = 0.0, seed: int = 0) -> Path:
    """Write Deep3DFaceRecon's ``epoch_20.pth``: ``torch.save`` of ``{'net_recon': state dict, 'opt_00',
    'sched_00'}``, the network a torchvision-layout ResNet-50 (``backbone.*``, no ``fc``) with seven 1x1
    heads (``final_layers.0..6``: 80, 64, 80, 3, 27, 2, 1 outputs). Random backbone; the heads' weights
    are ``head_scale`` x N(0, 1/2048) (0: zero, as initialised upstream) and their biases
    ``coefficients`` (257; default zero), so the network predicts ``coefficients`` for any image
    when ``head_scale`` is 0 (~95 MB)."""
    import torch

    from gmfx.models.deep3d import ReconNet
    from gmfx.testing._model_files import _random_state

    rng = np.random.default_rng(seed)
    state = _random_state(ReconNet(), rng, scale=1.0)
    bias = np.zeros(257) if coefficients is None else np.asarray(coefficients, np.float64).reshape(257)
    start = 0
    for index, size in enumerate((80, 64, 80, 3, 27, 2, 1)):
        weight = rng.normal(scale=head_scale / np.sqrt(2048), size=(size, 2048, 1, 1))
        state[f"final_layers.{index}.weight"] = torch.from_numpy(weight.astype(np.float32))
        state[f"final_layers.{index}.bias"] = torch.from_numpy(bias[start : start + size].astype(np.float32))
        start += size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_recon": state, "opt_00": {"state": {}, "param_groups": []}, "sched_00": {"last_epoch": 20}}, path)
    return path


def write_deep3d_model_dir(root: str | Path, *, n_vertices: int = 1500, n_faces: int | None = None, coefficients: np.ndarray | None = None,
                           head_scale: float = 0.0, seed: int = 0) -> Path:  # fmt: skip
    """A model directory for ``--model deep3d`` (and ``bfm-fit``): ``BFM/BFM_model_front.mat`` (small by
    default), ``BFM/similarity_Lm3D_all.mat`` and ``Deep3DFaceRecon/face_recon_feat0.2_augment/epoch_20.pth``."""
    root = Path(root)
    (root / "BFM").mkdir(parents=True, exist_ok=True)
    model = write_bfm_model(root / "BFM" / "BFM_model_front.mat", n_vertices=n_vertices, n_faces=n_faces, seed=seed)
    write_bfm_lm3d(root / "BFM" / "similarity_Lm3D_all.mat", model)
    write_deep3d_checkpoint(root / "Deep3DFaceRecon" / "face_recon_feat0.2_augment" / "epoch_20.pth",
                            coefficients=coefficients, head_scale=head_scale, seed=seed)  # fmt: skip
    return root
