"""Preprocessing a scientist can trust (issue 8): the filter keeps the face, leaves no edge drift and puts
its cut-offs where they are asked; ``motion`` is always the decomposition of ``mat``.

Oracles: NumPy means, SciPy's ``sosfreqz`` and ``Rotation.as_euler``, sinusoids of known amplitude."""

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import signal
from scipy.spatial.transform import Rotation

import gmfx
from gmfx.testing._synthetic import synthetic_face, synthetic_recon_dataset

FPS = 30.0


def _series_dataset(values: np.ndarray, *, fps: float = FPS, chunk: int = 256, start: float = 0.0) -> xr.Dataset:
    """``values`` ``(time, vertex, coord)`` as a one-face dataset on an even grid."""
    n = values.shape[0]
    v = da.from_array(values[:, None].astype(np.float32), chunks=(chunk, 1, values.shape[1], values.shape[2]))
    return xr.Dataset(
        {"v": (("time", "face", "vertex", "coord"), v, {"space": "local"})},
        coords={"time": ("time", start + np.arange(n) / fps)},
    )


def _last_record(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs["gmfx_history"][-1])


# -- 1. the filter keeps the mean shape --------------------------------------------------------------
@pytest.mark.parametrize(("chunk", "vertex_chunk"), [(64, None), (100, 7), (600, 1)])
def test_filter_keeps_every_vertex_temporal_mean(chunk, vertex_chunk):
    face = synthetic_face(600, n_vertices=30, gaps=((200, 212),), expression=0.01, seed=11)
    aligned = gmfx.align(synthetic_recon_dataset(face, chunk=chunk))
    out = gmfx.filter(aligned, vertex_chunk=vertex_chunk)  # the defaults: 0.005 Hz high-pass, 4 Hz low-pass
    before = np.nanmean(aligned.v.values.astype(np.float64), axis=0)
    after = np.nanmean(out.v.values.astype(np.float64), axis=0)
    assert np.abs(after - before).max() <= 1e-3 * face.width
    assert np.isnan(out.v.values[200:212]).all()
    assert "mean" in _last_record(out)["parameters"]["design"]


