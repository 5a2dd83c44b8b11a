"""Butterworth filtering of time series with NaN gaps (pure NumPy/SciPy kernels)."""

from __future__ import annotations

import numpy as np
from scipy import signal

from gmfx._errors import ParameterError

try:  # numba comes with face-alignment (a gmfx dependency); without it the filter falls back to SciPy
    import numba
except ImportError:  # pragma: no cover
    numba = None

__all__ = ["design_butterworth", "padding_samples", "filter_series", "valid_stretches"]


def design_butterworth(
    sampling_freq: float, *, highpass: float | None, lowpass: float | None, order: int
) -> tuple[np.ndarray, dict]:
    """Second-order sections of a Butterworth high-, low- or band-pass, and a description of the design.

    Raises
    ------
    ParameterError
        No cut-off, a cut-off not in ``(0, Nyquist)``, a high-pass above the low-pass, or a bad order.
    """
    nyquist = sampling_freq / 2
    where = f"filter(highpass={highpass}, lowpass={lowpass}, order={order}) at {sampling_freq:g} Hz"
    if highpass is None and lowpass is None:
        raise ParameterError("both cut-offs are None: nothing to filter", where=where, fix="give highpass, lowpass or both")
    if int(order) != order or order < 1:
        raise ParameterError(f"the filter order {order} is not a positive integer", where=where, fix="use e.g. order=5")
    for name, cutoff in (("highpass", highpass), ("lowpass", lowpass)):
        if cutoff is not None and not 0 < cutoff < nyquist:
            raise ParameterError(
                f"the {name} cut-off {cutoff:g} Hz is not between 0 and the Nyquist frequency {nyquist:g} Hz "
                f"(half the sampling rate {sampling_freq:g} Hz)",
                where=where,
                fix=f"choose a {name} below {nyquist:g} Hz, or switch it off (None; on the command line --{name} 0)",
            )
    if highpass is not None and lowpass is not None:
        if highpass >= lowpass:
            raise ParameterError(
                f"the highpass {highpass:g} Hz is not below the lowpass {lowpass:g} Hz",
                where=where,
                fix="swap them, or switch one side off with None",
            )
        kind, cutoffs = "bandpass", [highpass, lowpass]
    elif highpass is not None:
        kind, cutoffs = "highpass", highpass
    else:
        kind, cutoffs = "lowpass", lowpass
    sos = signal.butter(int(order), cutoffs, btype=kind, fs=sampling_freq, output="sos")
    design = {
        "type": "butterworth",
        "kind": kind,
        "order": int(order),
        "cutoffs_hz": cutoffs,
        "sampling_freq": sampling_freq,
        "sos": sos.tolist(),
    }
    return sos, design


def padding_samples(sos: np.ndarray) -> int:
    """Samples ``scipy.signal.sosfiltfilt`` pads each end with (its default ``padlen``)."""
    zeros = min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return 3 * (2 * len(sos) + 1 - zeros)


def _sos_run(sos: np.ndarray, x: np.ndarray, state: np.ndarray, reverse: bool) -> None:  # pragma: no cover - jitted
    """``x`` ``(time, column)`` float64 filtered in place along time by the sections ``sos`` (transposed
    direct form II, the recurrence of ``scipy.signal.sosfilt``), from and into ``state`` ``(section, 2, column)``.

    Time runs in the outer loop and columns in the inner one, so one pass handles every column of a
    time-major block at SIMD speed (``scipy.signal.sosfilt`` loops over one column at a time).
    """
    n, m = x.shape
    for step in range(n):
        t = n - 1 - step if reverse else step
        for s in range(sos.shape[0]):
            b0, b1, b2, a1, a2 = sos[s, 0], sos[s, 1], sos[s, 2], sos[s, 4], sos[s, 5]
            for j in range(m):
                current = x[t, j]
                new = b0 * current + state[s, 0, j]
                state[s, 0, j] = b1 * current - a1 * new + state[s, 1, j]
                state[s, 1, j] = b2 * current - a2 * new
                x[t, j] = new


if numba is not None:
    try:  # cached next to this file, or in the user's cache folder
        _sos_run = numba.njit(cache=True, nogil=True, error_model="numpy")(_sos_run)
    except RuntimeError:  # pragma: no cover - no writable cache location: compile once per process
        _sos_run = numba.njit(nogil=True, error_model="numpy")(_sos_run)


