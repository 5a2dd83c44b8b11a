"""Lazy preprocessing of 4D face data as xarray operations over Dask arrays.

Each function takes a Dataset shaped like a recon store (``v`` (time, face, vertex, coord), ``mat``,
``time`` in seconds, ...) and returns a new lazy Dataset; nothing is computed until the caller asks.
Every result appends one JSON record to ``attrs["gmfx_history"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from gmfx._checks import check_choice
from gmfx._errors import ParameterError
from gmfx._version import __version__
from gmfx.models._geometry import fit_transforms
from gmfx.preproc import _epochs, _filters, _motion, _one_euro, _resample, _rigid
from gmfx.storage import Location, LocationLike, as_location, open_dataset

__all__ = ["open_recon", "align", "align_with_frames", "interpolate", "filter", "epoch", "DEFAULT_MAX_GAP", "FrameRecipe"]

#: NaN stretches up to this long (seconds) are bridged by ``interpolate``: blinks and short detection
#: dropouts last 0.1-0.4 s; longer gaps are real missing data and stay NaN.
DEFAULT_MAX_GAP = 0.5

#: float64 bytes per block that ``filter`` holds for a whole time series (time=-1, some vertices)
_FILTER_BLOCK_BYTES = 64 * 2**20

#: attributes that describe the state of the store a dataset was read from, not its content
_STORE_STATE = ("gmfx_stage", "gmfx_plan", "gmfx_regions", "gmfx_complete", "gmfx_completion", "gmfx_instance")

#: the choices of the operations' parameters (checked by :func:`gmfx._checks.check_choice`)
Reference = Literal["template", "first", "mean", "mat"]
WholeRecordingReference = Literal["first", "mean"]
InterpolationMethod = Literal["linear", "pchip", "cubic"]
OnShort = Literal["error", "nan"]
FilterMethod = Literal["butterworth", "one_euro"]
CutoffLevel = Literal["-3dB", "-6dB"]
Anchor = Literal["onset", "offset", "warp"]
Baseline = Literal["mean", "ratio", None]

#: ``recipe(lo, hi)``: frames ``lo:hi`` of a lazy per-frame variable in one time chunk, built from the frames
#: ``lo:hi`` of its sources only (see :func:`align_with_frames` and ``interpolate(frames=...)``)
FrameRecipe = Callable[[int, int], da.Array]


def open_recon(location: LocationLike, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a finished recon store lazily (a path, URL with ``storage_options``, or :class:`Location`);
    the vertices of codes-only FLAME stores are derived lazily from their codes."""
    from gmfx.models import with_vertices

    return with_vertices(open_dataset(as_location(location, storage_options), stage="recon"))


# -- shared helpers -------------------------------------------------------------------------------
def _with_history(ds: xr.Dataset, operation: str, parameters: dict[str, Any]) -> xr.Dataset:
    record = {"operation": operation, "parameters": parameters, "gmfx_version": __version__}
    history = list(ds.attrs.get("gmfx_history", []))
    kept = {k: v for k, v in ds.attrs.items() if k not in _STORE_STATE}
    ds.attrs = {**kept, "gmfx_history": [*history, json.dumps(record, default=str)]}
    return ds


def _require(ds: xr.Dataset, name: str, dims: tuple[str, ...], operation: str) -> xr.DataArray:
    if name not in ds.variables or tuple(ds[name].dims[: len(dims)]) != dims:
        found = ds[name].dims if name in ds.variables else "missing"
        raise ParameterError(
            f"{operation} needs a variable {name!r} with dims {dims} (found: {found})",
            where=f"dataset with variables {sorted(map(str, ds.data_vars))}",
            fix="pass a dataset opened from a gmfx recon or preproc store",
        )
    return ds[name]


def _dask(array: xr.DataArray, time_chunk: int | None = None, chunks: dict[int, int] | None = None) -> da.Array:
    """The array's Dask data, time first, with every axis but time in one chunk (or as ``chunks`` says).

    One rechunk to the final chunks: two in a row would make every final block depend on every block
    of the intermediate chunking (e.g. a vertex block over the whole time axis would read all vertices).
    """
    data = array.data
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(time_chunk or data.shape[0],) + data.shape[1:])
    return data.rechunk({**{axis: -1 for axis in range(1, data.ndim)}, **(chunks or {})})


def _frames(data: da.Array, lo: int, hi: int, recipe: FrameRecipe | None = None) -> da.Array:
    """Frames ``lo:hi`` of ``data`` in one time chunk: from ``recipe`` when given (just those frames, from
    their sources), else sliced (which computes the whole chunks of ``data`` that hold them)."""
    if recipe is not None:
        return recipe(lo, hi)
    return data[lo:hi].rechunk({0: -1})


