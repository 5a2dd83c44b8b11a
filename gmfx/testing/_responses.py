"""Synthetic preprocessed recordings with a known facial response to each condition of an experiment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["SyntheticResponses", "synthetic_responses"]

_MOTION = ("tx", "ty", "tz", "rx", "ry", "rz", "sx", "sy", "sz", "shear_xy", "shear_xz", "shear_yz")


@dataclass(frozen=True)
class SyntheticResponses:
    """A preprocessed recording and its ground truth.

    Attributes
    ----------
    dataset
        Lazy preproc-shaped Dataset: ``v`` (time, face=1, vertex, coord) on an even grid, ``detected``,
        ``motion`` (time, face, motion_param), ``template``, ``tris``.
    events
        ``onset`` (on grid samples), ``duration``, ``trial_type``, ``intensity`` (a modulator).
    response
        ``(condition, lag, vertex, coord)`` the true response of each condition, lag ``k`` at
        ``onset + k / fps``; ``modulation`` likewise per unit of centred ``intensity``.
    v
        ``(time, 1, vertex, coord)`` the data as a NumPy array (NaN in the gaps).
    """

    dataset: xr.Dataset
    events: pd.DataFrame
    conditions: tuple[str, ...]
    lags: np.ndarray
    response: np.ndarray
    modulation: np.ndarray
    v: np.ndarray


def synthetic_responses(
    n_frames: int = 3000,
    *,
    n_vertices: int = 30,
    fps: float = 30.0,
    conditions: Sequence[str] = ("frown", "smile"),
    n_lags: int = 31,
    events_per_second: float = 0.6,
    amplitude: float = 1e-3,
    modulation: float = 0.0,
    noise: float = 1e-4,
    drift: float = 2e-3,
    motion_leak: float = 5e-4,
    gaps: Sequence[tuple[int, int]] = (),
    time_chunk: int = 512,
    vertex_chunk: int | None = None,
    seed: int = 0,
) -> SyntheticResponses:
    """A recording whose face responds to events with a known FIR response (overlapping events add up).

    The data are ``template + sum of responses + cubic drift + motion @ leak + noise``; frames inside
    ``gaps`` (``(first, stop)`` sample ranges) are NaN with ``detected=False`` and unknown motion.
    Events start every ~``1 / events_per_second`` s (exponential gaps), so with a 1 s response many overlap.
    """
    rng = np.random.default_rng(seed)
    times = np.arange(n_frames) / fps
    template = np.column_stack([rng.uniform(-0.07, 0.07, n_vertices), rng.uniform(-0.1, 0.1, n_vertices), rng.uniform(0, 0.05, n_vertices)])
    from scipy.spatial import Delaunay

    tris = Delaunay(template[:, :2]).simplices.astype(np.int32)
    lag_times = np.arange(n_lags) / fps
    shape = (lag_times / 0.3) ** 2 * np.exp(-lag_times / 0.15)
    shape /= shape.max()
    patterns = rng.normal(size=(len(conditions), n_vertices, 3))
    response = amplitude * shape[None, :, None, None] * patterns[:, None]
    modulation_patterns = rng.normal(size=(len(conditions), n_vertices, 3))
    modulated = modulation * shape[None, :, None, None] * modulation_patterns[:, None]
    onsets, position = [], 1.0
    while True:
        position += rng.exponential(1.0 / events_per_second) + 0.1
        if position > times[-1] - lag_times[-1] - 0.5:
            break
        onsets.append(position)
    starts = np.rint(np.array(onsets) * fps).astype(int)
    types = rng.integers(0, len(conditions), starts.size)
    intensity = rng.uniform(0, 1, starts.size)
    centred = intensity.copy()
    for c in range(len(conditions)):
        centred[types == c] -= intensity[types == c].mean()
    v = np.repeat(template[None], n_frames, axis=0)
    for start, c, amount in zip(starts, types, centred):
        v[start : start + n_lags] += response[c] + amount * modulated[c]
    x = 2 * times / times[-1] - 1
    coefficients = rng.normal(size=(4, n_vertices, 3)) * drift
    v += np.einsum("tk,kvc->tvc", np.column_stack([x**k for k in range(4)]), coefficients)
    motion = np.zeros((n_frames, len(_MOTION)))
    motion[:, 6:9] = 1.0
    smooth = np.cumsum(rng.normal(size=(n_frames, 6)), axis=0)
    motion[:, :6] = (smooth - smooth.mean(0)) / smooth.std(0)
    motion[:, 3] += 179.0  # an x rotation near 180 degrees, as MediaPipe's pose gives
    leak = rng.normal(size=(6, n_vertices, 3)) * motion_leak
    v += np.einsum("tk,kvc->tvc", motion[:, :6] - motion[:, :6].mean(0), leak)
    v += rng.normal(size=v.shape) * noise
    detected = np.ones(n_frames, bool)
    for first, stop in gaps:
        detected[first:stop] = False
    v[~detected] = np.nan
    motion[~detected] = np.nan
    v = v[:, None].astype(np.float32)
    vertex_chunk = vertex_chunk or n_vertices
    dataset = xr.Dataset(
        {
            "v": (("time", "face", "vertex", "coord"), da.from_array(v, chunks=(time_chunk, 1, vertex_chunk, 3)), {"space": "local", "units": "m"}),
            "detected": (("time", "face"), da.from_array(detected[:, None], chunks=(time_chunk, 1))),
            "motion": (("time", "face", "motion_param"), da.from_array(motion[:, None].astype(np.float32), chunks=(time_chunk, 1, -1))),
            "template": (("vertex", "coord"), template.astype(np.float32)),
            "tris": (("triangle", "corner"), tris),
        },
        coords={"time": ("time", times, {"units": "s"}), "face": [0], "coord": ["x", "y", "z"], "motion_param": list(_MOTION)},
        attrs={"model": "synthetic"},
    )
    events = pd.DataFrame({"onset": starts / fps, "duration": 0.5, "trial_type": np.asarray(conditions)[types], "intensity": intensity})
    return SyntheticResponses(dataset=dataset, events=events, conditions=tuple(conditions), lags=lag_times, response=response,
                              modulation=modulated, v=v)  # fmt: skip
