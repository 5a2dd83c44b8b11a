"""Lazy preprocessing of 4D face data as xarray operations over Dask arrays.

Each function takes a Dataset shaped like a recon store (``v`` (time, face, vertex, coord), ``mat``,
``time`` in seconds, ...) and returns a new lazy Dataset; nothing is computed until the caller asks.
Every result appends one JSON record to ``attrs["gmfx_history"]``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from gmfx._checks import check_choice
from gmfx._errors import ParameterError
from gmfx._version import __version__
from gmfx.preproc import _epochs, _filters, _resample, _rigid
from gmfx.storage import Location, LocationLike, as_location, open_dataset

__all__ = ["open_recon", "align", "interpolate", "filter", "epoch", "DEFAULT_MAX_GAP"]

#: NaN stretches up to this long (seconds) are bridged by ``interpolate``: blinks and short detection
#: dropouts last 0.1-0.4 s; longer gaps are real missing data and stay NaN.
DEFAULT_MAX_GAP = 0.5

#: float64 bytes per block that ``filter`` holds for a whole time series (time=-1, some vertices)
_FILTER_BLOCK_BYTES = 64 * 2**20

#: attributes that describe the state of the store a dataset was read from, not its content
_STORE_STATE = ("gmfx_stage", "gmfx_plan", "gmfx_regions", "gmfx_complete")

#: the choices of the operations' parameters (checked by :func:`gmfx._checks.check_choice`)
Reference = Literal["template", "first", "mean", "mat"]
InterpolationMethod = Literal["linear", "pchip", "cubic"]
OnShort = Literal["error", "nan"]
Anchor = Literal["onset", "offset", "warp"]
Baseline = Literal["mean", "ratio", None]

#: attribute of a per-frame Dask array: ``recipe(lo, hi)`` builds frames ``lo:hi`` from its sources only
_FRAMES_RECIPE = "_gmfx_frames"


def open_recon(location: LocationLike, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a finished recon store lazily (a path, URL with ``storage_options``, or :class:`Location`)."""
    return open_dataset(as_location(location, storage_options), stage="recon")


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


def _frames(data: da.Array, lo: int, hi: int) -> da.Array:
    """Frames ``lo:hi`` of ``data`` in one time chunk.

    A per-frame result (e.g. the aligned vertices) carries a recipe that computes just those frames
    from its own sources: slicing it plainly would compute the whole neighbouring chunks (an
    interpolation halo of a few frames would redo the alignment of three chunks per output chunk).
    """
    recipe = getattr(data, _FRAMES_RECIPE, None)
    if recipe is not None:
        return recipe(lo, hi)
    return data[lo:hi].rechunk({0: -1})


def _with_recipe(array: da.Array, recipe: Callable[[int, int], da.Array]) -> da.Array:
    setattr(array, _FRAMES_RECIPE, recipe)
    return array


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
) -> da.Array:
    """Apply ``kernel(source_times, block, new_times)`` per output chunk of ``new_times``.

    Each output chunk reads the source samples within ``margin`` seconds (plus ``halo`` samples) of its
    time range, so the result is chunked like ``chunk`` along time and never merges the whole axis.
    """
    pieces = []
    for first in range(0, new_times.size, chunk):
        wanted = new_times[first : first + chunk]
        lo = max(0, int(np.searchsorted(times, wanted[0] - margin, side="left")) - halo)
        hi = min(times.size, int(np.searchsorted(times, wanted[-1] + margin, side="right")) + halo)
        if hi <= lo:
            pieces.append(da.full((wanted.size,) + data.shape[1:], np.nan, dtype=dtype, chunks=-1))
            continue
        source = _frames(data, lo, hi)
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


# -- align ----------------------------------------------------------------------------------------
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
    return _rigid.fit_transforms(points, reference[None], weights, scale=scale)


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


