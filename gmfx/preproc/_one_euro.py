"""The One Euro filter (Casiez, Roussel & Vogel, CHI 2012): an online, speed-adaptive low-pass.

A first-order low-pass whose cut-off rises with the signal's (smoothed) speed: still signals are smoothed
hard (``min_cutoff``), fast ones lag little (``beta``). Causal and one sample at a time, so it suits QC
displays and real-time use; it follows the real sample times (no even grid needed).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover
    numba = None

__all__ = ["one_euro"]


def _run(times: np.ndarray, x: np.ndarray, min_cutoff: float, beta: float, d_cutoff: float) -> np.ndarray:  # pragma: no cover - jitted
    """``x`` ``(time, column)`` float64 -> the filtered series; a NaN sample restarts its column's filter."""
    n, m = x.shape
    out = np.empty_like(x)
    last_value = np.zeros(m)
    last_speed = np.zeros(m)
    last_time = np.zeros(m)
    started = np.zeros(m, dtype=np.bool_)
    for i in range(n):
        t = times[i]
        for j in range(m):
            value = x[i, j]
            if np.isnan(value):
                out[i, j] = np.nan
                started[j] = False
                continue
            if not started[j]:
                out[i, j] = value
                last_value[j], last_speed[j], last_time[j], started[j] = value, 0.0, t, True
                continue
            step = t - last_time[j]
            rate = 2.0 * np.pi * d_cutoff * step
            speed_mix = rate / (1.0 + rate)
            speed = speed_mix * (value - last_value[j]) / step + (1.0 - speed_mix) * last_speed[j]
            rate = 2.0 * np.pi * (min_cutoff + beta * abs(speed)) * step
            mix = rate / (1.0 + rate)
            smoothed = mix * value + (1.0 - mix) * last_value[j]
            out[i, j] = smoothed
            last_value[j], last_speed[j], last_time[j] = smoothed, speed, t
    return out


if numba is not None:
    try:
        _run = numba.njit(cache=True, nogil=True)(_run)
    except RuntimeError:  # pragma: no cover - no writable cache location
        _run = numba.njit(nogil=True)(_run)


def one_euro(
    values: np.ndarray, times: np.ndarray, *, min_cutoff: float, beta: float, d_cutoff: float, dtype=np.float64
) -> np.ndarray:
    """One Euro filter of ``values`` ``(time, ...)`` along time, every column on its own (see the module docstring).

    ``min_cutoff`` and ``d_cutoff`` are in Hz, ``beta`` in 1 / (units of the values); NaN samples stay NaN
    and the filter restarts after them.
    """
    values = np.asarray(values)
    flat = np.ascontiguousarray(values.reshape(values.shape[0], -1), dtype=np.float64)
    out = _run(np.asarray(times, dtype=np.float64), flat, float(min_cutoff), float(beta), float(d_cutoff))
    return out.reshape(values.shape).astype(dtype, copy=False)
