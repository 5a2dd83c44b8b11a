"""The lazy preprocessing API against whole-array NumPy/SciPy results, for many chunkings."""

import functools
import json
import warnings

import dask
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal
from scipy.optimize import brentq
from scipy.spatial.transform import Rotation

from gmfx import EventsError, ParameterError
from gmfx.preproc import align, epoch, filter, interpolate
from gmfx.testing._synthetic import synthetic_face, synthetic_recon_dataset

SETTINGS = settings(max_examples=15, deadline=None)
CHUNKS = st.sampled_from([1, 7, 32, 500])
FACE = synthetic_face(150, n_vertices=40, n_faces=2, time_jitter=0.3, gaps=((20, 23), (60, 90)), seed=3)


def _dataset(chunk: int):
    return synthetic_recon_dataset(FACE, chunk=chunk)


def _kabsch_oracle(points: np.ndarray, reference: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-frame fit with SciPy's ``align_vectors``, frame by frame."""
    out = np.full(points.shape, np.nan)
    for t in range(points.shape[0]):
        for f in range(points.shape[1]):
            x = points[t, f]
            if not np.isfinite(x[weights > 0]).all():
                continue
            mean_x = np.average(x, axis=0, weights=weights)
            mean_r = np.average(reference, axis=0, weights=weights)
            rotation, _ = Rotation.align_vectors(reference - mean_r, x - mean_x, weights=weights)
            out[t, f] = rotation.apply(x - mean_x) + mean_r
    return out


@functools.cache
def _aligned_oracle() -> np.ndarray:
    return _kabsch_oracle(FACE.v.astype(np.float32).astype(float), FACE.template.astype(np.float32), FACE.rigid.astype(float))


@SETTINGS
@given(chunk=CHUNKS)
def test_align_to_template_matches_a_per_frame_scipy_fit(chunk):
    ds = _dataset(chunk)
    aligned = align(ds)
    assert aligned.v.chunks[0] == ds.v.chunks[0]
    np.testing.assert_allclose(aligned.v.values, _aligned_oracle(), atol=2e-5)
    assert aligned.v.attrs["space"] == "local"
    # mat maps local back to world
    mat = aligned.mat.values.astype(float)
    world = np.einsum("tfij,tfvj->tfvi", mat[..., :3, :3], aligned.v.values) + mat[..., None, :3, 3]
    np.testing.assert_allclose(world, FACE.v, atol=2e-5)


def test_align_recovers_the_known_motion_and_removes_jitter():
    face = synthetic_face(300, n_vertices=300, noise=3e-4, seed=7)
    ds = synthetic_recon_dataset(face, chunk=64)
    aligned = align(ds)
    motion = aligned.motion.values[:, 0]
    assert np.abs(motion[:, 3:6] - face.rotation_deg[:, 0]).max() < 0.5
    assert np.abs(motion[:, :3] - face.translation[:, 0]).max() < 0.01 * face.width
    np.testing.assert_allclose(motion[:, 6:9], 1.0, atol=1e-5)
    rigid = face.rigid

    def jitter(v):  # mean over rigid vertices of each coordinate's standard deviation over time
        return np.nanstd(v[:, 0, rigid], axis=0).mean()

    assert jitter(aligned.v.values) * 5 < jitter(face.v)
    for reference in ("first", "mean"):
        relative = align(ds, reference=reference).mat.values[:, 0].astype(float)
        truth = face.mat[:, 0] @ np.linalg.inv(face.mat[0, 0])
        fitted = relative @ np.linalg.inv(relative[0])
        angles = Rotation.from_matrix(fitted[:, :3, :3] @ truth[:, :3, :3].transpose(0, 2, 1)).magnitude()
        assert np.degrees(angles).max() < 0.5
    scaled = align(ds, scale=True).motion.values[:, 0, 6:9]
    np.testing.assert_allclose(scaled, 1.0, atol=0.01)


def test_align_with_mat_inverts_the_backend_pose_and_keeps_nan_frames():
    aligned = align(_dataset(32), reference="mat")
    np.testing.assert_allclose(aligned.v.values, np.where(np.isfinite(FACE.v), FACE.local, np.nan), atol=1e-5)
    assert np.isnan(aligned.v.values[60:90]).all() and np.isnan(aligned.motion.values[60:90]).all()


def test_align_errors():
    ds = _dataset(32)
    with pytest.raises(ParameterError, match="at least 3 vertices"):
        align(ds, vertices=[0, 1])
    with pytest.raises(ParameterError, match="already in local space"):
        align(align(ds))
    with pytest.raises(ParameterError, match="unknown alignment reference"):
        align(ds, reference="best")


def _interp_oracle(times, values, new, max_gap):
    """np.interp per column; NaN outside the valid samples or across gaps longer than max_gap."""
    out = np.full((new.size,) + values.shape[1:], np.nan)
    flat = values.reshape(values.shape[0], -1)
    target = out.reshape(new.size, -1)
    for column in range(flat.shape[1]):
        valid = np.isfinite(flat[:, column])
        kept = times[valid]
        result = np.interp(new, kept, flat[valid, column])
        left = np.searchsorted(kept, new, side="right") - 1
        right = np.searchsorted(kept, new, side="left")
        ok = (left >= 0) & (right < kept.size)
        ok[ok] &= kept[right[ok]] - kept[left[ok]] <= max_gap
        target[ok, column] = result[ok]
    return out


@settings(max_examples=6, deadline=None)
@given(chunk=CHUNKS, max_gap=st.sampled_from([0.05, 0.5]), rate=st.sampled_from([None, 47.0]))
def test_interpolate_linear_matches_np_interp_with_gaps(chunk, max_gap, rate):
    ds = _dataset(chunk)
    out = interpolate(ds, max_gap=max_gap, sampling_freq=rate)
    grid = out.time.values
    assert np.allclose(np.diff(grid), np.diff(grid)[0])
    assert max(out.v.chunks[0]) == min(chunk, 150)
    np.testing.assert_allclose(out.v.values, _interp_oracle(FACE.times, FACE.v.astype(np.float32), grid, max_gap), atol=1e-5)
    np.testing.assert_array_equal(out.detected.values, np.isfinite(out.v.values).all(axis=(2, 3)))
    history = [json.loads(h) for h in out.attrs["gmfx_history"]]
    assert history[-1]["operation"] == "interpolate" and history[-1]["parameters"]["max_gap"] == max_gap


@settings(max_examples=4, deadline=None)
@given(chunk=st.sampled_from([1, 7, 32]), method=st.sampled_from(["pchip", "cubic"]))
def test_spline_interpolation_does_not_depend_on_chunks(chunk, method):
    whole = interpolate(_dataset(150), method=method).v.values
    chunked = interpolate(_dataset(chunk), method=method)
    np.testing.assert_allclose(chunked.v.values, whole, atol=1e-6, rtol=1e-6)


def test_interpolate_bridges_long_gaps_when_asked():
    out = interpolate(_dataset(32), max_gap=2.0)
    np.testing.assert_allclose(out.v.values, _interp_oracle(FACE.times, FACE.v.astype(np.float32), out.time.values, 2.0), atol=1e-5)
    assert np.isfinite(out.v.values).all()


def test_interpolate_moves_mat_by_slerp():
    ds = _dataset(16)
    out = interpolate(ds, max_gap=0.5)
    mat = out.mat.values[:, 0].astype(float)
    ok = np.isfinite(mat).all(axis=(1, 2))
    rotations = mat[ok, :3, :3]
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rotations.shape), atol=1e-5)