def align(
    ds: xr.Dataset,
    *,
    reference: Reference = "template",
    vertices: Sequence[int] | np.ndarray | None = None,
    scale: bool = False,
    _target: np.ndarray | None = None,
) -> xr.Dataset:
    """Remove rigid head motion: fit each frame onto a reference shape and express it in local space.

    Parameters
    ----------
    ds
        Dataset with ``v`` (time, face, vertex, coord) in world space.
    reference
        ``"template"`` (the store's canonical mesh), ``"first"`` (each face's first valid frame),
        ``"mean"`` (mean shape after aligning to the first frame; two passes, still lazy), or ``"mat"``
        (invert the backend's own local -> world ``mat``, no fit).
    vertices
        Indices or boolean mask of the vertices to fit on (default: ``rigid_weight`` or ``rigid``).
    scale
        Also fit a uniform scale per frame.

    Returns
    -------
    Dataset with ``v`` in local space, ``mat`` (local -> world, the inverse of each fit) and ``motion``
    (time, face, motion_param): translation, rotation in degrees, scales and shears of ``mat``.

    For ``"first"`` and ``"mean"`` the reference shape is a reduction over the whole recording; the
    lazy ``v`` carries it as ``v.data._gmfx_target`` so that a writer that splits the work into many
    tasks computes it once and passes it back as ``_target`` (the same reference, already computed)
    instead of letting every task recompute it.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "align")
    check_choice(reference, Reference, function="align", name="reference", label="alignment reference")
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
        if reference == "template":
            template = np.asarray(_require(ds, "template", ("vertex", "coord"), "align(reference='template')").values)
            target = da.from_array(np.broadcast_to(template, data.shape[1:]).astype(np.float64))
        elif _target is not None:
            target = da.from_array(np.broadcast_to(np.asarray(_target, dtype=np.float64), data.shape[1:]))
        else:
            target = _first_reference(data, weights)
        transforms = _fit(data, target, weights, scale)
        if reference == "mean" and _target is None:
            aligned = da.map_blocks(_apply_block, transforms, data, chunks=data.chunks, dtype=np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                target = da.nanmean(aligned.astype(np.float64), axis=0)
            transforms = _fit(data, target, weights, scale)
    def fits(lo: int, hi: int) -> da.Array:  # the transforms of frames lo:hi only (same keys for v, mat, motion)
        if reference == "mat":
            return world[lo:hi].rechunk({0: -1}).map_blocks(_rigid.invert_affine, dtype=np.float64)
        return _fit(data[lo:hi].rechunk({0: -1}), target, weights, scale)

    def outputs(transforms: da.Array, points: da.Array) -> tuple[da.Array, da.Array, da.Array]:
        local = da.map_blocks(_apply_block, transforms, points, chunks=points.chunks, dtype=np.float32)
        mat = transforms.map_blocks(_rigid.invert_affine, dtype=np.float64)
        motion = mat.map_blocks(
            _rigid.decompose_affine, drop_axis=3, chunks=mat.chunks[:2] + ((len(_rigid.MOTION_PARAMS),),), dtype=np.float64
        )
        return local, mat.astype(np.float32), motion.astype(np.float32)

    local, mat, motion = outputs(transforms, data)
    if reference in ("first", "mean") and _target is None:
        local._gmfx_target = target
    for position, array in enumerate((local, mat, motion)):
        _with_recipe(array, lambda lo, hi, p=position: outputs(fits(lo, hi), data[lo:hi].rechunk({0: -1}))[p])
    out = ds.copy()
    out["v"] = (v.dims, local, {**v.attrs, "space": "local"})
    out["mat"] = (("time", "face", "row", "col"), mat, {"description": "local -> world affine"})
    out["motion"] = (
        ("time", "face", "motion_param"),
        motion,
        {"description": "decomposition of mat: translation, rotation (degrees, extrinsic x-y-z), scale, shear"},
    )
    out = out.assign_coords(motion_param=list(_rigid.MOTION_PARAMS))
    return _with_history(out, "align", parameters)


# -- interpolate ----------------------------------------------------------------------------------
def interpolate(
    ds: xr.Dataset,
    *,
    sampling_freq: float | None = None,
    method: InterpolationMethod = "linear",
    max_gap: float = DEFAULT_MAX_GAP,
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

    The output is chunked along time like the input's ``v`` (each chunk reads a halo of source frames).
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "interpolate")
    check_choice(method, InterpolationMethod, function="interpolate", name="method", label="interpolation method")
    if not max_gap > 0:
        raise ParameterError(f"max_gap={max_gap} is not positive", where="interpolate(max_gap=...)", fix="give a gap length in seconds, e.g. 0.5")
    if sampling_freq is not None and not sampling_freq > 0:
        raise ParameterError(f"sampling_freq={sampling_freq} is not positive", where="interpolate(sampling_freq=...)", fix="give a rate in Hz, e.g. 30")
    times = _times(ds, "interpolate")
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
        if "time" not in array.dims:
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
        resampled = _along_time(data, times, grid, chunk, resampler(kind), margin, halo, dtype)
        if array.dtype == bool:
            resampled = resampled >= 0.5
        variables[name] = (array.dims, resampled, array.attrs)
    if "detected" in variables and variables["detected"][0] == ("time", "face"):
        local = variables["v"][1]
        variables["detected"] = (("time", "face"), da.isfinite(local).all(axis=(2, 3)), ds["detected"].attrs)
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


def _filter_block(block: np.ndarray, *, sos, causal, start, rate, on_short, where) -> np.ndarray:
    times = start + np.arange(block.shape[0]) / rate  # the even grid (for messages), not shipped with every task
    out = _filters.filter_series(_as_groups(block), sos, causal=causal, times=times, on_short=on_short, where=where, dtype=block.dtype)
    return out.reshape(block.shape).astype(block.dtype, copy=False)


def filter(  # noqa: A001 - the public name mirrors the operation
    ds: xr.Dataset,
    *,
    highpass: float | None = 0.005,
    lowpass: float | None = 4.0,
    order: int = 5,
    causal: bool = False,
    on_short: OnShort = "error",
    vertex_chunk: int | None = None,
) -> xr.Dataset:
    """Butterworth high-, low- or band-pass of ``v`` (and ``motion``) along time, per valid stretch.

    Parameters
    ----------
    highpass, lowpass
        Cut-offs in Hz; ``None`` switches a side off.
    order
        Butterworth order (of each side).
    causal
        ``sosfilt`` (forward only, with a phase lag) instead of zero-phase ``sosfiltfilt``.
    on_short
        ``"error"``: a valid stretch shorter than the filter's padding raises :class:`ParameterError`;
        ``"nan"``: such stretches become NaN.
    vertex_chunk
        Vertices per block (default: blocks of ~64 MiB of float64). Filtering needs the whole time axis,
        so the result is chunked ``time=-1`` and along ``vertex`` (exact, bounded memory per block);
        the preproc stage writes it back time-chunked.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "filter")
    check_choice(on_short, OnShort, function="filter", name="on_short")
    rate = _even_rate(ds)
    sos, design = _filters.design_butterworth(rate, highpass=highpass, lowpass=lowpass, order=order)
    times = np.asarray(ds["time"].values, dtype=np.float64)
    need = 1 if causal else _filters.padding_samples(sos) + 1
    if times.size < need:
        raise ParameterError(
            f"the recording has {times.size} samples, fewer than the {need} this filter needs (its padding)",
            where=f"filter(highpass={highpass}, lowpass={lowpass}, order={order})",
            fix="lower the order, or filter a longer recording",
        )
    kwargs = {"sos": sos, "causal": causal, "start": float(times[0]), "rate": rate, "on_short": on_short}
    n_time, n_face = v.shape[:2]
    if vertex_chunk is None:
        vertex_chunk = max(1, _FILTER_BLOCK_BYTES // (n_time * n_face * v.shape[3] * 8))
    data = _dask(v, chunks={0: -1, 2: vertex_chunk})
    out = ds.copy()
    out["v"] = (v.dims, data.map_blocks(_filter_block, where="variable 'v'", dtype=data.dtype, **kwargs), v.attrs)
    if "motion" in ds.data_vars:
        motion = _dask(ds["motion"], chunks={0: -1})
        out["motion"] = (ds["motion"].dims, motion.map_blocks(_filter_block, where="variable 'motion'", dtype=motion.dtype, **kwargs), ds["motion"].attrs)
    parameters = {"highpass": highpass, "lowpass": lowpass, "order": order, "causal": causal, "on_short": on_short, "design": design}
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
    Dataset with ``v`` (epoch, lag, face, vertex, coord), ``motion`` likewise when present. Events whose
    onset lies outside the recording are reported with a warning.
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

    def cut(array: xr.DataArray) -> da.Array:
        data = _dask(array)
        pieces = []
        for wanted in sample_times:
            kernel = lambda t, x, new: _resample.resample(t, x, new, method=method, max_gap=max_gap)  # noqa: E731
            piece = _along_time(data, times, wanted, wanted.size, kernel, 2 * max_gap, _resample.halo_samples(method), np.float32)
            if baseline:
                piece = piece.map_blocks(_baseline_block, lags=lags, window=window, mode=baseline, dtype=np.float32)
            pieces.append(piece[None])
        return da.concatenate(pieces, axis=0)

    variables = {"v": (("epoch", "lag") + v.dims[1:], cut(v), v.attrs)}
    if "motion" in ds.data_vars:
        variables["motion"] = (("epoch", "lag") + ds["motion"].dims[1:], cut(ds["motion"]), ds["motion"].attrs)
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
