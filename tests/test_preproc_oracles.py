"""Single-sided and causal filters, and spline interpolation, against designs and interpolators built
here with SciPy (never gmfx's own design). Hypothesis draws the data, the frame times and the gaps."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import signal
from scipy.interpolate import CubicSpline, PchipInterpolator
from scipy.optimize import brentq

from gmfx.preproc import filter, interpolate  # noqa: A004

N_VERTEX = 3


def _dataset(values: np.ndarray, times: np.ndarray, chunk: int) -> xr.Dataset:
    """A recon-shaped dataset of ``values`` (time, face, vertex, coord) float64, chunked along time."""
    return xr.Dataset(
        {"v": (("time", "face", "vertex", "coord"), da.from_array(values, chunks=(chunk, -1, -1, -1)))},
        coords={"time": ("time", times, {"units": "s"})},
    )


@st.composite
def recordings(draw, *, even: bool, min_frames: int, max_frames: int):
    """(values, times, chunk): data and whole-frame gaps (per face) drawn by Hypothesis."""
    n = draw(st.integers(min_frames, max_frames))
    n_face = draw(st.integers(1, 2))
    values = draw(hnp.arrays(np.float64, (n, n_face, N_VERTEX, 3), elements=st.floats(-50, 50, allow_nan=False)))
    # a slow trend, so that high-pass and low-pass give very different results
    values = values + np.linspace(0, draw(st.floats(-200, 200)), n)[:, None, None, None]
    for face in range(n_face):
        for _ in range(draw(st.integers(0, 3))):
            start = draw(st.integers(0, n - 1))
            values[start : start + draw(st.integers(1, 12)), face] = np.nan
    if even:
        rate = draw(st.sampled_from([25.0, 30.0, 60.0]))
        times = 3.0 + np.arange(n) / rate
    else:
        steps = draw(hnp.arrays(np.float64, n - 1, elements=st.floats(0.02, 0.06)))
        times = 1.5 + np.concatenate([[0.0], np.cumsum(steps)])
    return values, times, draw(st.sampled_from([1, 5, 16, n]))


def _stretches(valid: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], valid.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _design(side: str, cutoff: float, order: int, rate: float, passes: int) -> np.ndarray:
    """The Butterworth whose response, run ``passes`` times, is -3 dB at ``cutoff`` (found by root-finding)."""

    def excess(design: float) -> float:
        sos = signal.butter(order, design, btype=side, fs=rate, output="sos")
        return abs(signal.sosfreqz(sos, worN=[cutoff], fs=rate)[1][0]) ** passes - 2**-0.5

    design = brentq(excess, cutoff / 3, min(3 * cutoff, 0.49999 * rate), xtol=1e-12)
    return signal.butter(order, design, btype=side, fs=rate, output="sos")


def _filter_oracle(values, sos, side, causal):
    """Each face's valid stretch on its own, its mean removed and restored: a high-pass from a zero state
    (forward, and backward unless causal) then re-centred; a low-pass as sosfiltfilt (or sosfilt from the
    steady state of the first sample). Stretches too short for sosfiltfilt's padding are NaN."""
    padlen = 3 * (2 * len(sos) + 1 - min((sos[:, 2] == 0).sum(), (sos[:, 5] == 0).sum()))
    out = np.full(values.shape, np.nan)
    for face in range(values.shape[1]):
        for a, b in _stretches(np.isfinite(values[:, face]).all(axis=(1, 2))):
            if not causal and b - a <= padlen:
                continue
            piece = values[a:b, face]
            mean = piece.mean(axis=0)
            x = piece - mean
            if side == "highpass":
                x = signal.sosfilt(sos, x, axis=0)
                if not causal:
                    x = signal.sosfilt(sos, x[::-1], axis=0)[::-1]
                x = x - x.mean(axis=0)
            elif causal:
                x = signal.sosfilt(sos, x, axis=0, zi=signal.sosfilt_zi(sos)[:, :, None, None] * x[0])[0]
            else:
                x = signal.sosfiltfilt(sos, x, axis=0)
            out[a:b, face] = x + mean
    return out