def sosfilt(sos: np.ndarray, x: np.ndarray, *, zi: np.ndarray) -> np.ndarray:
    """``scipy.signal.sosfilt(sos, x, axis=0, zi=zi)[0]`` for ``x`` ``(time, column)``, ``zi`` ``(section, 2, column)``."""
    if numba is None:
        return signal.sosfilt(sos, np.asarray(x, dtype=np.float64), axis=0, zi=zi)[0]
    out = np.array(x, dtype=np.float64, order="C")
    _sos_run(np.ascontiguousarray(sos, dtype=np.float64), out, np.array(zi, dtype=np.float64, order="C"), False)
    return out


def sosfiltfilt(sos: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``scipy.signal.sosfiltfilt(sos, x, axis=0)`` (odd padding of its default length) for ``x`` ``(time, column)``.

    Same recurrence and padding as SciPy, in one float64 buffer filtered forward then backward in place.
    """
    if numba is None:
        return signal.sosfiltfilt(sos, np.asarray(x, dtype=np.float64), axis=0)
    sos = np.ascontiguousarray(sos, dtype=np.float64)
    edge = padding_samples(sos)
    n = x.shape[0]
    if n <= edge:
        raise ValueError(f"The length of the input vector x must be greater than padlen, which is {edge}.")
    ext = np.empty((n + 2 * edge,) + x.shape[1:], dtype=np.float64)
    ext[edge : edge + n] = x
    if edge:
        ext[:edge] = 2 * ext[edge] - ext[2 * edge : edge : -1]
        ext[edge + n :] = 2 * ext[edge + n - 1] - ext[edge + n - 2 : n - 2 : -1]
    steady = signal.sosfilt_zi(sos)[:, :, None]
    _sos_run(sos, ext, steady * ext[0][None, None], False)
    _sos_run(sos, ext, steady * ext[-1][None, None], True)
    return ext[edge : edge + n]


def valid_stretches(valid: np.ndarray) -> list[slice]:
    """Maximal runs of ``True`` in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    return [slice(a, b) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)]


def filter_series(
    values: np.ndarray,
    sos: np.ndarray,
    *,
    causal: bool = False,
    times: np.ndarray | None = None,
    on_short: str = "error",
    where: str = "",
    dtype=np.float64,
) -> np.ndarray:
    """Filter ``values`` ``(time, group, column)`` along time, each valid stretch on its own (in float64;
    the result has ``dtype``).

    Zero-phase ``sosfiltfilt`` by default; ``causal`` uses ``sosfilt`` started from the steady state of
    the stretch's first sample. A stretch too short for ``sosfiltfilt``'s padding raises a
    :class:`ParameterError` (``on_short="error"``) or is set to NaN (``on_short="nan"``).
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    out = np.full(values.shape, np.nan, dtype=dtype)  # each stretch is filtered in float64 (a copy of the stretch only)
    need = 1 if causal else padding_samples(sos) + 1
    finite = np.isfinite(values)
    steady = signal.sosfilt_zi(sos)
    for group in range(values.shape[1]):
        valid = finite[:, group].all(axis=1)
        columns = [(slice(None), valid)]
        columns += [(slice(c, c + 1), finite[:, group, c]) for c in np.flatnonzero((finite[:, group] != valid[:, None]).any(0))]
        for column, mask in columns:
            for stretch in valid_stretches(mask):
                piece = values[stretch, group, column]
                if piece.shape[0] < need:
                    if on_short == "nan":
                        continue
                    span = "" if times is None else f" (t = {times[stretch.start]:.3f} .. {times[stretch.stop - 1]:.3f} s)"
                    raise ParameterError(
                        f"a valid stretch of {piece.shape[0]} samples is too short for this filter, which needs at "
                        f"least {need} (its padding is {need - 1} samples)",
                        where=f"{where} group {group}, samples {stretch.start}..{stretch.stop - 1}{span}",
                        fix="bridge short gaps with a larger max_gap in interpolate, lower the order, or pass "
                        "on_short='nan' to leave such stretches NaN",
                    )
                if causal:
                    filtered = sosfilt(sos, piece, zi=steady[:, :, None] * piece[0][None, None, :])
                else:
                    filtered = sosfiltfilt(sos, piece)
                out[stretch, group, column] = filtered
    return out
