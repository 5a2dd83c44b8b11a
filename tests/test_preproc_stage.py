"""The preproc and epochs stages: stores on local disk and S3, on a real Dask cluster, resumable."""

import warnings

import dask
import numpy as np
import pytest
import xarray as xr

from gmfx import EventsError, IncompleteStoreError, ParameterError
from gmfx.dataset import Recording
from gmfx.stages.preproc import chain, run_chain, run_epochs, run_preproc
from gmfx.storage import Location, RegionStore, open_dataset, store_location
from gmfx.testing._synthetic import synthetic_face, write_synthetic_recon

FACE = synthetic_face(240, n_vertices=50, time_jitter=0.2, gaps=((40, 44), (100, 130)), seed=11)
FILTER = {"highpass": 0.2, "lowpass": 5.0, "order": 3}


def _recording(root: Location, events: bool = True) -> Recording:
    events_location = root.child("sub-01", "sub-01_task-faces_events.tsv") if events else None
    if events_location is not None:
        fs, path = events_location.filesystem()
        fs.makedirs(fs._parent(path), exist_ok=True)
        with events_location.open("wb") as handle:
            handle.write(b"onset\tduration\ttrial_type\n2.0\t1.0\tsmile\n5.5\t0.5\tfrown\n")
    return Recording(
        root=root,
        subject="01",
        task="faces",
        video=root.child("sub-01", "sub-01_task-faces_video.mp4"),
        events=events_location,
    )


def _write_recon(out: Location, recording: Recording) -> Location:
    return write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)


def _expected(out: Location, recording: Recording) -> xr.Dataset:
    lazy = chain(open_dataset(store_location(out, recording, "recon"), stage="recon"), filter=FILTER)
    return lazy.compute()


def test_chain_on_s3_equals_local_and_the_lazy_result(tmp_path, s3_root):
    results = []
    for root in (Location(str(tmp_path / "bids")), s3_root):
        recording = _recording(root)
        out = root.child("derivatives", "gmfx")
        _write_recon(out, recording)
        (location,) = run_preproc([recording], out, filter=FILTER, progress=False)
        assert location == store_location(out, recording, "preproc")
        written = open_dataset(location, stage="preproc")
        assert not RegionStore(Location(location.url.removesuffix(".zarr") + "-scratch.zarr", location.storage_options), "preproc").attrs()
        results.append(written)
        (epoch_location,) = run_epochs([recording], out, start=-0.2, end=0.5, progress=False)
        results.append(open_dataset(epoch_location, stage="epoch"))
    local, local_epochs, remote, remote_epochs = results
    expected = _expected(Location(str(tmp_path / "bids" / "derivatives" / "gmfx")), _recording(Location(str(tmp_path / "bids"))))
    np.testing.assert_allclose(local.v.values, expected.v.values, atol=1e-6)
    np.testing.assert_allclose(local.motion.values, expected.motion.values, atol=1e-5)
    np.testing.assert_array_equal(local.detected.values, expected.detected.values)
    xr.testing.assert_equal(local.v.load(), remote.v.load())
    xr.testing.assert_equal(local_epochs.v.load(), remote_epochs.v.load())
    assert local.attrs["gmfx_history"] == remote.attrs["gmfx_history"]
    assert [h.split('"')[3] for h in local.attrs["gmfx_history"]] == ["align", "interpolate", "filter"]
    assert local_epochs.v.dims == ("epoch", "lag", "face", "vertex", "coord")
    assert list(local_epochs.trial_type.values) == ["smile", "frown"]


def test_stage_on_a_dask_cluster_without_filter_and_resume(tmp_path, dask_client):
    root = Location(str(tmp_path / "bids"))
    recording = _recording(root)
    out = root.child("out")
    _write_recon(out, recording)
    target = store_location(out, recording, "preproc")
    run_preproc([recording], out, client=dask_client, filter=False, interpolate={"method": "pchip"}, progress=False)
    written = open_dataset(target, stage="preproc")
    expected = chain(open_dataset(store_location(out, recording, "recon"), stage="recon"),
                     interpolate={"method": "pchip"}, filter=False)  # fmt: skip
    np.testing.assert_allclose(written.v.values, expected.v.values, atol=1e-6)
    # an interrupted run (one region lost) is not complete; a rerun writes only the missing region
    fs, path = target.filesystem()
    fs.rm(f"{path}/_gmfx/regions/000002")
    RegionStore(target, "preproc").attrs()
    group_attrs = fs.cat_file(f"{path}/zarr.json")
    fs.pipe_file(f"{path}/zarr.json", group_attrs.replace(b'"gmfx_complete": true', b'"gmfx_complete": false'))
    with pytest.raises(IncompleteStoreError):
        open_dataset(target, stage="preproc")
    run_preproc([recording], out, client=dask_client, filter=False, interpolate={"method": "pchip"}, progress=False)
    np.testing.assert_allclose(open_dataset(target, stage="preproc").v.values, expected.v.values, atol=1e-6)


def test_filter_stage_runs_on_the_cluster(tmp_path, dask_client):
    out = Location(str(tmp_path / "out"))
    source = write_synthetic_recon(out.child("a_recon.zarr"), FACE, chunk=32)
    (target,) = run_chain([source], [out.child("a_preproc.zarr")], client=dask_client, filter=FILTER, progress=False)
    expected = chain(open_dataset(source, stage="recon"), filter=FILTER)
    np.testing.assert_allclose(open_dataset(target, stage="preproc").v.values, expected.v.values, atol=1e-6)