@settings(max_examples=25, deadline=None)
@given(
    data=recordings(even=True, min_frames=40, max_frames=160),
    side=st.sampled_from(["highpass", "lowpass"]),
    order=st.integers(1, 4),
    causal=st.booleans(),
    cutoff_fraction=st.floats(0.02, 0.4),
)
def test_single_sided_and_causal_filters_equal_scipy_designs(data, side, order, causal, cutoff_fraction):
    values, times, chunk = data
    rate = 1 / (times[1] - times[0])
    cutoff = round(cutoff_fraction * rate, 3)
    sos = _design(side, cutoff, order, rate, passes=1 if causal else 2)  # the design, built here
    cutoffs = {"highpass": cutoff, "lowpass": None} if side == "highpass" else {"highpass": None, "lowpass": cutoff}
    out = filter(_dataset(values, times, chunk), order=order, causal=causal, on_short="nan", **cutoffs)
    np.testing.assert_allclose(out.v.values, _filter_oracle(values, sos, side, causal), rtol=1e-7, atol=1e-6)


def _spline_oracle(times, values, grid, method, max_gap):
    """Per face: a SciPy spline through each run of valid frames whose steps are at most ``max_gap``."""
    spline = CubicSpline if method == "cubic" else PchipInterpolator
    out = np.full((grid.size,) + values.shape[1:], np.nan)
    for face in range(values.shape[1]):
        valid = np.isfinite(values[:, face]).all(axis=(1, 2))
        t, x = times[valid], values[valid, face]
        if not t.size:
            continue  # a face never seen stays NaN
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(t) > max_gap) + 1, [t.size]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            inside = (grid >= t[a]) & (grid <= t[b - 1])
            if b - a == 1:
                out[inside, face] = x[a]
            elif inside.any():
                out[inside, face] = spline(t[a:b], x[a:b], axis=0)(grid[inside])
    return out


@settings(max_examples=25, deadline=None)
@given(
    data=recordings(even=False, min_frames=8, max_frames=90),
    method=st.sampled_from(["cubic", "pchip"]),
    max_gap=st.sampled_from([0.07, 0.2, 5.0]),
)
def test_cubic_and_pchip_interpolation_equal_scipy_interpolators(data, method, max_gap):
    values, times, chunk = data
    out = interpolate(_dataset(values, times, chunk), method=method, max_gap=max_gap)
    grid = out.time.values
    np.testing.assert_allclose(grid, times[0] + np.arange(grid.size) * np.median(np.diff(times)), rtol=0, atol=1e-9)
    assert grid[-1] <= times[-1] + 1e-9 and times[-1] - grid[-1] < np.median(np.diff(times))
    np.testing.assert_allclose(out.v.values, _spline_oracle(times, values, grid, method, max_gap), rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("side", ["highpass", "lowpass"])
def test_a_single_sided_filter_keeps_its_band_and_removes_the_other(side):
    """Plain physics, no design at all: a 0.2 Hz and an 8 Hz sine at 60 Hz through a 2 Hz cut-off."""
    times = np.arange(1800) / 60.0
    slow, fast = np.sin(2 * np.pi * 0.2 * times), np.sin(2 * np.pi * 8.0 * times)
    values = np.broadcast_to((slow + fast)[:, None, None, None], (1800, 1, 1, 3)).copy()
    cutoffs = {"highpass": 2.0, "lowpass": None} if side == "highpass" else {"highpass": None, "lowpass": 2.0}
    out = filter(_dataset(values, times, 256), order=4, **cutoffs).v.values[300:-300, 0, 0, 0]
    kept = fast if side == "highpass" else slow
    np.testing.assert_allclose(out, kept[300:-300], atol=0.02)