def _evenly_sampled(chunk: int, n: int = 400, gaps=((100, 104), (250, 300))):
    face = synthetic_face(n, n_vertices=20, gaps=gaps, seed=5)
    return face, synthetic_recon_dataset(face, chunk=chunk)


def _oracle_cutoff(kind: str, cutoff: float, order: int, passes: int) -> float:
    """The Butterworth design frequency whose response, run ``passes`` times, is -3 dB at ``cutoff`` (root-finding)."""
    def excess(design: float) -> float:
        sos = signal.butter(order, design, btype=kind, fs=30.0, output="sos")
        return abs(signal.sosfreqz(sos, worN=[cutoff], fs=30.0)[1][0]) ** passes - 2**-0.5

    return brentq(excess, cutoff / 3, min(3 * cutoff, 14.999), xtol=1e-12)


def _stretch_oracle(piece, highpass, lowpass, causal):
    """Mean removed; high-pass from a zero state (forward, and backward unless causal); low-pass as
    scipy's sosfiltfilt (or sosfilt from the steady state); re-centred; mean added back."""
    mean = piece.mean(axis=0)
    x = signal.sosfilt(highpass, piece - mean, axis=0)
    if not causal:
        x = signal.sosfilt(highpass, x[::-1], axis=0)[::-1]
    if causal:
        zi = signal.sosfilt_zi(lowpass).reshape((len(lowpass), 2) + (1,) * (x.ndim - 1)) * x[0]
        x = signal.sosfilt(lowpass, x, axis=0, zi=zi)[0]
    else:
        x = signal.sosfiltfilt(lowpass, x, axis=0)
    return x - x.mean(axis=0) + mean


