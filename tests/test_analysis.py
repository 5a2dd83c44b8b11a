"""The generative model: design from events, lazy GLM, AR(1), group level, generate, components.

Oracles: statsmodels OLS, NumPy written here (AR(1) prewhitening, group statistics, SVD), SciPy's
one-sample t-test, and the synthetic recordings' known responses.
"""

import json
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.api as sm
import xarray as xr
from dask.callbacks import Callback

import gmfx
from gmfx.analysis import _ols
from gmfx.stages import glm as stage
from gmfx.stages.preproc import write_lazy
from gmfx.storage import Location, open_dataset
from gmfx.testing import synthetic_responses

GAPS = [(500, 530), (2000, 2003)]


@pytest.fixture(scope="module")
def recording():
    return synthetic_responses(3000, n_vertices=24, gaps=GAPS, modulation=5e-4, seed=1)


@pytest.fixture(scope="module")
def fit(recording):
    return gmfx.glm(recording.dataset, recording.events, window=(0, 1.0), modulators=["intensity"],
                    t_contrasts={"smile-frown": "smile - frown"}, f_contrasts={"smile": {"smile": 1}, "any": "smile + frown"}).compute()  # fmt: skip


def _design_in_test(events, times, lags, conditions, modulator=None):
    """FIR columns built by hand: row of each (onset + lag) sample; modulator amplitude centred per condition."""
    n = times.size
    columns = []
    for condition in conditions:
        chosen = events[events["trial_type"] == condition]
        amplitude = np.ones(len(chosen)) if modulator is None else chosen[modulator].to_numpy() - chosen[modulator].mean()
        for k in range(lags):
            column = np.zeros(n)
            for onset, a in zip(chosen["onset"], amplitude):
                row = int(round(onset * 30)) + k
                if row < n:
                    column[row] += a
            columns.append(column)
    return np.column_stack(columns)


def test_design_has_fir_modulators_drift_and_motion_with_overlaps():
    times = np.arange(300) / 30.0
    events = pd.DataFrame({"onset": [1.0, 1.2, 3.0, 3.0, 9.8], "trial_type": ["a", "a", "b", "b", "a"], "rt": [0.5, 1.5, 2.0, 2.0, 1.0]})
    motion = np.column_stack([np.linspace(0, 1, 300), np.full(300, 180.0) - np.r_[np.zeros(150), np.full(150, 360.0)]])
    design = gmfx.build_design(events, times, window=(0, 0.5), modulators=["rt"], drift_order=2, motion=motion, motion_names=["tx", "rx"])
    x = design.dense()
    assert design.conditions == ("a", "b", "a:rt")
    expected = np.column_stack([_design_in_test(events, times, 16, ["a", "b"]), _design_in_test(events, times, 16, ["a"], "rt")])
    np.testing.assert_allclose(x[:, : design.n_interest], expected)
    np.testing.assert_array_equal(x[36, [0, 6]], [1, 1])  # a at 1.0 s and 1.2 s overlap: lag 6 of one, lag 0 of the other
    np.testing.assert_array_equal(x[90:106, 16:32], 2 * np.eye(16))  # two b at 3.0 s add up
    assert design.columns["condition"].iloc[32] == "a:rt"  # b's rt is constant: no b:rt column
    drift = x[:, design.n_interest : design.n_interest + 3]
    np.testing.assert_allclose(drift[:, 2], 1.5 * np.linspace(-1, 1, 300) ** 2 - 0.5)
    unwrapped = x[:, -1]  # rx jumps from 180 to -180 degrees: unwrapped, it is constant, so only tx remains
    assert list(design.columns["name"][design.n_interest + 3 :]) == ["motion_tx"]
    np.testing.assert_allclose(unwrapped, (motion[:, 0] - motion[:, 0].mean()) / motion[:, 0].std())


