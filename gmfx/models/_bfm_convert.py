"""The BFM front model from the user's original files, as Deep3DFaceRecon's ``transferBFM09`` (and
3DMM-Fitting's identical ``convert_bfm09_data.py``) writes it.

Inputs, all in one folder (``gmfx models import-bfm FOLDER``):

* ``01_MorphableModel.mat`` (BFM 2009): ``shapeMU``/``texMU`` (3V, 1), ``shapePC``/``texPC`` (3V, 199),
  ``shapeEV``/``texEV`` (199, 1); micrometres and 0..255;
* ``Exp_Pca.bin`` (Guo et al.): int32 ``k``, then float32 mean (3W) and components (k rows of 3W);
  ``std_exp.txt``: the k standard deviations;
* from Deep3DFaceRecon's ``BFM/`` folder: ``BFM_front_idx.mat`` (``idx``: front vertex -> expression-model
  vertex, 1-based), ``BFM_exp_idx.mat`` (``trimIndex``: expression-model vertex -> BFM vertex, 1-based)
  and ``facemodel_info.mat`` (``tri``, ``point_buf``, ``tri_mask2``, ``keypoints``, ``frontmask2_idx``, ``skinmask``).

The result: ``idBase = shapePC * shapeEV / 1e5`` (first 80), ``exBase = expPC * std / 1e5`` (first 64),
``texBase = texPC * texEV`` (first 80), ``meanshape = shapeMU / 1e5``, ``meantex = texMU``, each taken at the
front vertices; the expression mean is not used (as upstream). Verified only on generated files: no
real BFM file was available, so the byte layout of ``Exp_Pca.bin`` follows the published reader.
"""

from __future__ import annotations

import io

import numpy as np

from gmfx._errors import ModelError
from gmfx.storage import Location

__all__ = ["BFM09_SOURCES", "convert_bfm09", "read_exp_pca"]

#: role -> file name in the source folder
BFM09_SOURCES = {
    "morphable": "01_MorphableModel.mat",
    "expression": "Exp_Pca.bin",
    "expression_std": "std_exp.txt",
    "front_index": "BFM_front_idx.mat",
    "expression_index": "BFM_exp_idx.mat",
    "info": "facemodel_info.mat",
}
N_ID, N_EXP, N_TEX = 80, 64, 80
INFO_KEYS = ("tri", "point_buf", "tri_mask2", "keypoints", "frontmask2_idx", "skinmask")
_OBTAIN = {
    "morphable": "register at https://faces.dmi.unibas.ch/bfm/ and download BFM 2009 (01_MorphableModel.mat)",
    "expression": "take Exp_Pca.bin from https://github.com/Juyong/3DFace",
}
_DEEP3D_BFM = "take it from the BFM/ folder of https://github.com/sicxu/Deep3DFaceRecon_pytorch"


def _read(folder: Location, role: str) -> tuple[bytes, str]:
    source = folder.child(BFM09_SOURCES[role])
    if not source.exists():
        raise ModelError(
            f"{BFM09_SOURCES[role]} is missing",
            where=source.url,
            fix=_OBTAIN.get(role, _DEEP3D_BFM) + " into that folder",
        )
    with source.open("rb") as handle:
        return handle.read(), source.url


