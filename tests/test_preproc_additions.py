"""What users of Medusa had and gmfx lacked (issue 8): a reference shape of one's own, evoked faces,
export to MNE-Python, and the One Euro filter. Oracles: per-frame SciPy fits, NumPy group averages,
a direct per-sample One Euro written here, real MNE objects."""

import json
import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.spatial.transform import Rotation

import gmfx
from gmfx import ParameterError
from gmfx.storage import Location
from gmfx.testing._synthetic import synthetic_face, synthetic_recon_dataset

FACE = synthetic_face(240, n_vertices=50, time_jitter=0.3, gaps=((100, 106),), seed=4)
EVENTS = pd.DataFrame(
    {"onset": [2.0, 3.0, 4.5, 6.0, 7.0], "duration": [0.5] * 5, "trial_type": ["smile", "frown", "smile", "smile", np.nan],
     "rt": [0.4, 0.5, 0.6, 0.7, 0.8]}
)  # fmt: skip


def _fit_oracle(points: np.ndarray, reference: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each frame rotated and shifted onto ``reference`` by SciPy's ``align_vectors``."""
    out = np.full(points.shape, np.nan)
    for t in range(points.shape[0]):
        x = points[t, 0]
        if not np.isfinite(x).all():
            continue
        mean_x, mean_r = np.average(x, axis=0, weights=weights), np.average(reference, axis=0, weights=weights)
        rotation, _ = Rotation.align_vectors(reference - mean_r, x - mean_x, weights=weights)
        out[t, 0] = rotation.apply(x - mean_x) + mean_r
    return out


# -- reference= an array or a store ---------------------------------------------------------------------
def test_align_to_a_users_array_or_store(tmp_path):
    ds = synthetic_recon_dataset(FACE, chunk=40)
    target = FACE.template * 1.1 + [0.01, -0.02, 0.03]  # one participant's mean face, say
    expected = _fit_oracle(FACE.v.astype(np.float32).astype(float), target, FACE.rigid.astype(float))
    aligned = gmfx.align(ds, reference=target)
    np.testing.assert_allclose(aligned.v.values, expected, atol=2e-5)
    assert json.loads(aligned.attrs["gmfx_history"][-1])["parameters"]["reference"].startswith("array sha1:")

    # the same shape as the mean of a stored dataset's v over time (a store of another recording)
    stored = xr.Dataset({"v": (("time", "face", "vertex", "coord"), np.stack([target - 0.001, target + 0.001])[:, None])})
    stored.to_zarr(str(tmp_path / "mean_face.zarr"), zarr_format=3, consolidated=False)
    from_store = gmfx.align(ds, reference=Location(str(tmp_path / "mean_face.zarr")))
    np.testing.assert_allclose(from_store.v.values, expected, atol=2e-5)

    with pytest.raises(ParameterError, match=r"shape \(49, 3\); this mesh needs \(50, 3\)"):
        gmfx.align(ds, reference=target[:49])
    with pytest.raises(ParameterError, match="unknown alignment reference"):
        gmfx.align(ds, reference=str(tmp_path / "nowhere.zarr"))


# -- evoked -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ["mean", "median"])
def test_evoked_averages_each_condition_into_a_face(agg):
    epochs = gmfx.epoch(gmfx.interpolate(gmfx.align(synthetic_recon_dataset(FACE, chunk=40))), EVENTS.iloc[:4], start=-0.2, end=0.6)
    with pytest.warns(UserWarning, match="1 epochs have no 'trial_type'"):
        gmfx.evoked(gmfx.epoch(gmfx.interpolate(gmfx.align(synthetic_recon_dataset(FACE, chunk=40))), EVENTS, start=-0.2, end=0.6))
    result = gmfx.evoked(epochs, by="trial_type", agg=agg)
    values = epochs.v.values.astype(np.float64)
    reduce = np.nanmean if agg == "mean" else np.nanmedian
    assert list(result.condition.values) == ["frown", "smile"]
    assert result.v.dims == ("condition", "lag", "face", "vertex", "coord")
    np.testing.assert_allclose(result.v.values[0], reduce(values[[1]], axis=0), atol=1e-6)
    np.testing.assert_allclose(result.v.values[1], reduce(values[[0, 2, 3]], axis=0), atol=1e-6)
    assert result.n_epochs.values.tolist() == [1, 3]
    # still a face: the shape of the template, ready to render
    assert "tris" in result and np.nanmax(np.abs(result.v.values[1, 0, 0] - FACE.template)) < 0.1 * FACE.width
    everything = gmfx.evoked(epochs, by=None)
    assert everything.condition.values.tolist() == ["all"] and everything.n_epochs.values.tolist() == [4]
    with pytest.raises(ParameterError, match="no events column 'condition'"):
        gmfx.evoked(epochs, by="condition")


# -- to_mne -------------------------------------------------------------------------------------------
def test_to_mne_gives_real_epochs_with_events_and_metadata():
    mne = pytest.importorskip("mne")
    face = synthetic_face(300, n_vertices=12, seed=6)
    ds = gmfx.interpolate(gmfx.align(synthetic_recon_dataset(face, chunk=64)), sampling_freq=30.0)
    epochs = gmfx.epoch(ds, EVENTS.iloc[:4], start=-0.2, end=0.5)
    exported = gmfx.to_mne(epochs, picks=[2, 7])
    assert isinstance(exported, mne.EpochsArray)
    assert exported.ch_names == ["v2_x", "v2_y", "v2_z", "v7_x", "v7_y", "v7_z"]
    assert exported.info["sfreq"] == pytest.approx(30.0)
    np.testing.assert_allclose(exported.get_data()[:, 4], epochs.v.values[:, :, 0, 7, 1], atol=1e-6)  # epoch 3's v7_y
    np.testing.assert_array_equal(exported.events[:, 0], np.round(EVENTS.onset.iloc[:4] * 30).astype(int))
    assert exported.event_id == {"frown": 1, "smile": 2}
    np.testing.assert_array_equal(exported.events[:, 2], [2, 1, 2, 2])
    assert exported.metadata["rt"].tolist() == [0.4, 0.5, 0.6, 0.7]
    assert len(exported["smile"]) == 3
    np.testing.assert_allclose(exported.times, epochs.lag.values, atol=0.5 / 30)
    warped = gmfx.epoch(ds, EVENTS.iloc[:4], start=0.0, end=1.0, anchor="warp")
    with pytest.raises(ParameterError, match="MNE needs seconds"):
        gmfx.to_mne(warped)


# -- the One Euro filter ------------------------------------------------------------------------------
def _one_euro_oracle(times, x, min_cutoff, beta, d_cutoff):
    """Casiez et al. (2012), one sample at a time, in plain Python; restarts after NaN."""
    out = np.full(x.shape, np.nan)
    state = None
    for i, (t, value) in enumerate(zip(times, x, strict=True)):
        if math.isnan(value):
            state = None
            continue
        if state is None:
            state = (t, value, 0.0)
            out[i] = value
            continue
        last_t, last_x, last_dx = state
        dt = t - last_t
        a_d = 1.0 / (1.0 + 1.0 / (2 * math.pi * d_cutoff * dt))
        dx = a_d * (value - last_x) / dt + (1 - a_d) * last_dx
        a = 1.0 / (1.0 + 1.0 / (2 * math.pi * (min_cutoff + beta * abs(dx)) * dt))
        smoothed = a * value + (1 - a) * last_x
        out[i] = smoothed
        state = (t, smoothed, dx)
    return out


@pytest.mark.parametrize(("min_cutoff", "beta", "d_cutoff"), [(1.0, 0.0, 1.0), (0.5, 40.0, 2.0)])
def test_one_euro_equals_a_direct_per_sample_implementation(min_cutoff, beta, d_cutoff):
    ds = synthetic_recon_dataset(FACE, chunk=32)  # irregular frame times and a gap: the filter follows them
    out = gmfx.filter(ds, method="one_euro", min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff, vertex_chunk=16)
    values = FACE.v.astype(np.float32).astype(np.float64)
    for vertex in (0, 17, 49):
        for coord in range(3):
            expected = _one_euro_oracle(FACE.times, values[:, 0, vertex, coord], min_cutoff, beta, d_cutoff)
            np.testing.assert_allclose(out.v.values[:, 0, vertex, coord], expected, rtol=1e-5, atol=1e-7)
    record = json.loads(out.attrs["gmfx_history"][-1])
    assert record["parameters"] == {"method": "one_euro", "min_cutoff": min_cutoff, "beta": beta, "d_cutoff": d_cutoff}
    with pytest.raises(ParameterError, match="min_cutoff=0"):
        gmfx.filter(ds, method="one_euro", min_cutoff=0)


def test_one_euro_smooths_jitter_and_follows_fast_moves():
    t = np.arange(600) / 30.0
    rng = np.random.default_rng(0)
    step = np.where(t > 10, 1.0, 0.0)
    noisy = step + 0.02 * rng.standard_normal(t.size)
    ds = xr.Dataset({"v": (("time", "face", "vertex", "coord"), da.from_array(noisy[:, None, None, None].repeat(3, 3)))}, coords={"time": t})
    still = gmfx.filter(ds, method="one_euro", min_cutoff=0.5, beta=0.0).v.values[:, 0, 0, 0]
    adaptive = gmfx.filter(ds, method="one_euro", min_cutoff=0.5, beta=5.0).v.values[:, 0, 0, 0]
    quiet = (t > 2) & (t < 9)
    assert np.std(still[quiet]) < 0.3 * np.std(noisy[quiet])  # jitter smoothed
    after = (t > 10.05) & (t < 10.3)
    assert np.abs(adaptive[after] - 1).mean() < 0.5 * np.abs(still[after] - 1).mean()  # beta: less lag on the move