def test_betas_recover_the_known_response_with_overlaps_drift_motion_and_gaps(recording, fit):
    beta, se = fit["beta"].values[:, :, 0], fit["se"].values[:, :, 0]
    truth = np.concatenate([recording.response, recording.modulation])
    z = (beta - truth) / se
    assert np.abs(z).max() < 6  # every estimate within 6 standard errors of the truth (14,880 of them)
    assert abs(z.std() - 1) < 0.1  # and the standard errors are right
    assert np.abs(beta[:2] - recording.response).max() < 0.1 * np.abs(recording.response).max()
    assert int(fit["dof"][0]) == 3000 - 33 - 4 * 31 - 4 - 6
    without_motion = gmfx.glm(recording.dataset, recording.events, window=(0, 1.0), modulators=["intensity"], motion=None).compute()
    assert np.abs(without_motion["beta"].values[:2, :, 0] - recording.response).max() > 3 * np.abs(beta[:2] - recording.response).max()


def test_t_and_f_match_statsmodels(recording, fit):
    design = gmfx.build_design(recording.events, recording.dataset["time"].values, window=(0, 1.0), modulators=["intensity"],
                               drift_order=3, motion=recording.dataset["motion"].sel(motion_param=list("t" + a for a in "xyz") + ["rx", "ry", "rz"]).values[:, 0],
                               motion_names=["tx", "ty", "tz", "rx", "ry", "rz"])  # fmt: skip
    valid = np.isfinite(recording.v[:, 0]).all(axis=(1, 2))
    x = design.dense()[valid]
    lags, p = 31, x.shape[1]
    for vertex, coord in [(0, 0), (23, 1)]:
        ols = sm.OLS(recording.v[valid, 0, vertex, coord].astype(np.float64), x).fit()
        np.testing.assert_allclose(fit["beta"].values[:, :, 0, vertex, coord].ravel(), ols.params[: 4 * lags], rtol=2e-4, atol=1e-8)
        np.testing.assert_allclose(fit["se"].values[:, :, 0, vertex, coord].ravel(), ols.bse[: 4 * lags], rtol=1e-4)
        np.testing.assert_allclose(fit["sigma2"].values[0, vertex, coord], ols.scale, rtol=1e-4)
        assert int(fit["dof"][0]) == ols.df_resid
        for lag in (0, 30):
            c = np.zeros(p)
            c[31 + lag], c[lag] = 1, -1  # smile - frown at this lag
            np.testing.assert_allclose(fit["t"].values[0, lag, 0, vertex, coord], ols.t_test(c).tvalue.item(), rtol=1e-3, atol=1e-3)
        for index, rows in enumerate([[31 + k for k in range(lags)], None]):
            matrix = np.zeros((lags, p))
            for k in range(lags):
                if rows is None:
                    matrix[k, k] = matrix[k, 31 + k] = 1
                else:
                    matrix[k, rows[k]] = 1
            expected = ols.f_test(matrix)
            np.testing.assert_allclose(fit["F"].values[index, 0, vertex, coord], expected.fvalue, rtol=1e-3)
            assert (expected.df_num, expected.df_denom) == (fit["F"].attrs["dof_numerator"], int(fit["dof"][0]))