def test_epochs_without_events_file_is_an_events_error(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _recording(root, events=False)
    with pytest.raises(EventsError, match="no events file") as info:
        run_epochs([recording], root.child("out"), progress=False)
    assert "sub-01_task-faces_events.tsv" in str(info.value)


def test_string_coordinates_are_written_without_zarr_warnings_and_read_back(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _recording(root)
    out = root.child("out")
    _write_recon(out, recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (location,) = run_preproc([recording], out, filter=FILTER, progress=False)
        (epoch_location,) = run_epochs([recording], out, start=-0.2, end=0.5, progress=False)
    unstable = [str(w.message) for w in caught if "specification" in str(w.message) or "UTF32" in str(w.message)]
    assert not unstable
    written, cut = open_dataset(location, stage="preproc"), open_dataset(epoch_location, stage="epoch")
    assert list(written.coord.values) == ["x", "y", "z"]
    assert list(written.motion_param.values)[:3] == ["tx", "ty", "tz"]
    assert list(cut.trial_type.values) == ["smile", "frown"] and list(cut.coord.values) == ["x", "y", "z"]


def test_epochs_with_an_events_file_without_rows_is_an_events_error(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _recording(root)
    out = root.child("out")
    _write_recon(out, recording)
    run_preproc([recording], out, filter=False, interpolate=False, progress=False)
    with recording.events.open("wb") as handle:
        handle.write(b"onset\tduration\ttrial_type\n")
    with pytest.raises(EventsError, match="no events") as info:
        run_epochs([recording], out, progress=False)
    assert "sub-01_task-faces_events.tsv" in str(info.value)
    assert "add one row per event" in str(info.value)


@pytest.mark.parametrize("reference", ["first", "mean"])
def test_whole_recording_references_are_computed_once_and_give_the_lazy_result(tmp_path, reference):
    out = Location(str(tmp_path / "out"))
    source = write_synthetic_recon(out.child("a_recon.zarr"), FACE, chunk=32)
    options = {"reference": reference}
    (target,) = run_chain([source], [out.child("a_preproc.zarr")], align=options, filter=False, progress=False)
    expected = chain(open_dataset(source, stage="recon"), align=options, filter=False)
    written = open_dataset(target, stage="preproc")
    np.testing.assert_allclose(written.v.values, expected.v.values, atol=1e-6)
    assert written.attrs["gmfx_history"] == expected.attrs["gmfx_history"]
    # the speed-up: one region's graph reads its own source chunk only (the reference is computed once,
    # not a reduction over every chunk that each region task would recompute)
    from gmfx.preproc._api import _frames
    from gmfx.stages.preproc import _global_references

    recon = open_dataset(source, stage="recon")
    given = _global_references(recon, options, None)
    assert given["reference"].shape == (1, FACE.v.shape[2], 3) and given["reference"].attrs["gmfx_reference"] == reference
    source_name = recon["v"].data.name

    def region_reads(align) -> set:  # the source chunks that the first 32-frame region's graph reads
        region = _frames(chain(recon, align=align, filter=False)["v"].data, 0, 32)
        needed = region.__dask_graph__().cull(set(dask.core.flatten(region.__dask_keys__())))
        return {key for key in dict(needed) if isinstance(key, tuple) and key[0] == source_name}

    reads = region_reads(given)
    assert reads == region_reads({"reference": "template"}) and len(reads) < recon["v"].data.numblocks[0], sorted(reads)


def test_a_region_task_fits_only_its_own_frames_and_the_interpolation_halo(tmp_path):
    """The per-frame speed-up of align -> interpolate: a region task of the stage fits the alignment of its own
    frames and the few halo frames interpolation reads, not the whole neighbouring chunks (3x the work)."""
    from dask.callbacks import Callback

    from gmfx.stages.preproc import plan_lazy

    chunk = 64
    source = write_synthetic_recon(Location(str(tmp_path / "a_recon.zarr")), synthetic_face(5 * chunk, n_vertices=20, seed=2), chunk=chunk)
    lazy = chain(open_dataset(source, stage="recon"), align={"reference": "template"}, interpolate={"max_gap": 0.2}, filter=False)
    plan = plan_lazy(lazy, Location(str(tmp_path / "a_preproc.zarr")), stage="preproc", source="test")
    fitted: list[int] = []

    class CountFits(Callback):  # the frames of every alignment fit the task computes
        def _posttask(self, key, result, dsk, state, worker_id):
            if "fit_block-" in str(key[0] if isinstance(key, tuple) else key):
                fitted.append(result.shape[0])

    task = plan.tasks[2]  # a middle region: neighbours on both sides
    with CountFits():
        task.function(*task.args)
    halo = int(np.ceil(2 * 0.2 * 30)) + 2 + 1  # 2 x max_gap of frames at 30 fps, the method's halo, rounding
    assert len(fitted) == 1 and chunk <= fitted[0] <= chunk + 2 * halo, fitted  # one fit, shared by v, mat, motion
    # the same values as align then interpolate without recipes (every frame sliced from the aligned result)
    from gmfx.preproc import align, interpolate

    plain = interpolate(align(open_dataset(source, stage="recon"), reference="template"), max_gap=0.2)
    written = open_dataset(plan.store.location, stage="preproc", require_complete=False)
    region = slice(2 * chunk, 3 * chunk)
    for name in ("v", "mat", "motion"):
        np.testing.assert_allclose(written[name][region].values, plain[name][region].values, atol=1e-5, err_msg=name)
    with pytest.raises(ParameterError, match="frame recipes for \\['template'\\]"):
        interpolate(plain, frames={"template": lambda lo, hi: None})