def _times(ds: xr.Dataset, operation: str) -> np.ndarray:
    times = np.asarray(ds["time"].values, dtype=np.float64)
    steps = np.diff(times)
    if times.size < 2 or not np.isfinite(times).all() or (steps <= 0).any():
        bad = int(np.flatnonzero(~(steps > 0))[0]) + 1 if (steps <= 0).any() else None
        raise ParameterError(
            f"{operation} needs at least 2 finite, strictly increasing times"
            + (f" (time[{bad}] = {times[bad]!r} is not after time[{bad - 1}])" if bad is not None else ""),
            where="coordinate 'time'",
            fix="check the recording's frame times (_frametimes.tsv or the video's timestamps)",
        )
    return times


def _time_chunk(array: xr.DataArray) -> int:
    return int(array.chunks[0][0]) if array.chunks else array.shape[0]


def _as_groups(block: np.ndarray) -> np.ndarray:
    """``(time, [group, [...]])`` -> ``(time, group, column)``."""
    if block.ndim == 1:
        return block[:, None, None]
    return block.reshape(block.shape[0], block.shape[1], -1)


def _along_time(
    data: da.Array,
    times: np.ndarray,
    new_times: np.ndarray,
    chunk: int,
    kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    margin: float,
    halo: int,
    dtype,
    recipe: FrameRecipe | None = None,
) -> da.Array:
    """Apply ``kernel(source_times, block, new_times)`` per output chunk of ``new_times``.

    Each output chunk reads the source samples within ``margin`` seconds (plus ``halo`` samples) of its
    time range (built by ``recipe`` when given), so the result is chunked like ``chunk`` along time and
    never merges the whole axis.
    """
    pieces = []
    for first in range(0, new_times.size, chunk):
        wanted = new_times[first : first + chunk]
        lo = max(0, int(np.searchsorted(times, wanted[0] - margin, side="left")) - halo)
        hi = min(times.size, int(np.searchsorted(times, wanted[-1] + margin, side="right")) + halo)
        if hi <= lo:
            pieces.append(da.full((wanted.size,) + data.shape[1:], np.nan, dtype=dtype, chunks=-1))
            continue
        source = _frames(data, lo, hi, recipe)
        pieces.append(
            source.map_blocks(
                _apply_kernel,
                kernel,
                times[lo:hi],
                wanted,
                dtype,
                chunks=((wanted.size,),) + source.chunks[1:],
                dtype=dtype,
            )
        )
    return da.concatenate(pieces, axis=0)


def _apply_kernel(block: np.ndarray, kernel, source_times, new_times, dtype) -> np.ndarray:
    out = kernel(source_times, _as_groups(block), new_times)
    return out.reshape((new_times.size,) + block.shape[1:]).astype(dtype, copy=False)


_MOTION_ATTRS = {
    "description": "decomposition of mat: translation, rotation (degrees, extrinsic x-y-z), scale, shear; "
    "derived from mat after every operation (angles are never interpolated or filtered)",
    "angle_range": f"rx, rz in [{_motion.ANGLE_RANGE[0]:g}, {_motion.ANGLE_RANGE[1]:g}), ry in [-90, 90]",
}


def _motion_of(mat: da.Array) -> da.Array:
    """``(time, face, 4, 4)`` affines -> ``(time, face, motion_param)`` float32, chunked like them along time."""
    mat = mat.rechunk({2: -1, 3: -1})
    return mat.map_blocks(
        _motion.motion_from_mat, drop_axis=3, chunks=mat.chunks[:2] + ((len(_rigid.MOTION_PARAMS),),), dtype=np.float64
    ).astype(np.float32)


def _with_motion(variables: dict[str, tuple], ds: xr.Dataset) -> None:
    """Set ``variables["motion"]`` from ``variables["mat"]`` where the input has ``motion``."""
    if "motion" in ds.data_vars and "mat" in variables:
        dims, mat, _ = variables["mat"]
        variables["motion"] = (dims[:-2] + ("motion_param",), _motion_of(mat), {**ds["motion"].attrs, **_MOTION_ATTRS})