def test_ar1_prewhitening_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    n = 1200
    x = np.column_stack([np.ones(n), np.sin(np.arange(n) / 20), rng.normal(size=n)])
    valid = np.ones(n, bool)
    valid[300:320] = False
    y = np.empty((n, 4))
    for column, rho in enumerate([0.0, 0.5, 0.8, -0.3]):
        e = np.zeros(n)
        for t in range(1, n):
            e[t] = rho * e[t - 1] + rng.normal()
        y[:, column] = x @ [1.0, 2.0, -1.0] + e
    import scipy.sparse as sp

    prepared = _ols.prepare(sp.csr_array(x * valid[:, None]), valid, n_interest=2, n_lags=1, t_weights=np.eye(2), f_weights=np.eye(2), ar1=True)
    packed = _ols.fit_columns(np.where(valid[:, None], y, np.nan), prepared)
    rows = _ols.output_rows((2, 1, 2, 2))
    for column in range(4):
        b = np.linalg.lstsq(x[valid], y[valid, column], rcond=None)[0]
        r = np.where(valid, y[:, column] - x @ b, 0.0)
        pairs = valid[1:] & valid[:-1]
        rho = np.round(np.sum(r[1:] * r[:-1] * pairs) / np.sum(r**2), 2)
        yw = (y[1:, column] - rho * y[:-1, column])[pairs]
        xw = (x[1:] - rho * x[:-1])[pairs]
        bw, rss = np.linalg.lstsq(xw, yw, rcond=None)[:2]
        dof = pairs.sum() - 3
        cov = rss[0] / dof * np.linalg.inv(xw.T @ xw)
        assert packed[rows["rho"], column] == pytest.approx(rho)
        np.testing.assert_allclose(packed[rows["beta"], column], bw[:2], rtol=1e-9)
        np.testing.assert_allclose(packed[rows["se"], column], np.sqrt(np.diag(cov))[:2], rtol=1e-9)
        np.testing.assert_allclose(packed[rows["t"], column], bw[:2] / np.sqrt(np.diag(cov))[:2], rtol=1e-9)
    assert packed[rows["rho"]][0, 2] == pytest.approx(0.8, abs=0.06)


def test_vertex_lost_while_the_face_is_found_is_fitted_on_its_own_samples(recording):
    ds = recording.dataset.copy()
    v = recording.v.copy()
    v[100:140, 0, 3, :] = np.nan  # one vertex missing for 40 frames, face still detected
    ds["v"] = (ds["v"].dims, da.from_array(v, chunks=(512, 1, 24, 3)))
    fit = gmfx.glm(ds, recording.events, window=(0, 1.0), motion=None, drift_order=1).compute()
    keep = np.isfinite(v[:, 0, 3, 0])
    design = gmfx.build_design(recording.events, ds["time"].values, window=(0, 1.0), drift_order=1, valid=keep)
    ols = sm.OLS(v[keep, 0, 3, 0].astype(np.float64), design.dense()[keep]).fit()
    np.testing.assert_allclose(fit["beta"].values[:, :, 0, 3, 0].ravel(), ols.params[:62], rtol=2e-4, atol=1e-8)
    assert np.isfinite(fit["beta"].values).all()


def test_same_results_on_several_chunkings(recording, fit):
    for time_chunk, vertex_chunk, fit_chunk in [(3000, 24, 5), (256, 8, None), (700, 24, 24)]:
        data = recording.dataset.copy()
        data["v"] = data["v"].chunk({"time": time_chunk, "vertex": vertex_chunk})
        other = gmfx.glm(data, recording.events, window=(0, 1.0), modulators=["intensity"], vertex_chunk=fit_chunk,
                         t_contrasts={"smile-frown": "smile - frown"}, f_contrasts={"smile": {"smile": 1}, "any": "smile + frown"})  # fmt: skip
        xr.testing.assert_allclose(other.compute(), fit, rtol=1e-5, atol=1e-9)


def test_building_the_fit_computes_nothing(recording):
    class Count(Callback):
        tasks = 0

        def _pretask(self, key, dsk, state):
            Count.tasks += 1

    with Count():
        result = gmfx.glm(recording.dataset, recording.events, window=(0, 1.0), ar1=True)
    assert Count.tasks == 0
    assert isinstance(result["beta"].data, da.Array) and isinstance(result["dof"].data, da.Array)


def _peak_bytes(ds, events) -> int:
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            gmfx.glm(ds, events, window=(0, 0.5)).compute()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_block_on_a_long_recording(tmp_path):
    """15 minutes at 30 fps, stored in vertex blocks as the preproc stage writes them: the fit holds a
    few blocks of 4 vertices over the whole recording (and the design), never the recording, so four
    times the vertices need no more memory."""
    long = synthetic_responses(27_000, n_vertices=160, n_lags=16, drift=0.0, time_chunk=4096, vertex_chunk=4, seed=2)
    long.dataset.to_zarr(tmp_path / "long.zarr", zarr_format=3, consolidated=False)
    ds = xr.open_zarr(tmp_path / "long.zarr", consolidated=False)
    whole = 27_000 * 160 * 3 * 8  # the recording in float64: 104 MB
    small, large = _peak_bytes(ds.isel(vertex=slice(0, 40)), long.events), _peak_bytes(ds, long.events)
    assert large < 1.2 * small, f"peak {large / 1e6:.0f} MB for 160 vertices, {small / 1e6:.0f} MB for 40"
    assert large < 0.3 * whole, f"peak {large / 1e6:.0f} MB for a {whole / 1e6:.0f} MB recording"


