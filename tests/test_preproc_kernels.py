"""Pure preprocessing kernels against NumPy/SciPy computations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal
from scipy.interpolate import PchipInterpolator
from scipy.spatial.transform import Rotation, Slerp

from gmfx import EventsError, ParameterError
from gmfx.preproc import _epochs, _filters, _resample, _rigid
from gmfx.storage import Location

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(seed=st.integers(0, 2**16), scale=st.booleans())
def test_fit_transforms_recovers_a_known_similarity(seed, scale):
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((40, 3))
    rotation = Rotation.random(random_state=seed).as_matrix()
    factor = rng.uniform(0.5, 2) if scale else 1.0
    shift = rng.standard_normal(3)
    target = factor * points @ rotation.T + shift
    weights = rng.uniform(0, 1, 40) * (rng.uniform(size=40) > 0.3)
    weights[:3] = 1
    fit = _rigid.fit_transforms(points[None], target, weights, scale=scale)[0]
    np.testing.assert_allclose(fit[:3, :3], factor * rotation, atol=1e-9)
    np.testing.assert_allclose(fit[:3, 3], shift, atol=1e-9)
    np.testing.assert_allclose(fit[3], [0, 0, 0, 1])


def test_fit_transforms_matches_scipy_align_vectors_on_noisy_points():
    rng = np.random.default_rng(1)
    points = rng.standard_normal((5, 30, 3))
    reference = rng.standard_normal((30, 3))
    weights = rng.uniform(0.1, 1, 30)
    fits = _rigid.fit_transforms(points, reference, weights)
    for frame, fit in zip(points, fits, strict=True):
        mean_p = np.average(frame, axis=0, weights=weights)
        mean_r = np.average(reference, axis=0, weights=weights)
        rotation, _ = Rotation.align_vectors(reference - mean_r, frame - mean_p, weights=weights)
        np.testing.assert_allclose(fit[:3, :3], rotation.as_matrix(), atol=1e-9)
        np.testing.assert_allclose(fit[:3, 3], mean_r - rotation.apply(mean_p), atol=1e-9)


def test_fit_transforms_gives_nan_for_frames_with_nan_and_ignores_unweighted_nan():
    points = np.random.default_rng(2).standard_normal((3, 10, 3))
    points[1, 4] = np.nan
    points[2, 9] = np.nan
    weights = np.ones(10)
    weights[9] = 0
    fits = _rigid.fit_transforms(points, points[0], weights)
    assert np.isfinite(fits[0]).all() and np.isnan(fits[1]).all() and np.isfinite(fits[2]).all()


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_decompose_and_compose_are_inverse_and_angles_match_scipy(seed):
    rng = np.random.default_rng(seed)
    params = np.concatenate(
        [rng.uniform(-1, 1, 3), rng.uniform(-80, 80, 3), rng.uniform(0.5, 2, 3), rng.uniform(-0.3, 0.3, 3)]
    )
    matrix = _rigid.compose_affine(params)
    np.testing.assert_allclose(_rigid.decompose_affine(matrix), params, atol=1e-8)
    rigid = params.copy()
    rigid[6:9], rigid[9:] = 1, 0
    expected = Rotation.from_euler("xyz", rigid[3:6], degrees=True).as_matrix()
    np.testing.assert_allclose(_rigid.compose_affine(rigid)[:3, :3], expected, atol=1e-12)


def test_invert_and_apply_affine():
    matrices = _rigid.compose_affine(np.array([[1, 2, 3, 10, 20, 30, 1.1, 0.9, 1.0, 0.1, 0, 0.2], [np.nan] * 12]))
    inverse = _rigid.invert_affine(matrices)
    np.testing.assert_allclose(inverse[0], np.linalg.inv(matrices[0]), atol=1e-12)
    assert np.isnan(inverse[1]).all()
    points = np.random.default_rng(3).standard_normal((1, 5, 3))
    homogeneous = np.concatenate([points[0], np.ones((5, 1))], axis=1) @ matrices[0].T
    np.testing.assert_allclose(_rigid.apply_affine(matrices[:1], points)[0], homogeneous[:, :3], atol=1e-12)


def _gappy_series(seed: int, n: int = 80):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.uniform(0.02, 0.05, n))
    values = np.cumsum(rng.standard_normal((n, 2, 3)), axis=0)
    for _ in range(3):
        start = rng.integers(0, n - 5)
        values[start : start + rng.integers(1, 8), rng.integers(0, 2)] = np.nan
    return times, values


def _oracle_mask(times, valid, new, max_gap):
    mask = np.zeros(new.size, bool)
    kept = times[valid]
    for i, t in enumerate(new):
        before, after = kept[kept <= t], kept[kept >= t]
        mask[i] = before.size > 0 and after.size > 0 and after[0] - before[-1] <= max_gap
    return mask


@SETTINGS
@given(seed=st.integers(0, 2**16), max_gap=st.sampled_from([0.06, 0.15, 10.0]))
def test_resample_linear_and_pchip_match_numpy_and_scipy_per_stretch(seed, max_gap):
    times, values = _gappy_series(seed)
    new, _ = _resample.even_grid(times, 37.0)
    new = np.concatenate([[times[0] - 1], new, [times[-1] + 1]])
    linear = _resample.resample(times, values, new, method="linear", max_gap=max_gap)
    pchip = _resample.resample(times, values, new, method="pchip", max_gap=max_gap)
    for group in range(2):
        valid = np.isfinite(values[:, group]).all(1)
        mask = _oracle_mask(times, valid, new, max_gap)
        assert (np.isfinite(linear[:, group]).all(1) == mask).all()
        for column in range(3):
            expected = np.interp(new, times[valid], values[valid, group, column])
            np.testing.assert_allclose(linear[mask, group, column], expected[mask], atol=1e-9)
        kept_t, kept_v = times[valid], values[valid, group]
        cuts = np.flatnonzero(np.diff(kept_t) > max_gap) + 1
        for t_seg, v_seg in zip(np.split(kept_t, cuts), np.split(kept_v, cuts), strict=True):
            inside = mask & (new >= t_seg[0]) & (new <= t_seg[-1])
            if t_seg.size >= 2 and inside.any():
                np.testing.assert_allclose(pchip[inside, group], PchipInterpolator(t_seg, v_seg)(new[inside]), atol=1e-9)


def test_resample_handles_a_column_with_its_own_nans():
    times = np.arange(10.0)
    values = np.arange(20.0).reshape(10, 1, 2)
    values[3, 0, 1] = np.nan
    out = _resample.resample(times, values, np.array([3.0, 3.5]), method="linear", max_gap=1.5)
    np.testing.assert_allclose(out[:, 0, 0], [6.0, 7.0])  # its own samples, no gap
    assert np.isnan(out[:, 0, 1]).all()  # a 2 s gap around t = 3
    out = _resample.resample(times, values, np.array([3.0, 3.5]), method="linear", max_gap=2.5)
    np.testing.assert_allclose(out[:, 0, 1], [7.0, 8.0])


def test_even_grid_uses_the_median_interval():
    grid, rate = _resample.even_grid(np.array([0.0, 0.1, 0.2, 0.35, 0.4]))
    assert rate == pytest.approx(10.0)
    np.testing.assert_allclose(grid, [0.0, 0.1, 0.2, 0.3, 0.4])


def test_resample_affines_slerps_rotation_and_interpolates_translation():
    times = np.array([0.0, 1.0, 2.0, 3.0])
    rotations = Rotation.from_euler("xyz", [[0, 0, 0], [30, 10, 0], [60, 40, -20], [0, 0, 90]], degrees=True)
    matrices = np.tile(np.eye(4), (4, 1, 1, 1))
    matrices[:, 0, :3, :3] = rotations.as_matrix()
    matrices[:, 0, :3, 3] = [[0, 0, 0], [1, 2, 3], [2, 2, 2], [0, 0, 0]]
    matrices[3] = np.nan
    new = np.array([0.25, 0.5, 1.7, 2.5])
    out = _resample.resample_affines(times, matrices, new, max_gap=1.5)
    expected = Slerp(times[:3], rotations[:3])(new[:3]).as_matrix()
    np.testing.assert_allclose(out[:3, 0, :3, :3], expected, atol=1e-10)
    np.testing.assert_allclose(out[:3, 0, :3, 3], [[0.25, 0.5, 0.75], [0.5, 1, 1.5], [1.7, 2, 2.3]], atol=1e-10)
    assert np.isnan(out[3]).all()


def _stretches_oracle(values, highpass, lowpass, causal):
    """Per valid stretch: mean removed, high-pass from a zero state (both ways unless causal), low-pass as
    scipy's sosfiltfilt (or sosfilt from the steady state), re-centred, mean restored."""
    out = np.full(values.shape, np.nan)
    for group in range(values.shape[1]):
        valid = np.isfinite(values[:, group]).all(1)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], valid, [False]]).astype(int)))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            piece = values[a:b, group]
            x = signal.sosfilt(highpass, piece - piece.mean(0), axis=0)
            if causal:
                x = signal.sosfilt(lowpass, x, axis=0, zi=signal.sosfilt_zi(lowpass)[:, :, None] * x[0])[0]
            else:
                x = signal.sosfilt(highpass, x[::-1], axis=0)[::-1]
                x = signal.sosfiltfilt(lowpass, x, axis=0)
            out[a:b, group] = x - x.mean(0) + piece.mean(0)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_filter_series_filters_each_stretch_like_scipy(causal):
    rng = np.random.default_rng(4)
    values = np.cumsum(rng.standard_normal((400, 2, 3)), axis=0)
    values[150:160, 0] = np.nan
    values[300:302, 1] = np.nan
    sos, design = _filters.design_butterworth(30.0, highpass=0.5, lowpass=5.0, order=3, passes=1 if causal else 2)
    assert design["kind"] == "bandpass" and design["highpass_sections"] == 2
    highpass = signal.butter(3, design["design_cutoffs_hz"]["highpass"], btype="highpass", fs=30.0, output="sos")
    lowpass = signal.butter(3, design["design_cutoffs_hz"]["lowpass"], btype="lowpass", fs=30.0, output="sos")
    out = _filters.filter_series(values, sos, highpass_sections=2, causal=causal)
    np.testing.assert_allclose(out, _stretches_oracle(values, highpass, lowpass, causal), atol=1e-9)
    assert np.isnan(out[150:160, 0]).all() and np.isfinite(out[150:160, 1]).all()