@SETTINGS
@given(chunk=st.sampled_from([1, 13, 64, 400]), causal=st.booleans(), vertex_chunk=st.sampled_from([None, 1, 7]))
def test_filter_matches_scipy_on_the_whole_array(chunk, causal, vertex_chunk):
    face, ds = _evenly_sampled(chunk)
    out = filter(ds, highpass=0.2, lowpass=4.0, order=3, causal=causal, vertex_chunk=vertex_chunk)
    passes = 1 if causal else 2
    highpass = signal.butter(3, _oracle_cutoff("highpass", 0.2, 3, passes), btype="highpass", fs=30.0, output="sos")
    lowpass = signal.butter(3, _oracle_cutoff("lowpass", 4.0, 3, passes), btype="lowpass", fs=30.0, output="sos")
    values = face.v.astype(np.float32).astype(float)
    expected = np.full(values.shape, np.nan)
    for a, b in ((0, 100), (104, 250), (300, 400)):
        expected[a:b] = _stretch_oracle(values[a:b], highpass, lowpass, causal)
    np.testing.assert_allclose(out.v.values, expected, atol=1e-5)
    design = json.loads(out.attrs["gmfx_history"][-1])["parameters"]["design"]
    assert design["kind"] == "bandpass" and design["order"] == 3


def test_filter_errors_name_the_numbers():
    face, ds = _evenly_sampled(64)
    with pytest.raises(ParameterError, match="Nyquist frequency 15 Hz"):
        filter(ds, lowpass=16.0)
    irregular = synthetic_recon_dataset(synthetic_face(100, n_vertices=10, time_jitter=0.3), chunk=32)
    with pytest.raises(ParameterError, match="even time grid") as info:
        filter(irregular)
    assert "interpolate" in str(info.value)
    with pytest.raises(ParameterError, match="has 15 samples, fewer than the 19"):
        filter(synthetic_recon_dataset(synthetic_face(15, n_vertices=10), chunk=8), highpass=1.0, lowpass=None)
    _, short = _evenly_sampled(64, gaps=((100, 390),))
    with pytest.raises(ParameterError, match="too short"):
        filter(short, highpass=0.5, lowpass=None).v.values  # noqa: B018 - computing raises
    assert np.isnan(filter(short, highpass=0.5, lowpass=None, on_short="nan").v.values[390:]).all()