def test_glm_store_on_s3_equals_the_lazy_fit_and_carries_provenance(recording, fit, s3_root):
    source = s3_root.child("sub-01_task-x_preproc.zarr")
    write_lazy(recording.dataset.chunk({"time": 1500}), source, stage="preproc", progress=False)  # 2 regions: few requests
    remote = open_dataset(source, stage="preproc")
    result = gmfx.glm(remote, recording.events, window=(0, 1.0), modulators=["intensity"], vertex_chunk=12,
                      t_contrasts={"smile-frown": "smile - frown"}, f_contrasts={"smile": {"smile": 1}, "any": "smile + frown"})  # fmt: skip
    target = s3_root.child("sub-01_task-x_glm.zarr")
    stage.write_result(result, target, progress=False, source=source.url)
    stored = open_dataset(target, stage="glm")
    xr.testing.assert_allclose(stored[list(fit.data_vars)].compute(), fit, rtol=1e-5, atol=1e-9)
    design = json.loads(stored.attrs["gmfx_design"])
    assert design["t_contrasts"] == {"smile-frown": {"frown": -1.0, "smile": 1.0, "frown:intensity": 0.0, "smile:intensity": 0.0}}
    assert design["window"] == [0, 1.0] and design["motion"] == ["tx", "ty", "tz", "rx", "ry", "rz"]
    assert json.loads(stored.attrs["gmfx_versions"])["gmfx"] == gmfx.__version__
    assert stored.attrs["gmfx_source"] == source.url


def test_generate_reproduces_the_response_on_the_template(recording, fit):
    movie = gmfx.generate(fit, "smile", shape="template", gain=2.0).compute()
    template = recording.dataset["template"].values
    assert movie["v"].dims == ("time", "face", "vertex", "coord") and "tris" in movie
    np.testing.assert_allclose(movie["time"].values, recording.lags)
    error = movie["v"].values[:, 0] - template[None] - 2.0 * recording.response[1]
    assert np.abs(error).max() < 12 * fit["se"].values[1].max()
    np.testing.assert_allclose(movie["effect"].values[:, 0], 2 * np.linalg.norm(fit["beta"].values[1, :, 0], axis=-1), rtol=1e-5)
    coloured = gmfx.generate(fit, "smile", colour="F").compute()
    np.testing.assert_allclose(coloured["effect"].values[5, 0], fit["F"].values[0, 0].max(axis=-1), rtol=1e-6)


