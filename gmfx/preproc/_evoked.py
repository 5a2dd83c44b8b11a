"""Averages of epochs back into faces, and epochs handed to MNE-Python."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from gmfx._errors import ParameterError

__all__ = ["AGGREGATES", "evoked", "to_mne"]

AGGREGATES = ("mean", "median")


def _require_epochs(epochs: xr.Dataset, operation: str) -> xr.DataArray:
    if "v" not in epochs.variables or epochs["v"].dims[:2] != ("epoch", "lag"):
        found = epochs["v"].dims if "v" in epochs.variables else "missing"
        raise ParameterError(
            f"{operation} needs epochs: a variable 'v' with dims (epoch, lag, ...) (found: {found})",
            where=f"dataset with variables {sorted(map(str, epochs.data_vars))}",
            fix="pass the result of gmfx.epoch or a dataset opened from an _epochs.zarr store",
        )
    return epochs["v"]


def _aggregate_block(block: np.ndarray, *, agg: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a lag that no epoch covers gives NaN, as it should
        reduce = np.nanmean if agg == "mean" else np.nanmedian
        return reduce(block.astype(np.float64), axis=0).astype(np.float32)


def evoked(epochs: xr.Dataset, *, by: str | None = "trial_type", agg: Literal["mean", "median"] = "mean") -> xr.Dataset:
    """Average the epochs of each condition back into a face: ``v`` ``(condition, lag, face, vertex, coord)``.

    Parameters
    ----------
    epochs
        The result of :func:`gmfx.epoch` (or an opened epochs store).
    by
        The events column whose values are the conditions (``None``: all epochs in one condition
        ``"all"``). Epochs without a value (``n/a``) are left out, with a warning.
    agg
        ``"mean"`` or ``"median"`` over the epochs of a condition, ignoring NaN (an epoch outside the
        recording or over a gap does not turn the average NaN).

    The result is lazy and keeps the static variables (``tris``, ``template``, ...): rendered or saved
    like any mesh. It also holds ``n_epochs`` (condition) and ``n_valid`` (condition, lag, face): how
    many epochs each average is made of. Averages of epochs cut with ``baseline="mean"`` are deviations
    from the baseline, not faces.
    """
    from gmfx.preproc._api import _with_history

    v = _require_epochs(epochs, "evoked")
    if agg not in AGGREGATES:
        raise ParameterError(f"unknown aggregate {agg!r}", where="evoked(agg=...)", fix=f"use one of {AGGREGATES}")
    if by is None:
        labels = pd.Series(["all"] * epochs.sizes["epoch"])
    elif by in epochs.coords and epochs[by].dims == ("epoch",):
        labels = pd.Series(epochs[by].values)
    else:
        columns = [str(c) for c in epochs.coords if epochs[c].dims == ("epoch",) and c != "epoch"]
        raise ParameterError(
            f"the epochs have no events column {by!r} (columns: {', '.join(columns) or 'none'})",
            where="evoked(by=...)",
            fix="choose one of the events columns, or by=None for one average of all epochs",
        )
    missing = labels.isna().to_numpy()
    if missing.any():
        warnings.warn(f"{int(missing.sum())} epochs have no {by!r} and are left out of the averages", UserWarning, stacklevel=2)
    conditions = sorted(pd.unique(labels[~missing]), key=str)
    if not conditions:
        raise ParameterError(f"no epoch has a value of {by!r}", where="evoked(by=...)", fix="choose another column")
    data = v.data if isinstance(v.data, da.Array) else da.from_array(v.values)
    averages, valid, counts = [], [], []
    for condition in conditions:
        chosen = data[np.flatnonzero(labels.to_numpy() == condition)].rechunk({0: -1})
        averages.append(chosen.map_blocks(_aggregate_block, agg=agg, drop_axis=0, dtype=np.float32))
        valid.append(da.isfinite(chosen).all(axis=tuple(range(3, chosen.ndim))).sum(axis=0).astype(np.int32))
        counts.append(int(chosen.shape[0]))
    static = epochs.drop_vars([n for n in epochs.variables if "epoch" in epochs[n].dims])
    out = static.assign_coords(condition=("condition", np.asarray(conditions, dtype=object), {"events_column": str(by)}))
    out = out.assign(
        v=(("condition",) + v.dims[1:], da.stack(averages), {**v.attrs, "aggregate": agg}),
        n_epochs=(("condition",), np.asarray(counts, dtype=np.int32)),
        n_valid=(("condition",) + v.dims[1:3], da.stack(valid), {"description": "epochs without NaN in each average"}),
    )
    return _with_history(out, "evoked", {"by": by, "agg": agg, "conditions": [str(c) for c in conditions]})


def to_mne(
    epochs: xr.Dataset,
    *,
    picks: Sequence[int] | np.ndarray | None = None,
    face: int = 0,
    event_column: str = "trial_type",
):
    """The epochs of one face as an ``mne.EpochsArray`` (needs ``pip install gmfx[mne]``).

    Channels are the picked vertices' coordinates (``v<vertex>_<coord>``, type ``misc``, in the data's
    units); events are the epochs' onsets (samples at the lag rate) with ids from ``event_column``
    (sorted values -> 1, 2, ...); every events column becomes ``metadata``. Computes the picked data.
    """
    try:
        import mne
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise ImportError("gmfx.to_mne needs MNE-Python: pip install 'gmfx[mne]'") from error
    v = _require_epochs(epochs, "to_mne")
    lags = np.asarray(epochs["lag"].values, dtype=np.float64)
    if epochs["lag"].attrs.get("units", "s") != "s":
        raise ParameterError(
            f"the lags are in {epochs['lag'].attrs.get('units')!r}, MNE needs seconds",
            where="to_mne(epochs): coordinate 'lag'",
            fix="cut the epochs with anchor='onset' or 'offset' (warped epochs have no time axis in seconds)",
        )
    steps = np.diff(lags)
    if lags.size < 2 or np.abs(steps - steps.mean()).max() > 1e-6 * steps.mean():
        raise ParameterError("the lags are not evenly spaced", where="to_mne(epochs)", fix="cut epochs with sampling_freq")
    if not 0 <= face < epochs.sizes["face"]:
        raise ParameterError(f"face={face} is not one of the {epochs.sizes['face']} faces", where="to_mne(face=...)", fix="pick 0")
    vertices = np.arange(epochs.sizes["vertex"]) if picks is None else np.asarray(picks, dtype=np.intp)
    if vertices.size == 0 or vertices.min() < 0 or vertices.max() >= epochs.sizes["vertex"]:
        raise ParameterError(
            f"picks must be vertex indices in 0..{epochs.sizes['vertex'] - 1}",
            where="to_mne(picks=...)",
            fix="give the indices of the vertices to export",
        )
    sfreq = 1.0 / float(steps.mean())
    coords = [str(c) for c in (epochs["coord"].values if "coord" in epochs.coords else ["x", "y", "z"])]
    values = v.isel(face=face, vertex=vertices).transpose("epoch", "vertex", "coord", "lag").values
    data = values.reshape(values.shape[0], -1, values.shape[-1]).astype(np.float64)
    names = [f"v{vertex}_{coord}" for vertex in vertices for coord in coords]
    info = mne.create_info(names, sfreq, ch_types="misc")
    metadata = pd.DataFrame({str(c): epochs[c].values for c in epochs.coords if epochs[c].dims == ("epoch",) and c != "epoch"})
    if event_column in metadata:
        labels = metadata[event_column].astype(str)
        event_id = {label: code for code, label in enumerate(sorted(labels.unique()), start=1)}
        codes = labels.map(event_id).to_numpy()
    else:
        event_id, codes = {"event": 1}, np.ones(len(metadata), dtype=int)
    events = np.column_stack([np.round(metadata["onset"].to_numpy() * sfreq).astype(int), np.zeros(len(codes), dtype=int), codes])
    return mne.EpochsArray(data, info, events=events, tmin=float(lags[0]), event_id=event_id, metadata=metadata, verbose=False)