# -- align ----------------------------------------------------------------------------------------
def _user_reference(reference, n_face: int, n_vertex: int) -> tuple[np.ndarray, str]:
    """A user's reference shape, ``(vertex, 3)`` or ``(face, vertex, 3)`` float64, and how to record it."""
    if isinstance(reference, (np.ndarray, xr.DataArray)):
        shape, where = np.asarray(reference, dtype=np.float64), "align(reference=<array>)"
        label = f"array sha1:{hashlib.sha1(np.ascontiguousarray(shape).tobytes()).hexdigest()[:12]}"
        if isinstance(reference, xr.DataArray) and "gmfx_reference" in reference.attrs:
            label = reference.attrs["gmfx_reference"]  # a computed reference_shape(): the history keeps its name
    elif isinstance(reference, (str, os.PathLike, Location)):
        location = reference if isinstance(reference, Location) else Location(os.fspath(reference))
        where = label = location.url
        if not location.exists():
            raise ParameterError(
                f"unknown alignment reference {location.url!r}: neither one of {get_args(Reference)} nor an existing store",
                where="align(reference=...)",
                fix=f"use one of {get_args(Reference)}, an array (vertex, 3), or the path of a gmfx store with 'v'",
            )
        stored = xr.open_zarr(**location.zarr_kwargs(), consolidated=False)
        if stored.attrs.get("gmfx_complete") is False:
            from gmfx._errors import IncompleteStoreError

            raise IncompleteStoreError("the reference store is incomplete", where=where, fix="finish the stage that writes it")
        if "v" not in stored.variables or not {"vertex", "coord"} <= set(stored["v"].dims):
            raise ParameterError(
                f"the reference store has no variable 'v' with dims (..., vertex, coord) (variables: {sorted(map(str, stored.data_vars))})",
                where=where,
                fix="give a gmfx recon, preproc, epochs or evoked store, or an array (vertex, 3)",
            )
        keep = [d for d in ("face", "vertex", "coord") if d in stored["v"].dims]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            shape = stored["v"].mean([d for d in stored["v"].dims if d not in keep]).transpose(*keep).values.astype(np.float64)
    else:
        raise ParameterError(
            f"unknown alignment reference {reference!r}",
            where="align(reference=...)",
            fix=f"use one of {get_args(Reference)}, an array (vertex, 3), or the path of a gmfx store",
        )
    if shape.ndim not in (2, 3) or shape.shape[-2:] != (n_vertex, 3) or (shape.ndim == 3 and shape.shape[0] not in (1, n_face)):
        raise ParameterError(
            f"the alignment reference has shape {shape.shape}; this mesh needs ({n_vertex}, 3) "
            f"({n_vertex} vertices), or ({n_face}, {n_vertex}, 3) with one shape per face",
            where=where,
            fix="give a shape of the same mesh topology (same model and vertex count)",
        )
    if not np.isfinite(shape).all():
        raise ParameterError(
            f"the alignment reference has {int((~np.isfinite(shape)).sum())} non-finite coordinates",
            where=where,
            fix="give a complete shape (e.g. a mean over frames where the face was found)",
        )
    return (shape[0] if shape.ndim == 3 and shape.shape[0] == 1 else shape), label


def _alignment_weights(ds: xr.Dataset, vertices) -> np.ndarray:
    n = ds.sizes["vertex"]
    if vertices is None:
        if "rigid_weight" in ds.variables:
            weights = np.asarray(ds["rigid_weight"].values, dtype=np.float64)
        elif "rigid" in ds.variables:
            weights = np.asarray(ds["rigid"].values, dtype=np.float64)
        else:
            weights = np.ones(n)
    else:
        chosen = np.asarray(vertices)
        if chosen.dtype == bool:
            if chosen.shape != (n,):
                raise ParameterError(
                    f"the vertex mask has shape {chosen.shape}, the mesh has {n} vertices",
                    where="align(vertices=...)",
                    fix=f"give a boolean mask of length {n} or vertex indices",
                )
            weights = chosen.astype(np.float64)
        else:
            if chosen.size and (chosen.min() < 0 or chosen.max() >= n):
                raise ParameterError(
                    f"vertex indices must lie in 0..{n - 1} (got {chosen.min()}..{chosen.max()})",
                    where="align(vertices=...)",
                    fix="give indices of the mesh's vertices",
                )
            weights = np.zeros(n)
            weights[chosen.astype(np.intp)] = 1.0
    if (weights > 0).sum() < 3:
        raise ParameterError(
            f"alignment needs at least 3 vertices with positive weight, got {(weights > 0).sum()}",
            where="align(vertices=...) or the store's 'rigid' variable",
            fix="choose at least 3 (preferably many, rigid) vertices",
        )
    return weights


def _fit_block(points: np.ndarray, reference: np.ndarray, *, weights: np.ndarray, scale: bool) -> np.ndarray:
    return fit_transforms(points, reference[None], weights, scale=scale)


def _apply_block(transforms: np.ndarray, points: np.ndarray) -> np.ndarray:
    return _rigid.apply_affine(transforms, points).astype(np.float32)


def _first_valid(block: np.ndarray, *, weights: np.ndarray) -> np.ndarray:
    """``(time, face, vertex, 3)`` -> ``(1, face, vertex, 3)``: each face's first frame valid on the weighted vertices."""
    valid = np.isfinite(block[:, :, weights > 0]).all(axis=(2, 3))
    out = np.full((1,) + block.shape[1:], np.nan)
    for face in range(block.shape[1]):
        hits = np.flatnonzero(valid[:, face])
        if hits.size:
            out[0, face] = block[hits[0], face]
    return out


def _first_reference(data: da.Array, weights: np.ndarray) -> da.Array:
    nblocks = data.numblocks[0]
    candidates = data.map_blocks(
        _first_valid, weights=weights, chunks=((1,) * nblocks,) + data.chunks[1:], dtype=np.float64
    )
    return candidates.rechunk({0: -1}).map_blocks(
        _first_valid, weights=weights, chunks=((1,),) + data.chunks[1:], dtype=np.float64
    )[0]