def _epoch_oracle(times, values, sample_times):
    out = np.full((len(sample_times), sample_times.shape[1]) + values.shape[1:], np.nan)
    for e, wanted in enumerate(sample_times):
        out[e] = _interp_oracle(times, values, wanted, 0.5)
    return out


EVENTS = pd.DataFrame(
    {"onset": [1.5, 3.0, 4.2, 30.0], "duration": [0.5, 1.0, 0.8, 1.0], "trial_type": ["a", "b", "a", "late"], "rt": [1, 2, 3, 4]}
)


@SETTINGS
@given(chunk=CHUNKS, anchor=st.sampled_from(["onset", "offset", "warp"]))
def test_epoch_matches_np_interp_at_the_event_times(chunk, anchor):
    ds = _dataset(chunk)
    with pytest.warns(UserWarning, match=r"1 of 4 events .* row 4 \(onset 30 s\)"):
        out = epoch(ds, EVENTS, start=-0.2 if anchor != "warp" else 0.0, end=0.5 if anchor != "warp" else 1.0, anchor=anchor)
    lags = out.lag.values
    onsets, durations = EVENTS.onset.to_numpy()[:, None], EVENTS.duration.to_numpy()[:, None]
    sample_times = {"onset": onsets + lags, "offset": onsets + durations + lags, "warp": onsets + lags * durations}[anchor]
    expected = _epoch_oracle(FACE.times, FACE.v.astype(np.float32), sample_times)
    np.testing.assert_allclose(out.v.values, expected, atol=1e-5)
    assert out.v.dims == ("epoch", "lag", "face", "vertex", "coord")
    assert list(out.trial_type.values) == ["a", "b", "a", "late"] and list(out.rt.values) == [1, 2, 3, 4]
    assert np.isnan(out.v.values[3]).all()


def test_epoch_baseline_and_event_errors(tmp_path):
    ds = _dataset(32)
    events = EVENTS.iloc[:3]
    raw = epoch(ds, events, start=-0.2, end=0.5).v.values
    lags = epoch(ds, events, start=-0.2, end=0.5).lag.values
    corrected = epoch(ds, events, start=-0.2, end=0.5, baseline="mean").v.values
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = raw - np.nanmean(raw[:, lags <= 0], axis=1, keepdims=True)
    np.testing.assert_allclose(corrected, expected, atol=1e-5)
    with pytest.raises(EventsError, match="row 1 has none"):
        epoch(ds, events.assign(duration=np.nan), anchor="offset")
    bad = tmp_path / "x_events.tsv"
    bad.write_text("onset,duration\n1,2\n")
    with pytest.raises(EventsError, match="comma-separated") as info:
        epoch(ds, bad)
    assert str(bad) in str(info.value)
    empty = tmp_path / "y_events.tsv"
    empty.write_text("onset\tduration\ttrial_type\n")
    with pytest.raises(EventsError, match="has no events") as info:
        epoch(ds, empty)
    assert str(empty) in str(info.value)
    with pytest.raises(EventsError, match="has no events"):
        epoch(ds, events.iloc[:0])
    with pytest.raises(ParameterError, match="baseline window"):
        epoch(ds, events, start=0.1, end=0.5, baseline="mean")


def test_building_the_whole_chain_computes_nothing():
    def refuse(*args, **kwargs):
        raise AssertionError("something was computed while building the graph")

    ds = synthetic_recon_dataset(synthetic_face(200, n_vertices=20, time_jitter=0.2, gaps=((50, 55),)), chunk=32)
    with dask.config.set(scheduler=refuse):
        for reference in ("template", "first", "mean", "mat"):
            chained = filter(interpolate(align(ds, reference=reference)), highpass=0.5, lowpass=4.0)
            result = epoch(chained, EVENTS.iloc[:3], baseline="mean")
    assert result.v.shape[:2] == (3, 76)
    with pytest.raises(AssertionError, match="computed"):
        with dask.config.set(scheduler=refuse):
            result.v.values  # noqa: B018