# -- 2. no slow drift at the edges of short recordings -----------------------------------------------
@pytest.mark.parametrize("seconds", [20, 60, 600])
@pytest.mark.parametrize("phase_deg", [0, 90])
def test_no_edge_drift_under_the_default_high_pass(seconds, phase_deg):
    t = np.arange(int(seconds * FPS)) / FPS
    wave = 5.0 * np.sin(2 * np.pi * 1.3 * t + np.radians(phase_deg))
    values = np.stack([100.0 + wave, -40.0 + wave, wave], axis=-1)[:, None, :]  # one vertex, three coords
    out = gmfx.filter(_series_dataset(values)).v.values[:, 0, 0].astype(np.float64)
    middle = slice(t.size // 4, 3 * t.size // 4)
    assert np.abs(out[middle] - values[middle, 0]).max() <= 0.01 * 5.0


def test_no_edge_drift_in_each_stretch_between_nan_gaps():
    t = np.arange(int(60 * FPS)) / FPS
    values = (20.0 + 5.0 * np.cos(2 * np.pi * 1.3 * t))[:, None, None].repeat(3, axis=2)
    values[900:960] = np.nan  # two 30 s stretches, each filtered on its own
    out = gmfx.filter(_series_dataset(values)).v.values[:, 0, 0].astype(np.float64)
    assert np.isnan(out[900:960]).all()
    for a, b in ((0, 900), (960, t.size)):
        middle = slice(a + (b - a) // 4, a + 3 * (b - a) // 4)
        assert np.abs(out[middle] - values[middle, 0]).max() <= 0.01 * 5.0


# -- 3. cut-offs where they are asked ----------------------------------------------------------------
def _measured_gain(out: np.ndarray, t: np.ndarray, freq: float) -> float:
    """Amplitude of the ``freq`` component over the middle half (least squares on sin and cos)."""
    middle = slice(t.size // 4, 3 * t.size // 4)
    basis = np.column_stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones(t.size)])[middle]
    coefficients, *_ = np.linalg.lstsq(basis, out[middle], rcond=None)
    return float(np.hypot(*coefficients[:2]))


@pytest.mark.parametrize(("highpass", "lowpass", "causal"), [(0.5, 4.0, False), (None, 4.0, False), (0.3, None, False), (0.5, 4.0, True)])
@pytest.mark.parametrize("level", ["-3dB", "-6dB"])
def test_cutoffs_have_the_stated_gain_measured_and_in_the_recorded_design(highpass, lowpass, causal, level):
    t = np.arange(int(240 * FPS)) / FPS
    cutoffs = [f for f in (highpass, lowpass) if f is not None]
    values = np.stack([np.sin(2 * np.pi * f * t) for f in cutoffs] + [np.zeros_like(t)], axis=-1)[:, :, None]
    out = gmfx.filter(_series_dataset(values, chunk=4096), highpass=highpass, lowpass=lowpass, causal=causal, cutoff_level=level)
    design = _last_record(out)["parameters"]["design"]
    effective = np.vstack([np.asarray(design["sos"])] * design["passes"])
    assert design["passes"] == (1 if causal else 2) and design["cutoff_level"] == level
    stated = 1 / np.sqrt(2) if level == "-3dB" else 0.5
    for column, freq in enumerate(cutoffs):
        _, response = signal.sosfreqz(effective, worN=[freq], fs=FPS)
        measured = _measured_gain(out.v.values[:, 0, column, 0].astype(np.float64), t, freq)
        assert measured == pytest.approx(abs(response[0]), abs=0.02)
        assert abs(response[0]) == pytest.approx(stated, abs=0.02)


def test_default_cutoffs_are_minus_3_db_of_the_two_pass_response():
    out = gmfx.filter(_series_dataset(np.zeros((900, 1, 3))))
    design = _last_record(out)["parameters"]["design"]
    _, response = signal.sosfreqz(np.vstack([np.asarray(design["sos"])] * 2), worN=[0.005, 4.0], fs=FPS)
    np.testing.assert_allclose(np.abs(response), 1 / np.sqrt(2), atol=0.005)


# -- 4. motion is the decomposition of mat, continuous, after every step ----------------------------
def _assert_motion_is_mat(ds: xr.Dataset, step: str) -> None:
    names = list(ds.motion_param.values)
    motion = ds.motion.values.astype(np.float64)
    mat = ds.mat.values.astype(np.float64)
    for face in range(mat.shape[1]):
        ok = np.isfinite(mat[:, face]).all(axis=(1, 2))
        assert (np.isfinite(motion[:, face]).all(axis=1) == ok).all(), step
        linear = mat[ok, face, :3, :3]
        scales = np.linalg.norm(linear, axis=-2)  # the columns of R @ diag(s)
        angles = Rotation.from_matrix(linear / scales[:, None, :]).as_euler("xyz", degrees=True)
        got = motion[ok, face]
        turn = got[:, [names.index(n) for n in ("rx", "ry", "rz")]]
        difference = (turn - angles + 180) % 360 - 180
        assert np.abs(difference).max() < 0.01, f"{step}: angles differ from mat's by {np.abs(difference).max():.3g} deg"
        np.testing.assert_allclose(got[:, [names.index(n) for n in ("tx", "ty", "tz")]], mat[ok, face, :3, 3], atol=1e-4, err_msg=step)
        np.testing.assert_allclose(got[:, [names.index(n) for n in ("sx", "sy", "sz")]], 1.0, atol=1e-4, err_msg=step)
        steps = np.abs(np.diff(turn, axis=0))[np.diff(np.flatnonzero(ok)) == 1]  # between consecutive valid samples
        assert steps.max() < 20, f"{step}: the angles jump by {steps.max():.1f} deg between samples"


def _flipped_face(flip: Rotation) -> xr.Dataset:
    """A synthetic face whose world space is turned by ``flip``, so its angles pass through +/-180 degrees."""
    face = synthetic_face(240, n_vertices=60, time_jitter=0.3, max_rotation_deg=20, gaps=((100, 104),), seed=2)
    ds = synthetic_recon_dataset(face, chunk=50)
    turned = np.einsum("ij,tfvj->tfvi", flip.as_matrix(), face.v).astype(np.float32)
    return ds.assign(v=(ds.v.dims, da.from_array(turned, chunks=(50, 1, 60, 3)), ds.v.attrs))


@pytest.mark.parametrize("flip", [Rotation.from_euler("x", 180, degrees=True), Rotation.from_euler("z", 180, degrees=True)])
def test_motion_follows_mat_through_plus_minus_180_degrees_after_every_step(flip):
    aligned = gmfx.align(_flipped_face(flip))
    mat = aligned.mat.values[:, 0].astype(np.float64)
    wrapped = Rotation.from_matrix(mat[np.isfinite(mat).all(axis=(1, 2)), :3, :3]).as_euler("xyz", degrees=True)
    assert (wrapped > 170).any() and (wrapped < -170).any()  # in (-180, 180] the angles jump: the case to handle
    _assert_motion_is_mat(aligned, "align")
    even = gmfx.interpolate(aligned)
    _assert_motion_is_mat(even, "interpolate")
    filtered = gmfx.filter(even)
    _assert_motion_is_mat(filtered, "filter")
    _assert_motion_is_mat(gmfx.filter(aligned, method="one_euro"), "one_euro")
    events = pd.DataFrame({"onset": [2.5, 4.0, 6.5], "duration": [1.0, 1.0, 1.0]})
    epochs = gmfx.epoch(filtered, events, start=-0.5, end=1.0, baseline="mean")
    one_series = epochs.stack(sample=("epoch", "lag")).transpose("sample", ...).rename(sample="time")
    _assert_motion_is_mat(one_series.drop_vars(["time", "epoch", "lag"]), "epoch")


@pytest.fixture(scope="module")
def real_clip(data_dir, tmp_path_factory, dask_client):
    """The bundled real clip (single_face.mp4, 72 frames) reconstructed by MediaPipe."""
    from gmfx.storage import Location, store_location
    from gmfx.testing import write_bids_recording

    root = tmp_path_factory.mktemp("clip")
    write_bids_recording(str(root / "bids"), subject="01", task="real", video=str(data_dir / "single_face.mp4"))
    recordings = gmfx.find_recordings(str(root / "bids"))
    out = Location(str(root / "out"))
    gmfx.run_recon(recordings, out, client=dask_client, device="cpu", progress=False)
    return gmfx.open_recon(store_location(out, recordings[0], "recon"))


@pytest.mark.slow
def test_motion_and_mean_shape_on_a_real_mediapipe_clip(real_clip):
    aligned = gmfx.align(real_clip)
    _assert_motion_is_mat(aligned, "align")
    even = gmfx.interpolate(aligned)
    _assert_motion_is_mat(even, "interpolate")
    filtered = gmfx.filter(even)
    _assert_motion_is_mat(filtered, "filter")
    width = float(np.ptp(np.nanmean(even.v.values[:, 0, :, 0], axis=0)))
    shift = np.abs(np.nanmean(filtered.v.values, axis=0) - np.nanmean(even.v.values, axis=0)).max()
    assert shift <= 1e-3 * width