def test_filter_series_short_stretch_is_an_error_naming_its_samples_or_nan():
    values = np.ones((200, 1, 1))
    values[100:190] = np.nan
    sos, _ = _filters.design_butterworth(30.0, highpass=None, lowpass=4.0, order=5)
    need = _filters.padding_samples(sos) + 1
    with pytest.raises(ParameterError, match=rf"10 samples .* at least {need}") as info:
        _filters.filter_series(values, sos, highpass_sections=0, times=np.arange(200) / 30, where="variable 'v'")
    assert "samples 190..199" in str(info.value) and "max_gap" in str(info.value)
    out = _filters.filter_series(values, sos, highpass_sections=0, on_short="nan")
    assert np.isnan(out[190:]).all() and np.isfinite(out[:100]).all()


@pytest.mark.parametrize(
    ("highpass", "lowpass", "message"),
    [(None, 20.0, r"lowpass cut-off 20 Hz .* Nyquist frequency 15 Hz"), (5.0, 2.0, "not below"), (None, None, "nothing")],
)
def test_filter_design_errors_say_the_numbers(highpass, lowpass, message):
    with pytest.raises(ParameterError, match=message):
        _filters.design_butterworth(30.0, highpass=highpass, lowpass=lowpass, order=5)


def test_read_events_from_file_keeps_extra_columns_and_na(tmp_path):
    path = tmp_path / "sub-01_task-x_events.tsv"
    path.write_text("onset\tduration\ttrial_type\tresponse\n1.5\t0.5\tsmile\t1\n4.0\tn/a\tfrown\t0\n")
    table = _epochs.read_events(Location(str(path)))
    assert list(table.columns) == ["onset", "duration", "trial_type", "response"]
    assert np.isnan(table["duration"].iloc[1]) and table["onset"].tolist() == [1.5, 4.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time\tduration\n1\t1\n", "no 'onset' column"),
        ("onset\tduration\n1\t1\nsoon\t1\n", "'onset' of event row 2 is 'soon'"),
        ("onset\tduration\n1\tlong\n", "'duration' of event row 1"),
    ],
)
def test_bad_events_files_are_events_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad_events.tsv"
    path.write_text(text)
    with pytest.raises(EventsError, match=message) as info:
        _epochs.read_events(str(path))
    assert str(path) in str(info.value)