def _rotation(angle_deg, axis):
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_group_aligns_faces_and_matches_numpy():
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(40, 3)) * 0.05
    rotations = [np.eye(3), _rotation(20, 1), _rotation(-35, 0)]
    betas, ses, fits = [], [], []
    for index, rotation in enumerate(rotations):
        beta = rng.normal(size=(2, 5, 40, 3)) * 1e-3 + 5e-4  # in the reference frame
        se = rng.uniform(1e-4, 3e-4, size=(2, 5, 40, 3))
        betas.append(beta)
        ses.append(se)
        local = rotation.T  # this participant's local space is the reference rotated by rotation^T
        fits.append(xr.Dataset(
            {"beta": (("condition", "lag", "face", "vertex", "coord"), (beta @ local.T)[:, :, None]),
             "se": (("condition", "lag", "face", "vertex", "coord"), se[:, :, None]),
             "mean": (("face", "vertex", "coord"), (reference @ local.T + [0.01 * index, 0, 0])[None]),
             "dof": (("face",), [1000 + index])},
            coords={"condition": ["a", "b"], "lag": np.arange(5) / 30},
        ))  # fmt: skip
    result = gmfx.group(fits, reference="first").compute()
    np.testing.assert_allclose(result["maps"].values[1], rotations[1], atol=1e-10)
    aligned = np.stack(betas)
    np.testing.assert_allclose(result["subject_beta"].values[:, :, :, 0], aligned, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(result["beta"].values[:, :, 0], aligned.mean(0), rtol=1e-5, atol=1e-12)
    expected_t = scipy.stats.ttest_1samp(aligned, 0.0, axis=0).statistic
    np.testing.assert_allclose(result["random_t"].values[:, :, 0], expected_t, rtol=1e-4)
    assert int(result["random_dof"]) == 2 and int(result["fixed_dof"]) == 3003
    # fixed effects: inverse-variance weights, with each participant's variances carried through its rotation
    variances = np.stack([se**2 @ (rotation**2).T for se, rotation in zip(ses, rotations)])  # var'_d = sum_c R_dc^2 var_c
    weights = 1 / variances
    fixed = (weights * aligned).sum(0) / weights.sum(0)
    np.testing.assert_allclose(result["fixed_beta"].values[:, :, 0], fixed, rtol=1e-4)
    np.testing.assert_allclose(result["fixed_se"].values[:, :, 0], 1 / np.sqrt(weights.sum(0)), rtol=1e-4)


def test_components_match_numpy_svd():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(30, 3)) * 0.05
    directions = np.linalg.qr(rng.normal(size=(90, 3)))[0].T  # three orthonormal movement patterns
    datasets, rows = [], []
    for n in (400, 300):
        scores = rng.normal(size=(n, 3)) * [3e-3, 1.5e-3, 0.5e-3]
        movement = scores @ directions + rng.normal(size=(n, 90)) * 2e-5
        v = base[None] + movement.reshape(n, 30, 3)
        v[10:15] = np.nan
        rows.append(np.nan_to_num((v - np.nanmean(v, 0)).reshape(n, -1)))
        datasets.append(xr.Dataset({"v": (("time", "face", "vertex", "coord"), da.from_array(v[:, None].astype(np.float32), chunks=(128, 1, 30, 3)))},
                                   coords={"time": np.arange(n) / 30.0}))  # fmt: skip
    result = gmfx.components(datasets, n_components=3)
    assert isinstance(result["component"].data, da.Array)
    result = result.compute()
    stacked = np.concatenate(rows)
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    found = result["component"].values[:, 0].reshape(3, -1)
    np.testing.assert_allclose(np.abs((found * vt[:3]).sum(1)), 1, atol=1e-4)
    np.testing.assert_allclose(result["sd"].values, s[:3] / np.sqrt(stacked.shape[0] - 1), rtol=1e-4)
    np.testing.assert_allclose(result["explained_variance_ratio"].values, s[:3] ** 2 / (s**2).sum(), rtol=1e-4)
    movie = gmfx.generate(result, component=0, frames=20).compute()
    assert movie["v"].shape == (20, 1, 30, 3) and movie["effect"].shape == (20, 1, 30)


def test_bad_inputs_raise_clear_errors(recording):
    with pytest.raises(gmfx.EventsError, match="trial_type"):
        gmfx.glm(recording.dataset, recording.events.drop(columns="trial_type"))
    with pytest.raises(gmfx.ParameterError, match="unknown condition"):
        gmfx.glm(recording.dataset, recording.events, t_contrasts={"x": "smile - laugh"})
    late = pd.DataFrame({"onset": [10.0, 500.0], "trial_type": ["a", "late"]})
    with pytest.raises(gmfx.ParameterError, match="no valid sample.*late_lag0"):
        gmfx.glm(recording.dataset, late, window=(0, 0.5)).compute()
    with pytest.raises(gmfx.ParameterError, match="needs at least 2 fits"):
        gmfx.group([xr.Dataset()])