def _fit(data: da.Array, reference: da.Array, weights: np.ndarray, scale: bool) -> da.Array:
    reference = reference.rechunk((data.chunks[1], -1, -1))
    return da.blockwise(
        _fit_block, "tfij", data, "tfvc", reference, "fvc",
        new_axes={"i": 4, "j": 4}, concatenate=True, dtype=np.float64, weights=weights, scale=scale,
    )  # fmt: skip


def _whole_recording_reference(data: da.Array, weights: np.ndarray, reference: str, scale: bool) -> da.Array:
    target = _first_reference(data, weights)
    if reference == "mean":
        aligned = da.map_blocks(_apply_block, _fit(data, target, weights, scale), data, chunks=data.chunks, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            target = da.nanmean(aligned.astype(np.float64), axis=0)
    return target


def reference_shape(
    ds: xr.Dataset,
    reference: WholeRecordingReference = "mean",
    *,
    vertices: Sequence[int] | np.ndarray | None = None,
    scale: bool = False,
) -> xr.DataArray:
    """The lazy ``(face, vertex, coord)`` shape that ``align(ds, reference=reference)`` fits every frame onto.

    ``"first"`` is each face's first valid frame, ``"mean"`` the mean shape after aligning to it (every chunk
    of the recording is read). Compute it once and pass it as ``align(reference=...)``: each task of a
    chunked writer then holds the shape instead of the reduction (which it would recompute, reading the
    whole recording once per task); ``attrs["gmfx_reference"]`` keeps its name for the history.
    """
    check_choice(reference, WholeRecordingReference, function="reference_shape", name="reference")
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "reference_shape")
    shape = _whole_recording_reference(_dask(v), _alignment_weights(ds, vertices), reference, scale)
    return xr.DataArray(shape, dims=("face", "vertex", "coord"), name="reference", attrs={"gmfx_reference": reference})


def align(
    ds: xr.Dataset,
    *,
    reference: Reference | LocationLike | np.ndarray | xr.DataArray = "template",
    vertices: Sequence[int] | np.ndarray | None = None,
    scale: bool = False,
) -> xr.Dataset:
    """Remove rigid head motion: fit each frame onto a reference shape and express it in local space.

    Parameters
    ----------
    ds
        Dataset with ``v`` (time, face, vertex, coord) in world space.
    reference
        ``"template"`` (the store's canonical mesh), ``"first"`` (each face's first valid frame),
        ``"mean"`` (mean shape after aligning to the first frame; two passes, still lazy), or ``"mat"``
        (invert the backend's own local -> world ``mat``, no fit); or a shape of your own to align a
        whole study to: an array ``(vertex, 3)`` (or ``(face, vertex, 3)``), or the path or
        :class:`~gmfx.storage.Location` of a gmfx store whose ``v`` averaged over everything but
        ``(face,) vertex, coord`` is the shape (e.g. one participant's preproc or evoked store; read
        once, when ``align`` is called).
    vertices
        Indices or boolean mask of the vertices to fit on (default: ``rigid_weight`` or ``rigid``).
    scale
        Also fit a uniform scale per frame.

    Returns
    -------
    Dataset with ``v`` in local space, ``mat`` (local -> world, the inverse of each fit) and ``motion``
    (time, face, motion_param): translation, rotation in degrees (rx and rz in [-90, 270), continuous
    through +/-180), scales and shears of ``mat``; every later operation derives it from ``mat`` again.

    For ``"first"`` and ``"mean"`` the reference shape is a reduction over the whole recording: a writer
    that splits the work into many tasks computes :func:`reference_shape` once and passes the result as
    ``reference`` (the history still records its name), instead of letting every task recompute it.
    """
    return align_with_frames(ds, reference=reference, vertices=vertices, scale=scale)[0]


