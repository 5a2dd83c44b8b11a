"""The bundled example's preproc and epochs values, recomputed here with plain NumPy/SciPy from its recon store.

The oracle follows gmfx's documented semantics, never its code: rigid alignment onto the store's template by a
weighted SVD fit (Umeyama, weights ``rigid_weight``/``rigid``), linear interpolation onto the even grid (gaps
longer than 0.5 s stay NaN), a Butterworth band-pass (0.005-4 Hz, order 5) whose two-pass response is -3 dB at
both cut-offs (the design frequencies found here by root-finding), each valid stretch with its mean removed
and restored, the high-pass from a zero state forward then backward and re-centred, then ``sosfiltfilt`` for
the low-pass; epochs by linear interpolation at ``onset + lag`` (lags -0.5..2 s at the data's rate).
"""

import numpy as np
import pandas as pd
import pytest
from scipy import signal
from scipy.optimize import brentq

from gmfx import Location, find_recordings
from gmfx._example import write_example_dataset
from gmfx.pipeline import run_pipeline
from gmfx.storage import open_dataset, store_location

MAX_GAP = 0.5


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, dask_client):
    study = write_example_dataset(tmp_path_factory.mktemp("example") / "study")
    out = Location(str(tmp_path_factory.mktemp("values") / "out"))
    (recording,) = find_recordings(study)
    run_pipeline([recording], out, client=dask_client, progress=False, recon_options={"device": "cpu"})
    stores = {s: open_dataset(store_location(out, recording, s), stage=s).load() for s in ("recon", "preproc", "epoch")}
    return stores, recording


def _rigid_fit(points: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``points`` (vertex, 3) moved onto ``target`` by the weighted least-squares rotation + translation."""
    w = weights / weights.sum()
    used = weights > 0
    x, y, w = points[used].astype(np.float64), target[used], w[used]
    mx, my = w @ x, w @ y
    u, _, vt = np.linalg.svd(((y - my) * w[:, None]).T @ (x - mx))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    return points.astype(np.float64) @ rotation.T + (my - rotation @ mx)


def _linear(times: np.ndarray, values: np.ndarray, new: np.ndarray) -> np.ndarray:
    """np.interp of each column of ``values`` (time, ...) through its valid rows; NaN outside or across long gaps."""
    flat = values.reshape(len(times), -1)
    valid = np.isfinite(flat).all(axis=1)
    out = np.full((len(new), flat.shape[1]), np.nan)
    if valid.any():
        t = times[valid]
        for c in range(flat.shape[1]):
            out[:, c] = np.interp(new, t, flat[valid, c])
        after = np.clip(np.searchsorted(t, new, side="left"), 0, t.size - 1)
        before = np.clip(np.searchsorted(t, new, side="right") - 1, 0, t.size - 1)
        out[(new < t[0]) | (new > t[-1]) | (t[after] - t[before] > MAX_GAP)] = np.nan
    return out.reshape((len(new),) + values.shape[1:])


def _design(side: str, cutoff: float, rate: float) -> np.ndarray:
    def excess(design: float) -> float:
        sos = signal.butter(5, design, btype=side, fs=rate, output="sos")
        return abs(signal.sosfreqz(sos, worN=[cutoff], fs=rate)[1][0]) ** 2 - 2**-0.5

    design = brentq(excess, cutoff / 3, min(3 * cutoff, 0.49999 * rate), xtol=1e-12)
    return signal.butter(5, design, btype=side, fs=rate, output="sos")


def _bandpass(values: np.ndarray, rate: float) -> np.ndarray:
    high, low = _design("highpass", 0.005, rate), _design("lowpass", 4.0, rate)
    out = np.full(values.shape, np.nan)
    for face in range(values.shape[1]):
        valid = np.isfinite(values[:, face]).all(axis=(1, 2)).astype(int)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], valid, [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            piece = values[a:b, face].astype(np.float64)
            mean = piece.mean(axis=0)
            x = signal.sosfilt(high, piece - mean, axis=0)
            x = signal.sosfilt(high, x[::-1], axis=0)[::-1]
            x = signal.sosfiltfilt(low, x - x.mean(axis=0), axis=0)
            out[a:b, face] = x - x.mean(axis=0) + mean
    return out


def _oracle_preproc(recon) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    v = recon.v.values
    template = recon.template.values.astype(np.float64)
    weights = np.asarray((recon["rigid_weight"] if "rigid_weight" in recon else recon["rigid"]).values, dtype=np.float64)
    local = np.full(v.shape, np.nan)
    for t in range(v.shape[0]):
        for face in range(v.shape[1]):
            if np.isfinite(v[t, face][weights > 0]).all():
                local[t, face] = _rigid_fit(v[t, face], template, weights)
    local = local.astype(np.float32)  # the aligned store keeps the recon's precision
    times = recon.time.values.astype(np.float64)
    rate = 1.0 / np.median(np.diff(times))
    grid = np.minimum(times[0] + np.arange(int(np.floor((times[-1] - times[0]) * rate + 1e-9)) + 1) / rate, times[-1])
    even = _linear(times, local, grid).astype(np.float32)
    return grid, even, _bandpass(even, rate), rate


def test_example_preproc_and_epochs_equal_a_numpy_scipy_recomputation(example_run):
    stores, recording = example_run
    recon, preproc, epochs = stores["recon"], stores["preproc"], stores["epoch"]
    grid, unfiltered, filtered, rate = _oracle_preproc(recon)
    np.testing.assert_allclose(preproc.time.values, grid, rtol=0, atol=1e-9)
    scale = np.nanmax(np.abs(filtered))
    assert np.isfinite(filtered).mean() > 0.9  # a real comparison, not NaN against NaN
    np.testing.assert_allclose(preproc.v.values, filtered, rtol=0, atol=2e-5 * scale)
    # the filter moves the vertices by far more than the tolerance: the comparison tells filtered from not
    assert np.nanmax(np.abs(filtered - unfiltered)) > 50 * 2e-5 * scale

    events = pd.read_csv(recording.events.url, sep="\t")
    lags = -0.5 + np.arange(int(np.floor(2.5 * rate + 1e-9)) + 1) / rate
    np.testing.assert_allclose(epochs.lag.values, lags, rtol=0, atol=1e-9)
    assert list(epochs.trial_type.values) == list(events.trial_type)
    source = preproc.v.values.astype(np.float64)
    expected = np.stack([_linear(grid, source, onset + lags) for onset in events.onset])
    assert np.isfinite(expected).mean() > 0.5
    np.testing.assert_allclose(epochs.v.values, expected, rtol=0, atol=2e-5 * scale)
