"""The generative model of facial expressions as lazy xarray operations.

* :func:`glm` fits, per vertex and coordinate, how each condition of the experiment moves the face over
  a window of lags (FIR), with drift and head-motion nuisance, as one Dask task per vertex block;
* :func:`group` combines participants' fits (fixed and random effects) on one reference shape;
* :func:`generate` turns a fit (or a component) into a renderable mesh sequence;
* :func:`components` finds a low-dimensional basis of facial movement (randomised PCA, lazy).

Results are Datasets laid out like recon stores (``face``, ``vertex``, ``coord``, ``tris``), so that
:func:`gmfx.stages.glm.write_fit` writes them as stores and a renderer draws what ``generate`` gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Literal

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from gmfx._errors import ParameterError
from gmfx._version import __version__
from gmfx.analysis import _design, _ols
from gmfx.preproc._api import _dask, _even_rate, _require, _with_history
from gmfx.preproc._epochs import read_events
from gmfx.models._geometry import fit_transforms
from gmfx.storage import Location

__all__ = ["glm", "group", "generate", "components", "versions"]

#: float64 bytes of one vertex block over the whole recording: the kernel holds ~4 such arrays
#: (data, residuals, whitened data, fitted), so a block of 32 MiB keeps a task near 150 MB
_BLOCK_BYTES = 32 * 2**20

Contrasts = Mapping[str, Mapping[str, float] | str]


def versions() -> dict[str, str]:
    """The versions of gmfx and the libraries that compute a fit (provenance)."""
    import scipy

    return {"gmfx": __version__, "numpy": np.__version__, "scipy": scipy.__version__, "xarray": xr.__version__,
            "dask": dask.__version__, "pandas": pd.__version__}  # fmt: skip


_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([A-Za-z_][\w:.]*)\s*")


def _weights(name: str, spec: Mapping[str, float] | str, conditions: Sequence[str]) -> np.ndarray:
    """Contrast weights over ``conditions`` from ``{"happy": 1, "sad": -1}`` or ``"happy - sad"``."""
    if isinstance(spec, str):
        terms, position = {}, 0
        while position < len(spec):
            match = _TERM.match(spec, position)
            if not match or match.end() == position:
                raise ParameterError(
                    f"contrast {name!r} cannot be read at {spec[position:]!r}",
                    where=f"contrast {name}={spec}",
                    fix="write it as weighted conditions, e.g. 'happy - sad' or '0.5*happy + 0.5*sad'",
                )
            sign = -1.0 if match.group(1) == "-" else 1.0
            terms[match.group(3)] = terms.get(match.group(3), 0.0) + sign * float(match.group(2) or 1.0)
            position = match.end()
        spec = terms
    unknown = sorted(set(spec) - set(conditions))
    if unknown:
        raise ParameterError(
            f"contrast {name!r} names unknown condition(s) {unknown}",
            where=f"contrast {name}",
            fix=f"use the conditions of the design: {', '.join(conditions)}",
        )
    weights = np.array([float(spec.get(c, 0.0)) for c in conditions])
    if not np.abs(weights).sum() > 0:
        raise ParameterError(f"contrast {name!r} has no non-zero weight", where=f"contrast {name}", fix="give a weight to a condition")
    return weights


#: designs prepared in this process, by digest of their inputs: every vertex-block task of a recording
#: needs the same one (1-2 s to build for an hour), so a worker builds it once, not once per block
_PREPARED: OrderedDict[str, _ols.Prepared] = OrderedDict()
_PREPARED_KEPT = 4


def _prepare_face(events, times, valid, motion, **options):
    digest = hashlib.sha1(pickle.dumps((events, np.asarray(times), None if valid is None else np.asarray(valid),
                                        None if motion is None else np.asarray(motion), options))).hexdigest()  # fmt: skip
    prepared = _PREPARED.get(digest)
    if prepared is None:
        prepared = _PREPARED[digest] = _build_prepared(events, times, valid, motion, **options)
        while len(_PREPARED) > _PREPARED_KEPT:
            _PREPARED.popitem(last=False)
    return prepared


def _build_prepared(events, times, valid, motion, *, window, modulators, drift_order, motion_names, ar1, t_weights, f_weights, where):
    design = _design.build_design(
        events, times, window=window, modulators=modulators, drift_order=drift_order, motion=motion,
        motion_names=motion_names, valid=None if valid is None else np.asarray(valid), where=where,
    )  # fmt: skip
    return _ols.prepare(
        design.matrix, design.valid, n_interest=design.n_interest, n_lags=design.lags.size, t_weights=t_weights,
        f_weights=f_weights, ar1=ar1, names=list(design.columns["name"]), where=f"glm of {where}",
    )  # fmt: skip


def _fit_block(block: np.ndarray, prepared: list, rows: int, block_id=None) -> np.ndarray:
    face = block_id[1]
    packed = _ols.fit_columns(block.reshape(block.shape[0], -1), prepared[face])
    return packed.reshape((rows,) + block.shape[1:])


def glm(
    ds: xr.Dataset,
    events: pd.DataFrame | str | os.PathLike | Location,
    *,
    window: tuple[float, float] = (0.0, 2.0),
    modulators: Sequence[str] = (),
    drift_order: int = 3,
    motion: Sequence[str] | None = _design.DEFAULT_MOTION_PARAMS,
    ar1: bool = False,
    t_contrasts: Contrasts | None = None,
    f_contrasts: Contrasts | None = None,
    vertex_chunk: int | None = None,
) -> xr.Dataset:
    """Fit the face's movement to the experiment's events, per vertex and coordinate (lazy).

    Parameters
    ----------
    ds
        A preprocessed dataset: ``v`` (time, face, vertex, coord) on an even grid, optionally ``detected``
        (time, face) and ``motion`` (time, face, motion_param).
    events
        DataFrame or path/Location of an ``_events.tsv`` with ``onset`` and ``trial_type``.
    window
        First and last FIR lag, seconds from each onset (default 0 to 2 s: facial expressions peak
        0.5-1.5 s after a stimulus).
    modulators
        Event columns whose (centred) values scale each condition's response: extra conditions
        ``<trial_type>:<column>``.
    drift_order
        Highest Legendre degree of the slow drift (0 = intercept only; -1 = none).
    motion
        Motion parameters used as nuisance regressors when ``ds`` has ``motion`` (``None``: none).
    ar1
        Prewhiten each column with its AR(1) coefficient (rounded to 0.01), Cochrane-Orcutt.
    t_contrasts, f_contrasts
        ``{name: {"happy": 1, "sad": -1}}`` or ``{name: "happy - sad"}``; a t contrast is tested at every
        lag, an F contrast at all lags jointly. Default: one of each per condition (its response vs 0).
    vertex_chunk
        Vertices per task (default: the input's vertex chunks when they hold at most ~128 MiB of float64
        over the whole recording, else blocks of ~32 MiB: memory follows the block, not the recording's
        length; a task holds ~4 blocks).

    Returns
    -------
    Dataset with ``beta`` and ``se`` (condition, lag, face, vertex, coord), ``sigma2`` (residual variance),
    ``mean`` (mean shape over the valid samples), ``rho`` (with ``ar1``) (face, vertex, coord),
    ``t`` and ``effect`` (t_contrast, lag, face, vertex, coord), ``F`` (f_contrast, face, vertex, coord), ``dof``
    (face,) (the t and F denominator degrees of freedom; F's numerator has ``lag`` of them), the contrast
    weights. Nothing is computed until asked.
    """
    v = _require(ds, "v", ("time", "face", "vertex", "coord"), "glm")
    rate = _even_rate(ds)
    times = np.asarray(ds["time"].values, dtype=np.float64)
    table = read_events(events)
    source = str(events.url if isinstance(events, Location) else "DataFrame" if isinstance(events, pd.DataFrame) else events)
    conditions_fir, pairs = _design.conditions_of(table, modulators, source)
    conditions = tuple(conditions_fir) + tuple(f"{c}:{m}" for c, m in pairs)
    _, lags = _design.fir_lags(window, rate)
    if drift_order < -1:
        raise ParameterError(f"drift_order={drift_order}", where="glm(drift_order=...)", fix="use -1 (none), 0 (intercept) or more")
    t_contrasts = dict(t_contrasts) if t_contrasts is not None else {c: {c: 1.0} for c in conditions}
    f_contrasts = dict(f_contrasts) if f_contrasts is not None else {c: {c: 1.0} for c in conditions}
    t_weights = np.array([_weights(n, s, conditions) for n, s in t_contrasts.items()]).reshape(len(t_contrasts), len(conditions))
    f_weights = np.array([_weights(n, s, conditions) for n, s in f_contrasts.items()]).reshape(len(f_contrasts), len(conditions))
    n_time, n_face, n_vertex, n_coord = v.shape
    motion_names = tuple(motion or ()) if "motion" in ds.data_vars else ()
    if motion_names:
        known = [str(p) for p in ds["motion"].coords.get("motion_param", pd.Index([])).values]
        missing = sorted(set(motion_names) - set(known))
        if missing:
            raise ParameterError(f"motion parameters {missing} are not in the dataset's motion ({known})",
                                 where="glm(motion=...)", fix=f"choose among {known}, or None")  # fmt: skip
    prepared = []
    for face in range(n_face):
        valid = _dask(ds["detected"])[:, face] if "detected" in ds.data_vars else da.isfinite(_dask(v)[:, face]).all(axis=(1, 2))
        face_motion = _dask(ds["motion"].sel(motion_param=list(motion_names)))[:, face] if motion_names else None
        prepared.append(
            dask.delayed(_prepare_face, pure=True)(
                table, times, valid, face_motion, window=window, modulators=tuple(modulators), drift_order=drift_order,
                motion_names=motion_names, ar1=ar1, t_weights=t_weights, f_weights=f_weights,
                where=f"{source}, face {face}",
            )  # fmt: skip
        )
    if vertex_chunk is None:  # the store's own vertex blocks when they fit: each task then reads its chunks only
        budget = max(1, _BLOCK_BYTES // (n_time * n_coord * 8))
        stored = v.chunksizes["vertex"] if v.chunks else (n_vertex,)
        vertex_chunk = stored[0] if len(stored) > 1 and stored[0] <= 4 * budget else budget
    data = _dask(v, chunks={0: -1, 1: 1, 2: int(vertex_chunk)})
    rows = _ols.output_rows((len(conditions) * lags.size, lags.size, len(t_contrasts), len(f_contrasts)))
    n_rows = rows["F"].stop
    packed = data.map_blocks(_fit_block, prepared=prepared, rows=n_rows, chunks=((n_rows,),) + data.chunks[1:], dtype=np.float64)
    spatial = ("face", "vertex", "coord")

    def part(name: str, leading: tuple[str, ...], shape: tuple[int, ...]) -> tuple:
        array = packed[rows[name]].reshape(shape + packed.shape[1:]).astype(np.float32)
        return (leading + spatial, array)

    n_c, n_l = len(conditions), lags.size
    variables = {
        "beta": part("beta", ("condition", "lag"), (n_c, n_l)),
        "se": part("se", ("condition", "lag"), (n_c, n_l)),
        "sigma2": part("sigma2", (), ()),
        "mean": part("mean", (), ()),
        "t": part("t", ("t_contrast", "lag"), (len(t_contrasts), n_l)),
        "effect": part("effect", ("t_contrast", "lag"), (len(t_contrasts), n_l)),
        "F": part("F", ("f_contrast",), (len(f_contrasts),)),
        "dof": (("face",), da.stack([da.from_delayed(dask.delayed(_dof)(p), (), dtype=np.int64) for p in prepared])),
        "t_weights": (("t_contrast", "condition"), t_weights),
        "f_weights": (("f_contrast", "condition"), f_weights),
    }
    if ar1:
        variables["rho"] = part("rho", (), ())
    for name in ("tris", "template"):
        if name in ds.variables:
            variables[name] = (ds[name].dims, ds[name].data, ds[name].attrs)
    out = xr.Dataset(
        variables,
        coords={
            "condition": list(conditions), "lag": ("lag", lags, {"units": "s", "anchor": "onset"}),
            "t_contrast": list(t_contrasts), "f_contrast": list(f_contrasts),
            **{name: ds.coords[name] for name in ("face", "coord") if name in ds.coords},
        },
        attrs={key: value for key, value in ds.attrs.items() if key == "gmfx_history"},
    )  # fmt: skip
    descriptions = {
        "beta": "response of each condition at each lag (units of v)", "se": "standard error of beta",
        "sigma2": "residual variance", "mean": "mean shape over the valid samples", "t": "t statistic of each t contrast at each lag",
        "effect": "contrast of betas at each lag (units of v)", "F": "F statistic of each F contrast over all lags",
        "dof": "residual degrees of freedom (t and F denominator)", "rho": "AR(1) coefficient of the OLS residuals",
    }  # fmt: skip
    for name, text in descriptions.items():
        if name in out:
            out[name].attrs["description"] = text
    out["F"].attrs["dof_numerator"] = int(n_l)
    parameters = {
        "events": source, "window": list(window), "modulators": list(modulators), "drift_order": drift_order,
        "motion": list(motion_names), "ar1": ar1, "rate": rate, "lags": int(n_l),
        "t_contrasts": {n: dict(zip(conditions, w.tolist())) for n, w in zip(t_contrasts, t_weights)},
        "f_contrasts": {n: dict(zip(conditions, w.tolist())) for n, w in zip(f_contrasts, f_weights)},
        "events_table": json.loads(table.to_json(orient="records")), "versions": versions(),
    }  # fmt: skip
    out = _with_history(out, "glm", parameters)
    out.attrs["gmfx_design"] = json.dumps({k: v for k, v in parameters.items() if k != "events_table"})
    return out


def _dof(prepared: _ols.Prepared) -> np.int64:
    return np.int64(prepared.ar1_dof if prepared.ar1 else prepared.dof)


# -- group ----------------------------------------------------------------------------------------
def _linear_maps(shapes: list[np.ndarray], reference: str, template: np.ndarray | None, scale: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """The reference shape and, per participant, the 3x3 map of its local space onto it."""
    weights = np.ones(shapes[0].shape[0])

    def onto(target: np.ndarray) -> list[np.ndarray]:
        return [fit_transforms(shape[None], target, weights, scale=scale)[0] for shape in shapes]

    if reference == "template":
        target = template
    else:
        target = shapes[0]
        if reference == "mean":
            moved = [(m[:3, :3] @ s.T).T + m[:3, 3] for m, s in zip(onto(target), shapes)]
            target = np.mean(moved, axis=0)
    maps = onto(target)
    if not all(np.isfinite(m).all() for m in maps):
        bad = next(i for i, m in enumerate(maps) if not np.isfinite(m).all())
        raise ParameterError(f"fit {bad} has no finite mean shape to align", where=f"group(fits[{bad}])",
                             fix="leave out a fit whose face was never detected")  # fmt: skip
    return target, [m[:3, :3] for m in maps]


def group(
    fits: Sequence[xr.Dataset],
    *,
    reference: Literal["template", "first", "mean"] = "mean",
    scale: bool = False,
    face: int = 0,
) -> xr.Dataset:
    """Combine participants' fits of one face: fixed effects and a one-sample random-effects test.

    Each fit's mean shape is aligned (rotation, with ``scale`` a uniform scale) onto the reference:
    ``"template"`` (the model's canonical mesh), ``"first"`` (the first fit's mean shape) or ``"mean"``
    (the mean of all mean shapes after aligning them to the first). Betas are displacements, so they
    are rotated (and scaled) the same way; their standard errors are mapped assuming independent
    coordinates (``se'^2 = L^2 se^2``). The group reads the small ``mean`` of every fit to align them;
    the rest stays lazy.

    Returns
    -------
    Dataset with ``beta`` (random-effects mean of the aligned betas), ``se`` (its standard error),
    ``random_t`` (one-sample t, ``random_dof = n - 1``), ``fixed_beta``, ``fixed_se``, ``fixed_t``
    (inverse-variance weighted, ``fixed_dof`` = sum of the fits' dof), ``mean`` (the reference shape),
    ``subject_beta`` (fit, condition, lag, face, vertex, coord), all with a ``face`` axis of length 1.
    """
    if len(fits) < 2:
        raise ParameterError(f"a group needs at least 2 fits, got {len(fits)}", where="group(fits=...)", fix="pass the fits of several participants")
    first = fits[0]
    for index, fit in enumerate(fits):
        for name in ("beta", "se", "mean"):
            if name not in fit:
                raise ParameterError(f"fit {index} has no {name!r}", where=f"group(fits[{index}])", fix="pass results of gmfx.glm or _glm.zarr stores")
        if list(fit["condition"].values) != list(first["condition"].values) or not np.allclose(fit["lag"].values, first["lag"].values):
            raise ParameterError(
                f"fit {index} has conditions {list(fit['condition'].values)} and {fit.sizes['lag']} lags, fit 0 has "
                f"{list(first['condition'].values)} and {first.sizes['lag']}",
                where=f"group(fits[{index}])", fix="fit every participant with the same events' conditions and window",
            )  # fmt: skip
        if fit.sizes["vertex"] != first.sizes["vertex"]:
            raise ParameterError(f"fit {index} has {fit.sizes['vertex']} vertices, fit 0 {first.sizes['vertex']}",
                                 where=f"group(fits[{index}])", fix="fit participants reconstructed with the same model")  # fmt: skip
    if reference not in ("template", "first", "mean"):
        raise ParameterError(f"unknown reference {reference!r}", where="group(reference=...)", fix="use template, first or mean")
    if reference == "template" and "template" not in first:
        raise ParameterError("the fits carry no template", where="group(reference='template')", fix="use reference='mean'")
    shapes = [np.asarray(fit["mean"].isel(face=face).values, dtype=np.float64) for fit in fits]
    template = np.asarray(first["template"].values, dtype=np.float64) if "template" in first else None
    target, maps = _linear_maps(shapes, reference, template, scale)

    def aligned(name: str, square: bool = False) -> da.Array:
        pieces = []
        for fit, linear in zip(fits, maps):
            data = fit[name].isel(face=[face]).data
            data = data if isinstance(data, da.Array) else da.from_array(data)
            matrix = linear**2 if square else linear
            pieces.append(da.einsum("...c,dc->...d", data.astype(np.float64) ** (2 if square else 1), matrix))
        return da.stack(pieces)

    beta, variance = aligned("beta"), aligned("se", square=True)
    n = len(fits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = beta.mean(axis=0)
        sd = beta.std(axis=0, ddof=1)
        weight = 1.0 / variance
        fixed = (weight * beta).sum(axis=0) / weight.sum(axis=0)
        fixed_se = 1.0 / da.sqrt(weight.sum(axis=0))
    dims = ("condition", "lag", "face", "vertex", "coord")
    dofs = [fit["dof"].isel(face=face) for fit in fits if "dof" in fit]
    out = xr.Dataset(
        {
            "beta": (dims, mean.astype(np.float32), {"description": "random-effects mean of the aligned betas"}),
            "se": (dims, (sd / np.sqrt(n)).astype(np.float32), {"description": "standard error of the mean across fits"}),
            "random_t": (dims, (mean / (sd / np.sqrt(n))).astype(np.float32), {"description": "one-sample t across fits", "dof": n - 1}),
            "fixed_beta": (dims, fixed.astype(np.float32), {"description": "inverse-variance weighted mean"}),
            "fixed_se": (dims, fixed_se.astype(np.float32)),
            "fixed_t": (dims, (fixed / fixed_se).astype(np.float32), {"description": "fixed-effects t (fixed_beta / fixed_se)"}),
            "subject_beta": (("fit",) + dims, beta.astype(np.float32), {"description": "each fit's betas on the reference shape"}),
            "mean": (("face", "vertex", "coord"), target[None].astype(np.float32), {"description": f"reference shape ({reference})"}),
            "random_dof": ((), n - 1),
            "fixed_dof": ((), int(sum(int(d.values) for d in dofs)) if len(dofs) == n else -1),
            "maps": (("fit", "row", "col"), np.array(maps), {"description": "3x3 map of each fit's local space onto the reference"}),
        },
        coords={"condition": first["condition"].values, "lag": first["lag"], "face": [0], "fit": np.arange(n),
                **({"coord": first["coord"].values} if "coord" in first.coords else {})},  # fmt: skip
    )
    for name in ("tris", "template"):
        if name in first:
            out[name] = first[name]
    out.attrs["gmfx_history"] = [json.dumps({"operation": "group", "parameters": {"reference": reference, "scale": scale, "face": face, "fits": n,
                                                                                "sources": [fit.attrs.get("gmfx_source", "") for fit in fits]},
                                             "gmfx_version": __version__})]  # fmt: skip
    return out


# -- generate -------------------------------------------------------------------------------------
def generate(
    model: xr.Dataset,
    condition: str | None = None,
    *,
    shape: Literal["mean", "template"] | np.ndarray = "mean",
    gain: float = 1.0,
    component: int | None = None,
    frames: int = 60,
    colour: Literal["displacement", "F"] = "displacement",
) -> xr.Dataset:
    """The face movement a condition (or a component) predicts, as a renderable mesh sequence.

    Parameters
    ----------
    model
        A :func:`glm` or :func:`group` result (``beta``, ``mean``), or a :func:`components` result.
    condition
        The condition whose response to play (one frame per lag, ``time`` = lag in seconds).
    shape
        The face the movement is added to: ``"mean"`` (the participant's mean shape, or the group's
        reference), ``"template"`` (the model's canonical mesh) or a ``(vertex, 3)`` array.
    gain
        Multiplies the movement (``>1`` exaggerates subtle expressions for display).
    component
        With a components model: which component to play, a sine of +/- 2 standard deviations over ``frames``.
    colour
        Per-vertex colour variable ``effect``: the displacement's length (units of ``v``) or the
        condition's F statistic (max over coordinates, same at every frame; fits only).

    Returns
    -------
    Dataset with ``v`` (time, face, vertex, coord), ``effect`` (time, face, vertex), ``tris``; the layout of
    a recon store, so ``gmfx render`` draws it.
    """
    if component is not None:
        if "component" not in model:
            raise ParameterError("component= needs a components model", where="generate(component=...)", fix="pass the result of gmfx.components")
        if not 0 <= component < model.sizes["component_index"]:
            raise ParameterError(f"component {component} is not in 0..{model.sizes['component_index'] - 1}",
                                 where="generate(component=...)", fix="choose an existing component")  # fmt: skip
        phase = np.sin(2 * np.pi * np.arange(frames) / frames)
        basis = model["component"].isel(component_index=component).data
        movement = da.asarray(phase[:, None, None, None] * 2 * float(model["sd"].values[component])) * basis[None]
        times = np.arange(frames) / 30.0
        label = f"component {component}"
    else:
        if "beta" not in model:
            raise ParameterError("the model has no betas", where="generate(model=...)", fix="pass a gmfx.glm or gmfx.group result")
        names = [str(c) for c in model["condition"].values]
        if condition not in names:
            raise ParameterError(f"unknown condition {condition!r}", where="generate(condition=...)", fix=f"use one of {', '.join(names)}")
        movement = model["beta"].sel(condition=condition).data
        movement = movement if isinstance(movement, da.Array) else da.from_array(movement)
        times = np.asarray(model["lag"].values, dtype=np.float64)
        label = f"condition {condition}"
    n_face, n_vertex = model.sizes["face"], model.sizes["vertex"]
    if isinstance(shape, str):
        if shape not in ("mean", "template") or shape not in model:
            raise ParameterError(f"shape={shape!r} is not available", where="generate(shape=...)",
                                 fix="use 'mean', 'template' (when the model has one) or a (vertex, 3) array")  # fmt: skip
        base = da.asarray(model[shape].data)
    else:
        base = da.asarray(np.asarray(shape, dtype=np.float32))
    if base.ndim == 2:  # one shape (the template, or an array) for every face
        base = da.broadcast_to(base[None], (n_face, n_vertex, 3))
    v = (base[None].astype(np.float32) + gain * movement.astype(np.float32)).astype(np.float32)
    if colour == "F":
        if "F" not in model or condition not in list(model["f_contrast"].values):
            raise ParameterError(f"the model has no F contrast named {condition!r}", where="generate(colour='F')", fix="use colour='displacement'")
        effect = da.broadcast_to(model["F"].sel(f_contrast=condition).data.max(axis=-1)[None], v.shape[:3])
        description = "F statistic of the condition (max over coordinates)"
    elif colour == "displacement":
        effect = da.sqrt((movement.astype(np.float32) ** 2).sum(axis=-1)) * abs(gain)
        description = "length of the displacement from the shape (units of v)"
    else:
        raise ParameterError(f"unknown colour {colour!r}", where="generate(colour=...)", fix="use 'displacement' or 'F'")
    out = xr.Dataset(
        {
            "v": (("time", "face", "vertex", "coord"), v.rechunk({0: -1}), {"space": "local", "description": f"movement of {label} added to the {shape if isinstance(shape, str) else 'given'} shape"}),
            "effect": (("time", "face", "vertex"), effect.astype(np.float32).rechunk({0: -1}), {"description": description, "colour": True}),
        },
        coords={"time": ("time", times, {"units": "s"}), "face": np.arange(n_face),
                **({"coord": model["coord"].values} if "coord" in model.coords else {})},  # fmt: skip
        attrs={"gmfx_colour": "effect"},
    )
    for name in ("tris", "template"):
        if name in model:
            out[name] = model[name]
    out.attrs["gmfx_history"] = list(model.attrs.get("gmfx_history", []))
    return _with_history(out, "generate", {"condition": condition, "component": component, "shape": shape if isinstance(shape, str) else "array",
                                          "gain": gain, "colour": colour})  # fmt: skip


# -- components -----------------------------------------------------------------------------------
def components(
    datasets: xr.Dataset | Sequence[xr.Dataset],
    *,
    n_components: int = 10,
    face: int = 0,
    reference: Literal["first", "mean"] = "first",
    power_iterations: int = 4,
    seed: int = 0,
) -> xr.Dataset:
    """A low-dimensional basis of facial movement across recordings (randomised PCA, lazy).

    Each recording's movement is its vertices minus its mean shape (frames without a face count as
    no movement), mapped by the rotation that aligns its mean shape onto the reference (the first
    recording's mean shape, or the mean of all). The components are the top right singular vectors of
    the stacked movements (``dask.array.linalg.svd_compressed`` with ``power_iterations``: exact to
    ~1e-6 when the spectrum has a gap, memory bounded by time chunks).

    Returns
    -------
    Dataset with ``component`` (component_index, face=1, vertex, coord) unit vectors, ``sd``
    (component_index) standard deviation of the scores, ``explained_variance_ratio``, ``scores`` (sample,
    component_index) with ``recording`` and ``time`` coordinates, ``mean`` (the reference shape), ``tris``.
    """
    datasets = [datasets] if isinstance(datasets, xr.Dataset) else list(datasets)
    if not datasets:
        raise ParameterError("no dataset given", where="components(datasets=...)", fix="pass at least one preprocessed dataset")
    n_vertex = datasets[0].sizes["vertex"]
    moves, means = [], []
    for index, ds in enumerate(datasets):
        v = _require(ds, "v", ("time", "face", "vertex", "coord"), "components")
        if v.shape[2] != n_vertex:
            raise ParameterError(f"dataset {index} has {v.shape[2]} vertices, dataset 0 {n_vertex}", where=f"components(datasets[{index}])",
                                 fix="use recordings reconstructed with the same model")  # fmt: skip
        data = _dask(v)[:, face].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = da.nanmean(data, axis=0)
        moves.append(da.nan_to_num(data - mean[None]))
        means.append(mean)
    weights = np.ones(n_vertex)

    def rotation(shape: np.ndarray, target: np.ndarray) -> np.ndarray:
        return fit_transforms(np.asarray(shape)[None], np.asarray(target), weights)[0, :3, :3]

    target = means[0]
    if reference == "mean" and len(means) > 1:
        moved = [da.einsum("vc,dc->vd", m, da.from_delayed(dask.delayed(rotation)(m, target), (3, 3), dtype=np.float64)) for m in means]
        target = da.stack(moved).mean(axis=0)
    pieces = []
    for move, mean in zip(moves, means):
        linear = da.from_delayed(dask.delayed(rotation)(mean, target), (3, 3), dtype=np.float64)
        pieces.append(da.einsum("tvc,dc->tvd", move, linear).reshape(move.shape[0], -1))
    stacked = da.concatenate(pieces, axis=0)
    rows = max(1, int(_BLOCK_BYTES // (stacked.shape[1] * 8)))
    stacked = stacked.rechunk((rows, -1))
    k = int(min(n_components, *stacked.shape))
    u, s, vt = da.linalg.svd_compressed(stacked, k=k, n_power_iter=power_iterations, seed=seed, compute=False)
    n_samples = stacked.shape[0]
    total = (stacked**2).sum()
    sd = s / np.sqrt(max(n_samples - 1, 1))
    recording = np.concatenate([np.full(ds.sizes["time"], i) for i, ds in enumerate(datasets)])
    sample_times = np.concatenate([np.asarray(ds["time"].values) for ds in datasets])
    out = xr.Dataset(
        {
            "component": (("component_index", "face", "vertex", "coord"), vt.reshape(k, 1, n_vertex, 3).astype(np.float32), {"description": "unit movement vectors"}),
            "sd": (("component_index",), sd, {"description": "standard deviation of the scores (units of v)"}),
            "explained_variance_ratio": (("component_index",), s**2 / total),
            "scores": (("sample", "component_index"), (u * s[None]).astype(np.float32)),
            "mean": (("face", "vertex", "coord"), target[None].astype(np.float32), {"description": f"reference shape ({reference})"}),
        },
        coords={"component_index": np.arange(k), "face": [0], "recording": ("sample", recording), "time": ("sample", sample_times),
                **({"coord": datasets[0]["coord"].values} if "coord" in datasets[0].coords else {})},  # fmt: skip
    )
    for name in ("tris", "template"):
        if name in datasets[0].variables:
            out[name] = datasets[0][name]
    out.attrs["gmfx_history"] = [json.dumps({"operation": "components", "parameters": {"n_components": k, "face": face, "reference": reference,
                                             "power_iterations": power_iterations, "seed": seed, "recordings": len(datasets)},
                                             "gmfx_version": __version__})]  # fmt: skip
    return out