def align_with_frames(
    ds: xr.Dataset,
    *,
    reference: Reference | LocationLike | np.ndarray | xr.DataArray = "template",
    vertices: Sequence[int] | np.ndarray | None = None,
    scale: bool = False,
) -> tuple[xr.Dataset, dict[str, FrameRecipe]]:
    """:func:`align`, and a :data:`FrameRecipe` for each of its per-frame results (``v``, ``mat``, ``motion``)
    that builds frames ``lo:hi`` by aligning the source frames ``lo:hi`` only.

    Pass the recipes on as ``interpolate(aligned, frames=recipes)``: each chunk of the interpolated result then
    aligns just the frames it reads (its own and a halo of a few), instead of computing the whole neighbouring
    chunks of the alignment, which a writer that runs every chunk as its own task would repeat in each task
    (at 64-frame chunks, 30 fps and ``max_gap=0.2``, a task fits 89 frames instead of 192). The parameters
    are those of :func:`align`.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "align")
    user_shape = None
    if not (isinstance(reference, str) and reference in get_args(Reference)):
        user_shape, reference = _user_reference(reference, v.sizes["face"], v.sizes["vertex"])
    if v.attrs.get("space") == "local":
        raise ParameterError(
            "the vertices are already in local space (aligned)",
            where="variable 'v' (attrs space='local')",
            fix="align the recon store's world-space vertices, not an aligned dataset",
        )
    data = _dask(v)
    parameters: dict[str, Any] = {"reference": reference, "scale": scale}
    if reference == "mat":
        world = _dask(_require(ds, "mat", ("time", "face"), "align(reference='mat')")).rechunk((data.chunks[0], data.chunks[1], -1, -1))
        transforms = world.map_blocks(_rigid.invert_affine, dtype=np.float64)
    else:
        weights = _alignment_weights(ds, vertices)
        parameters["vertices"] = int((weights > 0).sum())
        if user_shape is not None:
            target = da.from_array(np.broadcast_to(user_shape, data.shape[1:]).astype(np.float64))
        elif reference == "template":
            template = np.asarray(_require(ds, "template", ("vertex", "coord"), "align(reference='template')").values)
            target = da.from_array(np.broadcast_to(template, data.shape[1:]).astype(np.float64))
        else:
            target = _whole_recording_reference(data, weights, reference, scale)
        transforms = _fit(data, target, weights, scale)
    def fits(lo: int, hi: int) -> da.Array:  # the transforms of frames lo:hi only (same keys for v, mat, motion)
        if reference == "mat":
            return world[lo:hi].rechunk({0: -1}).map_blocks(_rigid.invert_affine, dtype=np.float64)
        return _fit(data[lo:hi].rechunk({0: -1}), target, weights, scale)

    def outputs(transforms: da.Array, points: da.Array) -> tuple[da.Array, da.Array, da.Array]:
        local = da.map_blocks(_apply_block, transforms, points, chunks=points.chunks, dtype=np.float32)
        mat = transforms.map_blocks(_rigid.invert_affine, dtype=np.float64)
        return local, mat.astype(np.float32), _motion_of(mat)

    local, mat, motion = outputs(transforms, data)
    recipes = {
        name: (lambda lo, hi, p=position: outputs(fits(lo, hi), data[lo:hi].rechunk({0: -1}))[p])
        for position, name in enumerate(("v", "mat", "motion"))
    }
    out = ds.copy()
    out["v"] = (v.dims, local, {**v.attrs, "space": "local"})
    out["mat"] = (("time", "face", "row", "col"), mat, {"description": "local -> world affine"})
    out["motion"] = (
        ("time", "face", "motion_param"),
        motion,
        _MOTION_ATTRS,
    )
    out = out.assign_coords(motion_param=list(_rigid.MOTION_PARAMS))
    return _with_history(out, "align", parameters), recipes


# -- interpolate ----------------------------------------------------------------------------------
def interpolate(
    ds: xr.Dataset,
    *,
    sampling_freq: float | None = None,
    method: InterpolationMethod = "linear",
    max_gap: float = DEFAULT_MAX_GAP,
    frames: Mapping[str, FrameRecipe] | None = None,
) -> xr.Dataset:
    """Resample every time variable onto an even grid built from the real frame times.

    Parameters
    ----------
    sampling_freq
        Rate of the grid in Hz (default: 1 / median frame interval). The grid starts at the first frame.
    method
        ``"linear"``, ``"pchip"`` or ``"cubic"`` (spline per valid stretch) for float variables;
        ``mat`` always gets slerp for rotation and linear for the rest, boolean variables the
        nearest sample (``detected`` = all vertices finite).
    max_gap
        NaN stretches spanning more than this many seconds between valid frames stay NaN
        (default :data:`DEFAULT_MAX_GAP` = 0.5 s).
    frames
        Recipes that build frames ``lo:hi`` of some of ``ds``'s variables from their sources, as
        :func:`align_with_frames` returns them: each output chunk then computes only the source frames it
        reads. Without them those frames are sliced from ``ds`` (the same values).

    The output is chunked along time like the input's ``v`` (each chunk reads a halo of source frames).
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "interpolate")
    check_choice(method, InterpolationMethod, function="interpolate", name="method", label="interpolation method")
    if not max_gap > 0:
        raise ParameterError(f"max_gap={max_gap} is not positive", where="interpolate(max_gap=...)", fix="give a gap length in seconds, e.g. 0.5")
    if sampling_freq is not None and not sampling_freq > 0:
        raise ParameterError(f"sampling_freq={sampling_freq} is not positive", where="interpolate(sampling_freq=...)", fix="give a rate in Hz, e.g. 30")
    times = _times(ds, "interpolate")
    frames = dict(frames or {})
    unknown = sorted(set(frames) - {n for n in ds.data_vars if ds[n].dims[:1] == ("time",)})
    if unknown:
        raise ParameterError(
            f"interpolate got frame recipes for {unknown}, which are not time variables of the dataset",
            where="interpolate(frames=...)",
            fix="pass the recipes align_with_frames returned together with the dataset they belong to",
        )
    grid, rate = _resample.even_grid(times, sampling_freq)
    chunk = _time_chunk(v)
    margin = 2 * max_gap
    halo = _resample.halo_samples(method)

    def resampler(kind: str) -> Callable:
        if kind == "affine":
            return lambda t, x, new: _resample.resample_affines(t, x, new, max_gap=max_gap)
        return lambda t, x, new: _resample.resample(t, x, new, method=kind, max_gap=max_gap)

    variables = {}
    for name, array in ds.data_vars.items():
        if "time" not in array.dims or name == "motion":  # motion: derived from the resampled mat below
            continue
        if array.dims[0] != "time":
            array = array.transpose("time", ...)
        if name == "mat":
            kind, dtype = "affine", array.dtype
        elif array.dtype == bool:
            kind, dtype = "linear", np.float32  # turned back into the nearest boolean below
        elif np.issubdtype(array.dtype, np.floating):
            kind, dtype = method, array.dtype
        else:
            continue  # integer time series have no meaning between samples
        data = _dask(array.astype(np.float64) if array.dtype == bool else array, chunk)
        recipe = frames.get(name)
        if recipe is not None and array.dtype == bool:
            recipe = lambda lo, hi, build=recipe: build(lo, hi).astype(np.float64)  # noqa: E731
        resampled = _along_time(data, times, grid, chunk, resampler(kind), margin, halo, dtype, recipe)
        if array.dtype == bool:
            resampled = resampled >= 0.5
        variables[name] = (array.dims, resampled, array.attrs)
    if "detected" in variables and variables["detected"][0] == ("time", "face"):
        local = variables["v"][1]
        variables["detected"] = (("time", "face"), da.isfinite(local).all(axis=(2, 3)), ds["detected"].attrs)
    _with_motion(variables, ds)
    static = ds.drop_vars([n for n in ds.variables if "time" in ds[n].dims])
    out = static.assign_coords(time=("time", grid, {**ds["time"].attrs, "units": "s"})).assign(variables)
    return _with_history(
        out, "interpolate", {"sampling_freq": rate, "method": method, "max_gap": max_gap, "samples": int(grid.size)}
    )


