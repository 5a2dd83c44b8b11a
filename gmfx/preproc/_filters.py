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


#: gain of the effective (all passes) response at a cut-off, by convention
CUTOFF_LEVELS = {"-3dB": 2**-0.5, "-6dB": 0.5}


def design_butterworth(
    sampling_freq: float,
    *,
    highpass: float | None,
    lowpass: float | None,
    order: int,
    passes: int = 2,
    cutoff_level: str = "-3dB",
) -> tuple[np.ndarray, dict]:
    """Second-order sections of a Butterworth high-pass and/or low-pass whose *effective* response (the
    sections run ``passes`` times: 2 for zero-phase) has the gain of ``cutoff_level`` at each cut-off.

    Zero-phase filtering squares the magnitude response: a Butterworth designed at 4 Hz has gain 0.50
    at 4 Hz after two passes (its -3 dB point is 3.70 Hz). Each side is therefore designed at the
    frequency where one pass has gain ``level ** (1 / passes)`` (exact for Butterworth filters: in the
    bilinear transform's warped frequency ``tan(pi f / fs)`` their squared gain is ``1 / (1 + r ** 2n)``).
    A band-pass is a high-pass followed by a low-pass (their sections in that order,
    ``design["highpass_sections"]`` of them high-pass), so that each side can start its own way.

    Raises
    ------
    ParameterError
        No cut-off, a cut-off not in ``(0, Nyquist)``, a high-pass above the low-pass, or a bad order or level.
    """
    nyquist = sampling_freq / 2
    where = f"filter(highpass={highpass}, lowpass={lowpass}, order={order}) at {sampling_freq:g} Hz"
    if highpass is None and lowpass is None:
        raise ParameterError("both cut-offs are None: nothing to filter", where=where, fix="give highpass, lowpass or both")
    if int(order) != order or order < 1:
        raise ParameterError(f"the filter order {order} is not a positive integer", where=where, fix="use e.g. order=5")
    if cutoff_level not in CUTOFF_LEVELS:
        raise ParameterError(f"unknown cutoff_level {cutoff_level!r}", where=where, fix=f"use one of {tuple(CUTOFF_LEVELS)}")
    for name, cutoff in (("highpass", highpass), ("lowpass", lowpass)):
        if cutoff is not None and not 0 < cutoff < nyquist:
            raise ParameterError(
                f"the {name} cut-off {cutoff:g} Hz is not between 0 and the Nyquist frequency {nyquist:g} Hz "
                f"(half the sampling rate {sampling_freq:g} Hz)",
                where=where,
                fix=f"choose a {name} below {nyquist:g} Hz, or switch it off (None; on the command line --{name} 0)",
            )
    if highpass is not None and lowpass is not None and highpass >= lowpass:
        raise ParameterError(
            f"the highpass {highpass:g} Hz is not below the lowpass {lowpass:g} Hz",
            where=where,
            fix="swap them, or switch one side off with None",
        )
    # one pass must have squared gain level ** (2 / passes) = 1 / (1 + r ** 2n) at the cut-off
    ratio = (CUTOFF_LEVELS[cutoff_level] ** (-2 / passes) - 1) ** (1 / (2 * int(order)))
    warped = np.tan(np.pi * np.array([highpass or 0.0, lowpass or 0.0]) / sampling_freq)
    designed = np.arctan(warped * [ratio, 1 / ratio]) * sampling_freq / np.pi
    sections, design_cutoffs = [], {}
    if highpass is not None:
        design_cutoffs["highpass"] = float(designed[0])
        sections.append(signal.butter(int(order), designed[0], btype="highpass", fs=sampling_freq, output="sos"))
    if lowpass is not None:
        design_cutoffs["lowpass"] = float(min(designed[1], 0.999 * nyquist))
        sections.append(signal.butter(int(order), design_cutoffs["lowpass"], btype="lowpass", fs=sampling_freq, output="sos"))
    sos = np.vstack(sections)
    kind = "bandpass" if len(sections) == 2 else "highpass" if highpass is not None else "lowpass"
    n_highpass = len(sections[0]) if highpass is not None else 0
    design = {
        "type": "butterworth",
        "kind": kind,
        "order": int(order),
        "cutoffs_hz": [c for c in (highpass, lowpass) if c is not None],
        "cutoff_level": cutoff_level,
        "passes": int(passes),
        "design_cutoffs_hz": design_cutoffs,
        "sampling_freq": sampling_freq,
        "highpass_sections": n_highpass,
        "sos": sos.tolist(),
        "effective_response": f"the sections of 'sos' run {passes} time(s): gain |H(f)| ** {passes}, "
        + ("zero phase" if passes == 2 else "causal"),
        "mean": "kept: each valid stretch's temporal mean is removed before filtering and added back after",
        "edges": _edge_handling(sos[n_highpass:], highpass, passes),
    }
    return sos, design


def _edge_handling(lowpass: np.ndarray, highpass: float | None, passes: int) -> str:
    """How :func:`filter_series` starts each pass (for the design record)."""
    start = "from the steady state of the first sample" + (f" after odd padding of {padding_samples(lowpass)} samples" if passes == 2 else "")
    parts = ["high-pass: from a zero state on the mean-removed stretch, no padding"] if highpass is not None else []
    return "; ".join(parts + ([f"low-pass: {start}"] if len(lowpass) else []))


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
    _filtfilt_padded(sos, ext, edge)
    return ext[edge : edge + n]


