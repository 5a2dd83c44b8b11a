"""Issue 9: never silently wrong. Stale outputs, missing chunks, moved datasets, implausible frame times,
damaged stores, read-only finished stores."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gmfx import FrameTimesError, StorageError, find_recordings
from gmfx._validate import FrameTimesWarning
from gmfx.stages.decode import plan_decode
from gmfx.stages.decode import run_decode as decode
from gmfx.stages.preproc import chain
from gmfx.stages.preproc import run_epochs as epochs
from gmfx.stages.preproc import run_preproc as preproc
from gmfx.stages.recon import plan_recon
from gmfx.storage import Location, RegionStore, open_dataset, store_location
from gmfx.testing import synthetic_face, write_bids_recording, write_synthetic_recon

FACE = synthetic_face(120, n_vertices=20, seed=3)
OTHER_FACE = synthetic_face(120, n_vertices=20, seed=4)
NO_FILTER = {"filter": False}
EVENTS = pd.DataFrame({"onset": [1.0, 2.0], "duration": [0.5, 0.5], "trial_type": ["smile", "frown"]})


def _dataset(root: Location, *, n_frames: int = 12, frametimes=None, events=EVENTS):
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=n_frames), frametimes=frametimes, events=events)
    (recording,) = find_recordings(root)
    return recording


def _completion(location: Location) -> str | None:
    return RegionStore(location, "any").attrs().get("gmfx_completion")


# -- 1. stale downstream outputs -------------------------------------------------------------------
def test_edited_events_file_is_recomputed_under_resume(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("derivatives", "gmfx")
    write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    preproc([recording], out, progress=False, **NO_FILTER)
    (target,) = epochs([recording], out, start=-0.2, end=0.4, progress=False)
    np.testing.assert_array_equal(open_dataset(target, stage="epoch")["onset"].values, [1.0, 2.0])
    edited = pd.DataFrame({"onset": [1.5, 2.5, 3.0], "duration": [0.5] * 3, "trial_type": ["a", "b", "c"]})
    edited.to_csv(recording.events.url, sep="\t", index=False)
    epochs([recording], out, start=-0.2, end=0.4, progress=False)  # --resume, the default
    written = open_dataset(target, stage="epoch")
    np.testing.assert_array_equal(written["onset"].values, [1.5, 2.5, 3.0])
    assert list(written["trial_type"].values) == ["a", "b", "c"]


def test_recon_redone_with_overwrite_makes_preproc_recompute(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("derivatives", "gmfx")
    recon_store = store_location(out, recording, "recon")
    write_synthetic_recon(recon_store, FACE, chunk=32)
    (target,) = preproc([recording], out, progress=False, **NO_FILTER)
    write_synthetic_recon(recon_store, OTHER_FACE, chunk=32)  # e.g. gmfx recon --overwrite with other options
    preproc([recording], out, progress=False, **NO_FILTER)
    expected = chain(open_dataset(recon_store, stage="recon"), filter=False).compute()
    np.testing.assert_allclose(open_dataset(target, stage="preproc")["v"].values, expected["v"].values, atol=1e-6)


# -- 2. missing chunks -------------------------------------------------------------------------------
def test_a_deleted_frames_chunk_is_refused_naming_the_store_and_chunk(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = Location(str(tmp_path / "out"))
    (frames,) = decode([recording], out, client=None, chunk_frames=4, segment_frames=4, progress=False)
    (tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr" / "u_plane" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StorageError, match="1 chunks of the decode store are missing") as info:
        plan_recon(recording, out, device="cpu")
    assert frames.url in str(info.value) and "u_plane/c/1/0/0" in str(info.value)
    assert "--overwrite" in str(info.value)


def test_a_deleted_recon_chunk_is_refused_by_preproc(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("out")
    recon_store = write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    fs, path = recon_store.filesystem()
    fs.rm(f"{path}/v/c/2/0/0/0")
    with pytest.raises(StorageError, match="v/c/2/0/0/0") as info:
        preproc([recording], out, progress=False, **NO_FILTER)
    assert recon_store.url in str(info.value)
    assert RegionStore(store_location(out, recording, "preproc"), "preproc").attrs() is None


# -- 3. a moved dataset keeps its plans ------------------------------------------------------------
def test_a_moved_dataset_needs_no_overwrite_and_recomputes_nothing(tmp_path):
    first = Location(str(tmp_path / "first" / "bids"))
    recording = _dataset(first, frametimes=np.arange(12) / 25 + 0.5)
    out = first.child("derivatives", "gmfx")
    decode([recording], out, client=None, chunk_frames=4, progress=False)
    write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    preproc([recording], out, progress=False, **NO_FILTER)
    epochs([recording], out, start=-0.2, end=0.4, progress=False)
    stages = ("decode", "preproc", "epoch")
    tokens = {stage: _completion(store_location(out, recording, stage)) for stage in stages}
    shutil.move(tmp_path / "first", tmp_path / "second")
    moved_root = Location(str(tmp_path / "second" / "bids"))
    (moved,) = find_recordings(moved_root)
    moved_out = moved_root.child("derivatives", "gmfx")
    assert plan_decode(moved, moved_out, chunk_frames=4).tasks == []
    preproc([moved], moved_out, progress=False, **NO_FILTER)
    epochs([moved], moved_out, start=-0.2, end=0.4, progress=False)
    assert {stage: _completion(store_location(moved_out, moved, stage)) for stage in stages} == tokens


# -- 4. implausible frame times --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("times", "message"),
    [
        (np.arange(12) * 40.0, r"span 440 s and median interval 40 s in the frame times, but 0.44 s and 0.04 s"),
        (np.r_[np.arange(11) * 0.04, 44.2], r"span 44.2 s and median interval 0.04 s in the frame times, but 0.44 s"),
    ],
)
def test_implausible_frame_times_are_refused_with_both_numbers(tmp_path, times, message):
    recording = _dataset(Location(str(tmp_path / "bids")), frametimes=times)
    with pytest.raises(FrameTimesError, match=message) as info:
        plan_decode(recording, Location(str(tmp_path / "out")))
    assert recording.frametimes.url in str(info.value) and recording.video.url in str(info.value)


def test_slightly_different_frame_times_warn_and_are_used(tmp_path):
    times = np.arange(12) * 0.042  # a camera clock 5% slower than the container's 25 fps
    recording = _dataset(Location(str(tmp_path / "bids")), frametimes=times)
    with pytest.warns(FrameTimesWarning, match="median interval 0.042 s in the frame times, but 0.44 s and 0.04 s"):
        plan = plan_decode(recording, Location(str(tmp_path / "out")))
    np.testing.assert_allclose(xr.open_zarr(plan.store.location.url, consolidated=False)["time"].values, times)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameTimesWarning)
        plan_decode(_dataset(Location(str(tmp_path / "exact")), frametimes=np.arange(12) / 25), Location(str(tmp_path / "o2")))


# -- 9. damaged stores ------------------------------------------------------------------------------
def test_truncated_zarr_json_names_the_store_and_overwrite_recovers(tmp_path):
    recording = _dataset(Location(str(tmp_path / "bids")))
    out = Location(str(tmp_path / "out"))
    (frames,) = decode([recording], out, client=None, chunk_frames=4, progress=False)
    metadata = tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr" / "zarr.json"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(StorageError, match="damaged") as info:
        plan_decode(recording, out, chunk_frames=4)
    assert str(metadata) in str(info.value) and "--overwrite" in str(info.value)
    decode([recording], out, client=None, chunk_frames=4, overwrite=True, progress=False)
    assert open_dataset(frames, stage="decode").sizes["time"] == 12


# -- smaller ones -----------------------------------------------------------------------------------
def test_a_rerun_leaves_a_finished_store_untouched(tmp_path):
    recording = _dataset(Location(str(tmp_path / "bids")))
    out = Location(str(tmp_path / "out"))
    decode([recording], out, client=None, chunk_frames=4, progress=False)
    store = tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    decode([recording], out, client=None, chunk_frames=4, progress=False)  # nothing to do: nothing written
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_a_truncated_frames_chunk_names_the_store_and_the_chunk(tmp_path):
    from gmfx.stages.recon import run_recon as recon
    from gmfx.testing import BrightSquareBackend

    recording = _dataset(Location(str(tmp_path / "bids")))
    out = Location(str(tmp_path / "out"))
    (frames,) = decode([recording], out, client=None, chunk_frames=4, segment_frames=4, progress=False)
    shard = tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr" / "y_plane" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(StorageError, match="frames 4-7 of the decode store cannot be read") as info:
        recon([recording], out, client=None, model=BrightSquareBackend, device="cpu", segment_frames=4, progress=False)
    assert frames.url in str(info.value) and "y_plane/c/1/0/0" in str(info.value)
    assert not RegionStore(store_location(out, recording, "recon"), "recon").is_complete()


# -- 8. S3 faults -------------------------------------------------------------------------------------
def test_dropped_s3_connections_are_transient_and_retried(monkeypatch):
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    from gmfx.storage._retry import is_transient, retry_transient

    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "3")
    failures = [EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), ConnectionClosedError(endpoint_url="x")]
    assert all(is_transient(error) for error in failures)

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "written"

    assert retry_transient(flaky, what="writing", where="s3://b/x.zarr", backoff=0.01) == "written"


def test_an_unreachable_s3_dataset_is_one_clear_error():
    from gmfx import DatasetError

    options = {"key": "a", "secret": "b", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
               "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    with pytest.raises(DatasetError, match="cannot be listed .*EndpointConnectionError") as info:
        find_recordings(Location("s3://bucket/study", options))
    assert "s3://bucket/study" in str(info.value)


# -- 7. teardown and start-up of the local cluster ---------------------------------------------------
def test_a_failing_cluster_shutdown_is_logged_not_raised(monkeypatch, caplog):
    from distributed import LocalCluster

    from gmfx.cluster import connect

    original = LocalCluster.close

    def close_then_time_out(self, timeout=None):
        original(self, timeout=timeout)
        raise TimeoutError("the workers did not stop in time")

    monkeypatch.setattr(LocalCluster, "close", close_then_time_out)
    with connect(workers=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
    assert "closing the local cluster failed (TimeoutError" in caplog.text


def test_a_cluster_that_does_not_start_fails_with_a_clear_message():
    import time

    from gmfx import ClusterError
    from gmfx.cluster import _start

    with pytest.raises(ClusterError, match="did not start within 0.2 s"):
        _start(lambda: time.sleep(2), 3, timeout=0.2)


# -- 10. a deterministic task error runs once -----------------------------------------------------------
def _count_and_fail(counter: str) -> None:
    with open(counter, "a") as handle:
        handle.write("x")
    raise StorageError("deliberate", where="here", fix="none")


def test_a_gmfx_error_in_a_task_is_not_retried(tmp_path, dask_client):
    from gmfx._execute import run_tasks
    from gmfx.types import Task

    counter = tmp_path / "calls"
    task = Task(key=f"fail-once-{tmp_path.name}", function=_count_and_fail, args=(str(counter),))
    with pytest.raises(StorageError, match="deliberate"):
        run_tasks(dask_client, [task], description="test", retries=2, progress=False)
    assert counter.read_text() == "x"


# -- 6. option values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "abc"])
def test_bad_storage_retries_are_a_parameter_error(monkeypatch, value):
    from gmfx import ParameterError
    from gmfx.storage._retry import storage_retries

    monkeypatch.setenv("GMFX_STORAGE_RETRIES", value)
    with pytest.raises(ParameterError, match="GMFX_STORAGE_RETRIES"):
        storage_retries()


# -- smaller ones ---------------------------------------------------------------------------------------
def test_a_dataset_folder_with_glob_characters_is_found(tmp_path):
    root = Location(str(tmp_path / "study[1]*"))
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=4))
    (recording,) = find_recordings(root)
    assert recording.video.url.startswith(root.url)


# -- 5. one recording must not sink a dataset ----------------------------------------------------------
def _bright_frames(n: int, bright: range) -> list[np.ndarray]:
    dark = np.full((64, 64, 3), 10, np.uint8)
    return [np.full((64, 64, 3), 200, np.uint8) if i in bright else dark for i in range(n)]


def test_a_short_face_and_a_broken_video_do_not_sink_the_other_recordings(tmp_path):
    from gmfx._validate import ShortStretchWarning
    from gmfx.pipeline import run_pipeline
    from gmfx.testing import BrightSquareBackend

    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=dict(frames=_bright_frames(100, range(10, 20))))
    write_bids_recording(root, subject="02", task="x", video=dict(frames=_bright_frames(100, range(100))))
    write_bids_recording(root, subject="03", task="x", video=b"not a video at all")
    recordings = find_recordings(root)
    out = Location(str(tmp_path / "out"))
    with pytest.warns(ShortStretchWarning, match=r"recording sub-01_task-x: 1 stretches .* left NaN: 0\.40-0\.7\d s"):
        summaries, _ = run_pipeline(
            recordings, out, client=None, progress=False,
            recon_options={"model": BrightSquareBackend, "device": "cpu"},
            preproc_options={"filter": {"highpass": 0.005, "lowpass": 4.0}},
        )  # fmt: skip
    by_name = {summary.recording: summary for summary in summaries}
    assert by_name["sub-03_task-x"].failed_stage == "decode" and "video" in by_name["sub-03_task-x"].error
    assert by_name["sub-01_task-x"].failed_stage is None and by_name["sub-02_task-x"].failed_stage is None
    short = open_dataset(store_location(out, recordings[0], "preproc"), stage="preproc")["v"].values
    full = open_dataset(store_location(out, recordings[1], "preproc"), stage="preproc")["v"].values
    assert np.isnan(short).all() and np.isfinite(full).all()  # also the last sample (the grid's end is clipped)


# -- 6. validation before work -----------------------------------------------------------------------
def test_options_and_events_are_checked_before_decode_starts(tmp_path):
    from gmfx import EventsError, ParameterError
    from gmfx._validate import check_pipeline

    events = pd.DataFrame({"onset": [1.0, 2.0], "duration": [0.5, 0.0], "trial_type": ["a", "b"]})
    recording = _dataset(Location(str(tmp_path / "bids")), frametimes=np.arange(12) / 25, events=events)
    ok = {"filter": {"highpass": 0.005, "lowpass": 4.0}}
    with pytest.raises(ParameterError, match=r"recording sub-01_task-x: the lowpass cut-off 20 Hz .* Nyquist frequency 12.5 Hz"):
        check_pipeline([recording], preproc_options={"filter": {"highpass": None, "lowpass": 20.0}}, epoch_options={})
    with pytest.raises(ParameterError, match="--sampling-freq"):
        check_pipeline([recording], preproc_options={"interpolate": {"sampling_freq": 0}}, epoch_options={})
    with pytest.raises(ParameterError, match="epoch end"):
        check_pipeline([recording], preproc_options=ok, epoch_options={"start": 1.0, "end": 0.5})
    with pytest.raises(EventsError, match="row 2 has 0 s") as info:
        check_pipeline([recording], preproc_options=ok, epoch_options={"anchor": "warp"})
    assert recording.events.url in str(info.value)
    check_pipeline([recording], preproc_options=ok, epoch_options={"anchor": "onset"})
    assert not (tmp_path / "bids" / "derivatives").exists()


def test_cli_sampling_freq_zero_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from gmfx.cli import app

    _dataset(Location(str(tmp_path / "bids")))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "bids"), "--sampling-freq", "0", "--no-progress"])
    assert result.exit_code == 1 and "--sampling-freq" in result.output
    assert not (tmp_path / "bids" / "derivatives").exists()


def test_comma_separated_tables_are_named_as_such(tmp_path):
    from gmfx import EventsError
    from gmfx.preproc._epochs import read_events

    recording = _dataset(Location(str(tmp_path / "bids")), frametimes="t,x\n" + "".join(f"{i / 25},0\n" for i in range(12)))
    with pytest.raises(FrameTimesError, match="comma-separated"):
        plan_decode(recording, Location(str(tmp_path / "out")))
    recording.events.filesystem()[0].pipe_file(recording.events.url, b"onset,duration\n1.0,0.5\n")
    with pytest.raises(EventsError, match="comma-separated"):
        read_events(recording.events)


def test_numeric_secret_storage_options_stay_text():
    from gmfx.storage import parse_storage_options

    options = parse_storage_options(["key=123", "secret=456", "config_kwargs.retries.max_attempts=3", "default_block_size=1024"])
    assert options == {"key": "123", "secret": "456", "config_kwargs": {"retries": {"max_attempts": 3}}, "default_block_size": 1024}


def test_a_rerun_with_nothing_to_do_does_not_redo_align_and_interpolate(tmp_path, monkeypatch):
    import gmfx.stages.preproc as stage

    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("out")
    write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    options = {"filter": {"highpass": 0.2, "lowpass": 5.0, "order": 3}}
    (target,) = preproc([recording], out, progress=False, **options)
    token = _completion(target)
    planned = []
    monkeypatch.setattr(stage, "plan_lazy", lambda *args, **kwargs: planned.append(args) or pytest.fail("replanned"))
    preproc([recording], out, progress=False, **options)
    assert planned == [] and _completion(target) == token


def test_a_display_rotation_is_recorded_and_reported(tmp_path):
    import av

    from gmfx.stages.decode import RotationWarning

    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    with av.open(recording.video.url, "w") as container:  # a portrait phone video: coded landscape, shown rotated
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.warns(RotationWarning, match="sub-01_task-x: the video asks players to rotate it by 90 degrees"):
        (frames,) = decode([recording], Location(str(tmp_path / "out")), client=None, progress=False)
    ds = open_dataset(frames, stage="decode")
    assert ds.attrs["source_rotation"] == 90 and ds.sizes["y"] == 48 and ds.sizes["x"] == 64