# -- filter ---------------------------------------------------------------------------------------
def _even_rate(ds: xr.Dataset) -> float:
    times = _times(ds, "filter")
    steps = np.diff(times)
    step = float(np.median(steps))
    if np.abs(steps - step).max() > 1e-6 * step + 1e-9:
        worst = int(np.abs(steps - step).argmax())
        raise ParameterError(
            f"filter needs an even time grid, but the step between time[{worst}] and time[{worst + 1}] is "
            f"{steps[worst]:.6g} s instead of {step:.6g} s",
            where="coordinate 'time'",
            fix="run interpolate() first (gmfx interpolate), which resamples onto an even grid",
        )
    return 1.0 / step


def _filter_block(block: np.ndarray, *, sos, highpass_sections, causal, start, rate, on_short, where) -> np.ndarray:
    times = start + np.arange(block.shape[0]) / rate  # the even grid (for messages), not shipped with every task
    out = _filters.filter_series(
        _as_groups(block), sos, highpass_sections=highpass_sections, causal=causal, times=times, on_short=on_short,
        where=where, dtype=block.dtype,
    )  # fmt: skip
    return out.reshape(block.shape).astype(block.dtype, copy=False)


def _one_euro_block(block: np.ndarray, *, times, min_cutoff, beta, d_cutoff) -> np.ndarray:
    return _one_euro.one_euro(block, times, min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff, dtype=block.dtype)