def test_epoch_times_for_each_anchor_and_baseline():
    lags = _epochs.epoch_lags(-0.5, 1.0, sampling_freq=2.0)
    np.testing.assert_allclose(lags, [-0.5, 0, 0.5, 1.0])
    onsets, durations = np.array([10.0, 20.0]), np.array([2.0, 4.0])
    np.testing.assert_allclose(_epochs.epoch_times(onsets, durations, lags, "offset")[1], 24 + lags)
    warped = _epochs.epoch_times(onsets, durations, np.array([0.0, 0.5, 1.0]), "warp")
    np.testing.assert_allclose(warped, [[10, 11, 12], [20, 22, 24]])
    values = np.arange(8.0).reshape(2, 4)
    np.testing.assert_allclose(_epochs.apply_baseline(values, lags, (-0.5, 0.0), "mean"), values - [[0.5], [4.5]])
    np.testing.assert_allclose(_epochs.apply_baseline(values + 1, lags, (-0.5, 0.0), "ratio")[1], (values[1] + 1) / 5.5)


@pytest.mark.parametrize("kind", ["bandpass", "lowpass"])
def test_sosfiltfilt_and_sosfilt_equal_scipy_on_many_columns(kind):
    rng = np.random.default_rng(4)
    values = rng.standard_normal((500, 37)).cumsum(axis=0)
    sos = signal.butter(5, [0.05, 4.0] if kind == "bandpass" else 4.0, btype=kind, fs=30, output="sos")
    np.testing.assert_allclose(_filters.sosfiltfilt(sos, values), signal.sosfiltfilt(sos, values, axis=0), rtol=1e-12, atol=1e-12)
    zi = signal.sosfilt_zi(sos)[:, :, None] * values[0]
    np.testing.assert_allclose(_filters.sosfilt(sos, values, zi=zi), signal.sosfilt(sos, values, axis=0, zi=zi)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="padlen"):
        _filters.sosfiltfilt(sos, values[: _filters.padding_samples(sos)])