def _filtfilt_padded(sos: np.ndarray, ext: np.ndarray, edge: int) -> None:
    """Odd-pad the series in ``ext[edge:-edge]`` into its ``edge`` rows each side, then filter ``ext`` forward
    and backward in place, each pass from the steady state of its first sample (``sosfiltfilt``'s start)."""
    n = ext.shape[0] - 2 * edge
    if edge:
        ext[:edge] = 2 * ext[edge] - ext[2 * edge : edge : -1]
        ext[edge + n :] = 2 * ext[edge + n - 1] - ext[edge + n - 2 : n - 2 : -1]
    steady = signal.sosfilt_zi(sos)[:, :, None]
    _sos_run(sos, ext, steady * ext[0][None, None], False)
    _sos_run(sos, ext, steady * ext[-1][None, None], True)


def valid_stretches(valid: np.ndarray) -> list[slice]:
    """Maximal runs of ``True`` in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], valid.astype(np.int8), [0]]))
    return [slice(a, b) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)]


def _zero_state_pass(sos: np.ndarray, x: np.ndarray, *, reverse: bool) -> None:
    """Filter ``x`` ``(time, column)`` float64 in place by ``sos`` from a zero state (forward or backward)."""
    _sos_run(np.ascontiguousarray(sos, dtype=np.float64), x, np.zeros((len(sos), 2, x.shape[1])), reverse)


def _filter_stretch(piece: np.ndarray, sos: np.ndarray, highpass_sections: int, causal: bool) -> np.ndarray:
    """One valid stretch ``(time, column)``: its mean removed, the high-pass, the low-pass, the mean restored.

    The high-pass starts from a zero state on the mean-removed stretch (both ways when zero-phase): any
    other start (a padded edge, the first sample's steady state) is a step that its slow poles (0.005 Hz:
    a ~30 s time constant) turn into a drift over the whole of a short recording. The low-pass starts
    like ``scipy.signal.sosfiltfilt`` (odd padding, steady state), which keeps its fast edges clean.
    With a high-pass, the filtered stretch is re-centred: the mean shape is kept exactly.
    """
    mean = piece.mean(axis=0, dtype=np.float64)
    highpass, lowpass = sos[:highpass_sections], sos[highpass_sections:]
    if numba is None:  # SciPy, one column at a time
        work = np.asarray(piece, dtype=np.float64) - mean
        if len(highpass):
            work = signal.sosfilt(highpass, work, axis=0)
            if not causal:
                work = signal.sosfilt(highpass, work[::-1], axis=0)[::-1]
        if len(lowpass):
            zi = signal.sosfilt_zi(lowpass)[:, :, None] * work[0][None, None, :]
            work = signal.sosfilt(lowpass, work, axis=0, zi=zi)[0] if causal else signal.sosfiltfilt(lowpass, work, axis=0)
    else:  # one float64 buffer (with the low-pass's padding around it), filtered in place by the numba kernel
        edge = padding_samples(lowpass) if len(lowpass) and not causal else 0
        ext = np.empty((piece.shape[0] + 2 * edge, piece.shape[1]), dtype=np.float64)
        work = ext[edge : edge + piece.shape[0]]
        np.subtract(piece, mean, out=work)
        if len(highpass):
            _zero_state_pass(highpass, work, reverse=False)
            if not causal:
                _zero_state_pass(highpass, work, reverse=True)
        if len(lowpass) and causal:
            _sos_run(np.ascontiguousarray(lowpass), work, signal.sosfilt_zi(lowpass)[:, :, None] * work[0][None, None], False)
        elif len(lowpass):
            _filtfilt_padded(np.ascontiguousarray(lowpass), ext, edge)
    if len(highpass):
        work -= work.mean(axis=0)
    work += mean
    return work


def filter_series(
    values: np.ndarray,
    sos: np.ndarray,
    *,
    highpass_sections: int,
    causal: bool = False,
    times: np.ndarray | None = None,
    on_short: str = "error",
    where: str = "",
    dtype=np.float64,
) -> np.ndarray:
    """Filter ``values`` ``(time, group, column)`` along time, each valid stretch on its own (in float64;
    the result has ``dtype``).

    ``sos`` holds ``highpass_sections`` high-pass sections, then low-pass ones (see
    :func:`design_butterworth`). Each stretch keeps its temporal mean (see :func:`_filter_stretch`);
    zero-phase (forward and backward) by default, forward only when ``causal``. A stretch shorter than
    the padding of ``scipy.signal.sosfiltfilt`` for ``sos`` raises a :class:`ParameterError`
    (``on_short="error"``) or is set to NaN (``on_short="nan"``).
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    out = np.full(values.shape, np.nan, dtype=dtype)  # each stretch is filtered in float64 (a copy of the stretch only)
    need = 1 if causal else padding_samples(sos) + 1
    finite = np.isfinite(values)
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
                out[stretch, group, column] = _filter_stretch(piece, sos, highpass_sections, causal)
    return out