def filter(  # noqa: A001 - the public name mirrors the operation
    ds: xr.Dataset,
    *,
    highpass: float | None = 0.005,
    lowpass: float | None = 4.0,
    order: int = 5,
    causal: bool = False,
    cutoff_level: CutoffLevel = "-3dB",
    method: FilterMethod = "butterworth",
    min_cutoff: float = 1.0,
    beta: float = 0.0,
    d_cutoff: float = 1.0,
    on_short: OnShort = "error",
    vertex_chunk: int | None = None,
) -> xr.Dataset:
    """Filter ``v`` along time, per valid stretch, keeping each vertex's mean shape.

    Parameters
    ----------
    highpass, lowpass
        Butterworth cut-offs in Hz; ``None`` switches a side off. The high-pass removes slow drift
        *around* each valid stretch's temporal mean, which is kept exactly: the result is still a face,
        not a deviation around zero (that moved vertex means by ~38 px on a real MediaPipe clip).
    order
        Butterworth order (of each side).
    causal
        One forward pass (with a phase lag) instead of zero-phase forward-backward filtering.
    cutoff_level
        Gain of the effective response (both passes) at each cut-off: ``"-3dB"`` (1/sqrt 2, default)
        or ``"-6dB"`` (1/2). Zero-phase filtering squares the gain, so each side is designed where
        one pass gives the square root of it (``--lowpass 4`` used to be -3 dB at 3.70 Hz).
    method
        ``"butterworth"``, or ``"one_euro"``: the online, speed-adaptive One Euro smoother
        (Casiez et al. 2012) with ``min_cutoff`` (Hz), ``beta`` (1 / data units) and ``d_cutoff`` (Hz),
        whose starting values 1, 0, 1 are the authors'; it follows the real frame times (no even grid
        needed) and ignores the Butterworth options.
    on_short
        ``"error"``: a valid stretch shorter than the filter's padding raises :class:`ParameterError`;
        ``"nan"``: such stretches become NaN.
    vertex_chunk
        Vertices per block (default: blocks of ~64 MiB of float64). Filtering needs the whole time axis,
        so the result is chunked ``time=-1`` and along ``vertex`` (exact, bounded memory per block);
        the preproc stage writes it back time-chunked.

    ``mat`` is kept and ``motion`` derived from it again (angles are never filtered). The design
    (requested and per-pass cut-offs, sections, passes, how edges and the mean are handled) goes into
    the history record.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "filter")
    check_choice(on_short, OnShort, function="filter", name="on_short")
    check_choice(method, FilterMethod, function="filter", name="method", label="filter method")
    n_time, n_face = v.shape[:2]
    if vertex_chunk is None:
        vertex_chunk = max(1, _FILTER_BLOCK_BYTES // (n_time * n_face * v.shape[3] * 8))
    data = _dask(v, chunks={0: -1, 2: vertex_chunk})
    if method == "one_euro":
        for name, value in (("min_cutoff", min_cutoff), ("d_cutoff", d_cutoff)):
            if not value > 0:
                raise ParameterError(f"{name}={value} is not positive", where=f"filter({name}=...)", fix="give a cut-off in Hz, e.g. 1.0")
        if not beta >= 0:
            raise ParameterError(f"beta={beta} is negative", where="filter(beta=...)", fix="give beta >= 0 (0: a fixed cut-off)")
        times = _times(ds, "filter")
        filtered = data.map_blocks(
            _one_euro_block, times=times, min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff, dtype=data.dtype
        )
        parameters: dict[str, Any] = {"method": method, "min_cutoff": min_cutoff, "beta": beta, "d_cutoff": d_cutoff}
    else:
        rate = _even_rate(ds)
        sos, design = _filters.design_butterworth(
            rate, highpass=highpass, lowpass=lowpass, order=order, passes=1 if causal else 2, cutoff_level=cutoff_level
        )
        times = np.asarray(ds["time"].values, dtype=np.float64)
        need = 1 if causal else _filters.padding_samples(sos) + 1
        if times.size < need and on_short == "error":  # with "nan" the whole (too short) recording stays NaN
            raise ParameterError(
                f"the recording has {times.size} samples, fewer than the {need} this filter needs (its padding)",
                where=f"filter(highpass={highpass}, lowpass={lowpass}, order={order})",
                fix="lower the order, or filter a longer recording",
            )
        kwargs = {"sos": sos, "highpass_sections": design["highpass_sections"], "causal": causal,
                  "start": float(times[0]), "rate": rate, "on_short": on_short}  # fmt: skip
        filtered = data.map_blocks(_filter_block, where="variable 'v'", dtype=data.dtype, **kwargs)
        parameters = {"method": method, "highpass": highpass, "lowpass": lowpass, "order": order, "causal": causal,
                      "cutoff_level": cutoff_level, "on_short": on_short, "design": design}  # fmt: skip
    out = ds.copy()
    out["v"] = (v.dims, filtered, v.attrs)
    if "motion" in ds.data_vars and "mat" in ds.data_vars:
        variables = {"mat": (ds["mat"].dims, _dask(ds["mat"]), ds["mat"].attrs)}
        _with_motion(variables, ds)
        out["motion"] = variables["motion"]
    return _with_history(out, "filter", parameters)


# -- epoch ----------------------------------------------------------------------------------------
def epoch(
    ds: xr.Dataset,
    events: pd.DataFrame | str | os.PathLike | Location,
    *,
    start: float = -0.5,
    end: float = 2.0,
    anchor: Anchor = "onset",
    sampling_freq: float | None = None,
    n_lags: int | None = None,
    method: InterpolationMethod = "linear",
    max_gap: float = DEFAULT_MAX_GAP,
    baseline: Baseline = None,
    baseline_window: tuple[float, float] | None = None,
) -> xr.Dataset:
    """Cut epochs around events, interpolated from the real sample times.

    Parameters
    ----------
    events
        A DataFrame or the path/Location of an ``_events.tsv`` (``onset``, ``duration``, ...); every
        column becomes a coordinate along ``epoch``.
    start, end
        First and last lag: seconds from the anchor, or for ``anchor="warp"`` fractions of each event's
        duration (0 = onset, 1 = offset).
    anchor
        ``"onset"``, ``"offset"`` (onset + duration) or ``"warp"`` (every event stretched to one length).
    sampling_freq, n_lags
        Lags every ``1 / sampling_freq`` s (default: the data's rate), or ``n_lags`` evenly spaced
        (default for warp: the median duration at the data's rate).
    method, max_gap
        As in :func:`interpolate`. Samples outside the recording are NaN.
    baseline, baseline_window
        ``"mean"`` subtracts, ``"ratio"`` divides by each epoch's mean over the lags in the window
        (default ``(start, 0)``).

    Returns
    -------
    Dataset with ``v`` (epoch, lag, face, vertex, coord); ``mat`` (by slerp) and ``motion`` (derived from
    it, never baseline-corrected) likewise when present. Events whose onset lies outside the recording
    are reported with a warning.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "epoch")
    check_choice(anchor, Anchor, function="epoch", name="anchor")
    check_choice(baseline, Baseline, function="epoch", name="baseline")
    check_choice(method, InterpolationMethod, function="epoch", name="method", label="interpolation method")
    table = _epochs.read_events(events)
    source = str(events.url if isinstance(events, Location) else "DataFrame" if isinstance(events, pd.DataFrame) else events)
    times = _times(ds, "epoch")
    rate = 1.0 / float(np.median(np.diff(times)))
    if anchor != "onset" and table["duration"].isna().any():
        row = int(np.flatnonzero(table["duration"].isna().to_numpy())[0])
        from gmfx._errors import EventsError

        raise EventsError(
            f"anchor={anchor!r} needs every event's duration, but row {row + 1} has none",
            where=source,
            fix="fill the 'duration' column, or use anchor='onset'",
        )
    if anchor == "warp" and n_lags is None:
        n_lags = int(round((end - start) * float(table["duration"].median()) * rate)) + 1
    lags = _epochs.epoch_lags(start, end, sampling_freq=sampling_freq or rate, n_lags=n_lags)
    window = tuple(baseline_window) if baseline_window is not None else (start, 0.0)
    if baseline and not ((lags >= window[0]) & (lags <= window[1])).any():
        raise ParameterError(
            f"the baseline window {window} holds none of the lags {lags[0]:g}..{lags[-1]:g}",
            where="epoch(baseline_window=...)",
            fix="choose a window inside (start, end), e.g. (start, 0)",
        )
    outside = _epochs.outside_recording(table["onset"].to_numpy(), times[0], times[-1])
    if outside.size:
        listed = ", ".join(f"row {i + 1} (onset {table['onset'].iloc[i]:g} s)" for i in outside[:10])
        warnings.warn(
            f"{outside.size} of {len(table)} events in {source} have onsets outside the recording "
            f"({times[0]:g}..{times[-1]:g} s): {listed}{', ...' if outside.size > 10 else ''}; their epochs are NaN",
            UserWarning,
            stacklevel=2,
        )
    sample_times = _epochs.epoch_times(table["onset"].to_numpy(), table["duration"].to_numpy(), lags, anchor)

    def cut(array: xr.DataArray, kind: str) -> da.Array:
        data = _dask(array)
        pieces = []
        for wanted in sample_times:
            if kind == "affine":
                kernel = lambda t, x, new: _resample.resample_affines(t, x, new, max_gap=max_gap)  # noqa: E731
            else:
                kernel = lambda t, x, new: _resample.resample(t, x, new, method=method, max_gap=max_gap)  # noqa: E731
            dtype = array.dtype if kind == "affine" else np.float32
            piece = _along_time(data, times, wanted, wanted.size, kernel, 2 * max_gap, _resample.halo_samples(method), dtype)
            if baseline and kind != "affine":
                piece = piece.map_blocks(_baseline_block, lags=lags, window=window, mode=baseline, dtype=np.float32)
            pieces.append(piece[None])
        return da.concatenate(pieces, axis=0)

    variables = {"v": (("epoch", "lag") + v.dims[1:], cut(v, method), v.attrs)}
    if "mat" in ds.data_vars:  # rotations by slerp; motion derived from them (no baseline: they are poses)
        variables["mat"] = (("epoch", "lag") + ds["mat"].dims[1:], cut(ds["mat"], "affine"), ds["mat"].attrs)
        if "motion" in ds.data_vars:
            mat = variables["mat"][1]
            motion = _motion_of(mat.reshape((-1,) + mat.shape[2:])).reshape(mat.shape[:3] + (len(_rigid.MOTION_PARAMS),))
            variables["motion"] = (("epoch", "lag") + ds["motion"].dims[1:], motion, {**ds["motion"].attrs, **_MOTION_ATTRS})
    static = ds.drop_vars([n for n in ds.variables if "time" in ds[n].dims])
    epoch_coords = {str(c): ("epoch", table[c].to_numpy()) for c in table.columns}
    lag_attrs = {"units": "duration fraction" if anchor == "warp" else "s", "anchor": anchor}
    out = static.assign_coords(epoch=np.arange(len(table)), lag=("lag", lags, lag_attrs), **epoch_coords).assign(variables)
    parameters = {
        "events": source, "start": start, "end": end, "anchor": anchor, "lags": int(lags.size),
        "method": method, "max_gap": max_gap, "baseline": baseline, "baseline_window": window,
    }  # fmt: skip
    return _with_history(out, "epoch", parameters)


def _baseline_block(block: np.ndarray, *, lags, window, mode) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN baseline gives NaN, as it should
        return _epochs.apply_baseline(block[None], lags, window, mode)[0].astype(np.float32)