def _loadmat(folder: Location, role: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    import scipy.io

    data, where = _read(folder, role)
    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - scipy raises many types on broken or v7.3 (HDF5) files
        raise ModelError(f"{BFM09_SOURCES[role]} cannot be read as a MATLAB 5 file ({type(error).__name__}: {error})",
                         where=where, fix="use the file as downloaded") from None  # fmt: skip
    missing = [key for key in keys if key not in content]
    if missing:
        raise ModelError(f"{BFM09_SOURCES[role]} lacks the keys {', '.join(missing)}", where=where, fix="use the file as downloaded")
    return {key: content[key] for key in keys}


def read_exp_pca(data: bytes, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (3W,), components (3W, k))`` float32 of ``Exp_Pca.bin``; W follows from the file size."""
    if len(data) < 4:
        raise ModelError("Exp_Pca.bin is empty", where=where, fix=_OBTAIN["expression"])
    k = int(np.frombuffer(data[:4], "<i4")[0])
    floats = (len(data) - 4) // 4
    if k < 1 or (len(data) - 4) % 4 or floats % (k + 1) or (floats // (k + 1)) % 3:
        raise ModelError(f"Exp_Pca.bin holds {len(data)} bytes, which do not fit {k} components of x, y, z vertices",
                         where=where, fix=_OBTAIN["expression"])  # fmt: skip
    values = np.frombuffer(data[4:], "<f4")
    n3 = floats // (k + 1)
    return values[:n3].copy(), values[n3:].reshape(k, n3).T.copy()


def _index(array: np.ndarray, upper: int, name: str, where: str) -> np.ndarray:
    ids = np.asarray(array).reshape(-1).astype(np.int64)
    if ids.min() < 1 or ids.max() > upper:
        raise ModelError(f"{name} holds ids {ids.min()}..{ids.max()}, expected 1-based ids up to {upper}", where=where,
                         fix="use the index files of the same Deep3DFaceRecon release as facemodel_info.mat")  # fmt: skip
    return ids - 1


def _components(pc: np.ndarray, ev: np.ndarray, n: int, name: str, where: str) -> np.ndarray:
    ev = np.asarray(ev).reshape(-1)
    if pc.shape[1] < n or len(ev) < n:
        raise ModelError(f"{name} has {min(pc.shape[1], len(ev))} components, at least {n} are needed", where=where, fix="use the file as downloaded")
    return pc[:, :n] * ev[:n].astype(pc.dtype)


def convert_bfm09(folder: Location) -> dict[str, np.ndarray]:
    """The keys of ``BFM_model_front.mat`` (ready for ``scipy.io.savemat``) from the files of ``folder``."""
    bfm = _loadmat(folder, "morphable", ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV"))
    morphable_url = folder.child(BFM09_SOURCES["morphable"]).url
    data, exp_url = _read(folder, "expression")
    _, exp_pc = read_exp_pca(data, where=exp_url)
    std_data, std_url = _read(folder, "expression_std")
    try:
        exp_std = np.loadtxt(io.StringIO(std_data.decode()), dtype=np.float64).reshape(-1)
    except ValueError as error:
        raise ModelError(f"std_exp.txt is not a list of numbers ({error})", where=std_url, fix=_DEEP3D_BFM) from None
    front = _loadmat(folder, "front_index", ("idx",))["idx"]
    trim = _loadmat(folder, "expression_index", ("trimIndex",))["trimIndex"]
    info = _loadmat(folder, "info", INFO_KEYS)
    n_bfm, n_exp_model = bfm["shapeMU"].size // 3, exp_pc.shape[0] // 3
    index_exp = _index(front, n_exp_model, "BFM_front_idx.mat 'idx'", folder.child(BFM09_SOURCES["front_index"]).url)
    trim_ids = _index(trim, n_bfm, "BFM_exp_idx.mat 'trimIndex'", folder.child(BFM09_SOURCES["expression_index"]).url)
    if len(trim_ids) != n_exp_model:
        raise ModelError(f"BFM_exp_idx.mat maps {len(trim_ids)} vertices, Exp_Pca.bin has {n_exp_model}",
                         where=exp_url, fix="use Exp_Pca.bin of Guo et al. with Deep3DFaceRecon's index files")  # fmt: skip
    index_shape = trim_ids[index_exp]

    def front_rows(base: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return base.reshape(-1, 3, base.shape[-1])[rows].reshape(-1, base.shape[-1])

    id_base = _components(bfm["shapePC"], bfm["shapeEV"], N_ID, "shapePC/shapeEV", morphable_url) / 1e5
    exp_base = _components(exp_pc.astype(np.float64), exp_std, N_EXP, "Exp_Pca.bin/std_exp.txt", exp_url) / 1e5
    tex_base = _components(bfm["texPC"], bfm["texEV"], N_TEX, "texPC/texEV", morphable_url)
    return {
        "meanshape": front_rows(bfm["shapeMU"] / 1e5, index_shape).reshape(1, -1),
        "meantex": front_rows(bfm["texMU"], index_shape).reshape(1, -1),
        "idBase": front_rows(id_base, index_shape),
        "exBase": front_rows(exp_base, index_exp),
        "texBase": front_rows(tex_base, index_shape),
        **info,
    }
