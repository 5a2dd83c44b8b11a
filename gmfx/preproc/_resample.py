"""Resampling of time series with NaN gaps onto new times (pure NumPy/SciPy kernels).

Arrays are ``(time, group, column)``: every column of a group shares its valid samples (e.g. all
vertex coordinates of one face), which lets one bracket search serve a whole face. A column whose
NaNs differ from its group's is resampled on its own.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator
from scipy.spatial.transform import Rotation

__all__ = ["METHODS", "even_grid", "brackets", "resample", "resample_affines", "halo_samples"]

METHODS = ("linear", "pchip", "cubic")

#: extra source samples each side of an output chunk so that a chunked result equals the full one
#: (linear: the bracketing samples; pchip: its 3-point slopes; cubic: a spline's influence decays
#: by ~0.27 per knot, so 48 knots leave < 1e-27)
_HALO = {"linear": 1, "pchip": 4, "cubic": 48}


def halo_samples(method: str) -> int:
    """Source samples to read beyond an output chunk's time range (besides ``2 * max_gap``)."""
    return _HALO[method]


def even_grid(times: np.ndarray, sampling_freq: float | None = None) -> tuple[np.ndarray, float]:
    """An even grid from the first to the last finite time, at ``sampling_freq`` (default 1/median step)."""
    finite = np.asarray(times, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if sampling_freq is None:
        sampling_freq = 1.0 / float(np.median(np.diff(finite)))
    count = int(np.floor((finite[-1] - finite[0]) * sampling_freq + 1e-9)) + 1
    # rounding can put the last grid time a few ulps past the last frame (3.9600000000000035 for 100
    # frames at 25 fps), which made its sample NaN: clip it onto the last frame
    grid = np.minimum(finite[0] + np.arange(count) / sampling_freq, finite[-1])
    return grid, float(sampling_freq)


def brackets(
    source_times: np.ndarray, valid: np.ndarray, new_times: np.ndarray, max_gap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valid source samples around each new time.

    Returns
    -------
    left, right
        Indices into ``source_times`` of the valid samples at or before / at or after each new time.
    weight
        Position between them in ``[0, 1]``.
    ok
        The new time lies within the valid samples and its bracket spans at most ``max_gap`` seconds.
    """
    index = np.flatnonzero(valid)
    new_times = np.asarray(new_times, dtype=np.float64)
    if index.size == 0:
        zeros = np.zeros(new_times.shape, dtype=np.intp)
        return zeros, zeros, np.zeros(new_times.shape), np.zeros(new_times.shape, dtype=bool)
    times = source_times[index]
    right = np.clip(np.searchsorted(times, new_times, side="left"), 0, index.size - 1)
    left = np.clip(np.searchsorted(times, new_times, side="right") - 1, 0, index.size - 1)
    span = times[right] - times[left]
    weight = np.divide(new_times - times[left], span, out=np.zeros(new_times.shape), where=span > 0)
    ok = (new_times >= times[0]) & (new_times <= times[-1]) & (span <= max_gap)
    return index[left], index[right], weight, ok


def _segments(times: np.ndarray, max_gap: float) -> list[slice]:
    """Runs of valid samples whose steps are at most ``max_gap``."""
    cuts = np.flatnonzero(np.diff(times) > max_gap) + 1
    bounds = np.concatenate([[0], cuts, [times.size]])
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _resample_columns(
    source_times: np.ndarray, values: np.ndarray, valid: np.ndarray, new_times: np.ndarray, method: str, max_gap: float
) -> np.ndarray:
    """Resample ``values`` ``(time, column)`` whose valid rows are ``valid``."""
    left, right, weight, ok = brackets(source_times, valid, new_times, max_gap)
    out = np.full((new_times.size, values.shape[1]), np.nan, dtype=values.dtype)
    if method == "linear" or not ok.any():
        if ok.any():
            # only the rows that get a value, in the values' precision (no float64 copy of a float32 block)
            mix = weight[ok].astype(values.dtype)[:, None]
            low = values[left[ok]]
            low *= 1 - mix
            high = values[right[ok]]
            high *= mix
            low += high
            out[ok] = low
        return out
    times, kept = source_times[valid], values[valid].astype(np.float64)
    spline = PchipInterpolator if method == "pchip" else CubicSpline
    for segment in _segments(times, max_gap):
        inside = ok & (new_times >= times[segment][0]) & (new_times <= times[segment][-1])
        if not inside.any():
            continue
        if segment.stop - segment.start < 2:
            out[inside] = kept[segment][0]
            continue
        out[inside] = spline(times[segment], kept[segment], axis=0)(new_times[inside])
    return out


def resample(
    source_times: np.ndarray, values: np.ndarray, new_times: np.ndarray, *, method: str = "linear", max_gap: float
) -> np.ndarray:
    """Resample ``values`` ``(time, group, column)`` from ``source_times`` onto ``new_times`` (float32 values
    give float32, anything else float64; splines are fitted in float64).

    New times outside the valid samples, or inside a NaN stretch spanning more than ``max_gap``
    seconds between valid samples, are NaN; the spline methods are fitted per stretch.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    source_times = np.asarray(source_times, dtype=np.float64)
    new_times = np.asarray(new_times, dtype=np.float64)
    out = np.empty((new_times.size,) + values.shape[1:], dtype=values.dtype)  # every group is assigned whole
    finite = np.isfinite(values)
    for group in range(values.shape[1]):
        valid = finite[:, group].all(axis=1)
        out[:, group] = _resample_columns(source_times, values[:, group], valid, new_times, method, max_gap)
        # a column differs from its group's valid rows only where the group is not valid
        partial = np.flatnonzero(finite[~valid, group].any(axis=0))
        for column in partial:
            single = values[:, group, column : column + 1]
            out[:, group, column] = _resample_columns(
                source_times, single, finite[:, group, column], new_times, method, max_gap
            )[:, 0]
    return out


def resample_affines(
    source_times: np.ndarray, matrices: np.ndarray, new_times: np.ndarray, *, max_gap: float
) -> np.ndarray:
    """Resample ``(time, group, 4, 4)`` (or ``(time, group, 16)``) affines: rotation by slerp, the rest (translation, stretch) linearly.

    Each linear part is split by polar decomposition ``A = R @ P`` (``R`` a rotation, ``P`` symmetric);
    ``R`` follows the shortest arc, ``P`` and the translation are interpolated element-wise.
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    matrices = matrices.reshape(matrices.shape[:2] + (4, 4))
    out = np.full((len(new_times),) + matrices.shape[1:], np.nan)
    for group in range(matrices.shape[1]):
        series = matrices[:, group]
        valid = np.isfinite(series).all(axis=(1, 2))
        left, right, weight, ok = brackets(source_times, valid, new_times, max_gap)
        if not ok.any():
            continue
        left, right, weight = left[ok], right[ok], weight[ok]
        rotation, stretch = _polar(np.where(valid[:, None, None], series[:, :3, :3], np.eye(3)))
        start = Rotation.from_matrix(rotation[left])
        step = (start.inv() * Rotation.from_matrix(rotation[right])).as_rotvec()
        turned = (start * Rotation.from_rotvec(step * weight[:, None])).as_matrix()
        mix = (1 - weight)[:, None, None]
        linear = turned @ (stretch[left] * mix + stretch[right] * (1 - mix))
        translation = series[left, :3, 3] * mix[:, :, 0] + series[right, :3, 3] * (1 - mix[:, :, 0])
        block = np.zeros((ok.sum(), 4, 4))
        block[:, :3, :3] = linear
        block[:, :3, 3] = translation
        block[:, 3, 3] = 1.0
        out[ok, group] = block
    return out


def _polar(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A = R @ P`` with ``R`` a proper rotation and ``P`` symmetric, batched."""
    u, s, vt = np.linalg.svd(linear)
    sign = np.sign(np.linalg.det(u @ vt))
    sign[sign == 0] = 1.0
    u[..., :, 2] *= sign[..., None]
    s[..., 2] *= sign
    rotation = u @ vt
    stretch = np.einsum("...ji,...j,...jk->...ik", vt, s, vt)
    return rotation, stretch