@pytest.mark.slow
def test_cli_glm_group_and_generate_on_a_dataset(tmp_path, dask_client):
    """gmfx glm (per recording and --group) and gmfx generate on a BIDS-like dataset, on a real cluster."""
    from typer.testing import CliRunner

    from gmfx.cli import app
    from gmfx.testing import write_bids_recording

    root, out = tmp_path / "study", Location(str(tmp_path / "study" / "derivatives" / "gmfx"))
    truths = []
    for index, subject in enumerate(["01", "02"]):
        recording = synthetic_responses(2400, n_vertices=20, n_lags=16, seed=10 + index)
        truths.append(recording)
        write_bids_recording(root, subject=subject, task="faces", video={"n_frames": 4}, events=recording.events)
        write_lazy(recording.dataset, out.child(f"sub-{subject}", f"sub-{subject}_task-faces_preproc.zarr"), stage="preproc", progress=False)
    common = [str(root), "--scheduler", dask_client.scheduler.address, "--no-progress"]
    result = CliRunner().invoke(app, ["glm", *common, "--window-end", "0.5", "--t-contrast", "diff=smile - frown", "--ar1", "--group"])
    assert result.exit_code == 0, result.output
    fit = open_dataset(out.child("sub-01", "sub-01_task-faces_glm.zarr"), stage="glm")
    assert list(fit["t_contrast"].values) == ["diff"] and "rho" in fit
    assert json.loads(fit.attrs["gmfx_design"])["ar1"] is True
    assert np.abs((fit["beta"].values[:, :, 0] - truths[0].response) / fit["se"].values[:, :, 0]).max() < 6
    combined = open_dataset(out.child("group", "task-faces_glm.zarr"), stage="glm")
    assert int(combined["random_dof"]) == 1 and combined.sizes["fit"] == 2
    result = CliRunner().invoke(app, ["generate", *common, "--condition", "smile", "--shape", "template", "--group"])
    assert result.exit_code == 0, result.output
    movie = open_dataset(out.child("group", "task-faces_cond-smile_generated.zarr"), stage="generate")
    expected = combined["template"].values[None, None] + combined["beta"].sel(condition="smile").values
    np.testing.assert_allclose(movie["v"].values, expected, rtol=1e-6, atol=1e-9)
    assert movie["effect"].dims == ("time", "face", "vertex") and "tris" in movie


def test_an_interrupted_glm_store_is_not_complete_and_resumes(recording, tmp_path):
    result = gmfx.glm(recording.dataset, recording.events, window=(0, 1.0), motion=None, vertex_chunk=8)
    target = Location(str(tmp_path / "sub-01_glm.zarr"))
    plan = stage.plan_result(result, target, stage="glm", source="synthetic")
    assert len(plan.tasks) == 3
    first = plan.tasks[0]
    first.function(*first.args)  # one block written, then the run stops
    with pytest.raises(gmfx.IncompleteStoreError):
        open_dataset(target, stage="glm")
    rerun = stage.plan_result(result, target, stage="glm", source="synthetic")
    assert [task.key for task in rerun.tasks] == [task.key for task in plan.tasks[1:]]  # only the missing blocks
    stage.write_result(result, target, progress=False, source="synthetic")
    xr.testing.assert_allclose(open_dataset(target, stage="glm")[list(result.data_vars)].compute(), result.compute(), rtol=1e-6)


def test_a_generated_movement_renders_with_its_effect_as_colour(fit, tmp_path):
    """gmfx.render draws generate's output like any mesh store, coloured by the per-vertex effect."""
    from PIL import Image

    movie = gmfx.generate(fit, "smile", shape="template", gain=20).compute()
    view = gmfx.ViewOptions(space="local", color="effect", size=(128, 128))
    still = np.asarray(Image.open(str(gmfx.render_still(movie, tmp_path / "peak.png", frame=10, view=view))))[..., :3].astype(float)
    face = still.sum(-1) > 0
    assert 0.1 < face.mean() < 0.9  # the face fills part of the picture
    assert still[face].std(axis=0).max() > 10  # vertices differ in colour: the effect is drawn
