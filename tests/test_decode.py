"""The decode stage: video -> frames store, on every storage, on a real cluster, with resume and bad input."""

from __future__ import annotations

import json
import re

import av
import dask
import numpy as np
import pytest
import zarr
from distributed import Client

import gmfx.stages.decode as decode_stage
from gmfx._errors import FrameTimesError, IncompleteStoreError, ParameterError, StorageError, VideoError
from gmfx.dataset import Recording, find_recordings
from gmfx.stages.decode import default_chunk_frames, open_frames, plan_decode, run_decode
from gmfx.storage import Location, RegionStore, store_location
from gmfx.testing._videos import write_bids_recording, write_video

VFR_TIMES = np.cumsum(np.r_[0.1, np.random.default_rng(3).uniform(0.01, 0.1, 49)])
FRAME_TIMES = 100.0 + np.cumsum(np.random.default_rng(5).uniform(0.03, 0.04, 40))

CONTRACT_ATTRS = {
    "gmfx_version", "source", "frame_times_source", "codec", "source_width", "source_height", "width",
    "height", "time_base", "n_frames", "chunk_frames", "gmfx_stage", "gmfx_plan", "gmfx_complete",
}  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, data_dir) -> Location:
    """A BIDS-like dataset with the two real clips and generated videos of every kind."""
    root = Location(str(tmp_path_factory.mktemp("bids")))
    write_bids_recording(root, subject="01", task="real", video=data_dir / "single_face.mp4")
    write_bids_recording(root, subject="02", task="real", video=data_dir / "no_face.mp4")
    write_bids_recording(root, subject="03", task="gen", video=dict(n_frames=50, times=VFR_TIMES, keyint=8, bframes=2))
    write_bids_recording(
        root, subject="04", session="1", task="gen", video=dict(n_frames=30, width=97, height=75, pix_fmt="yuv444p")
    )
    write_bids_recording(
        root, subject="05", task="gen", run="1", extension=".mkv", video=dict(n_frames=45, keyint=7, bframes=3)
    )
    write_bids_recording(
        root, subject="06", task="times", video=dict(n_frames=40, keyint=10), frametimes=FRAME_TIMES
    )
    return root


def recordings(dataset: Location, task: str) -> list[Recording]:
    return find_recordings(dataset, task=task)


def sequential_decode(video: Location) -> tuple[np.ndarray, np.ndarray]:
    """The plain PyAV loop: every frame in order, and pts x time_base."""
    with video.open() as handle, av.open(handle) as container:
        stream = container.streams.video[0]
        decoded = [(f.pts * float(stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    return np.stack([a for _, a in decoded]), np.array([t for t, _ in decoded])


def assert_store_equals_video(location: Location, recording: Recording, *, chunk_frames: int | None = None) -> None:
    frames, times = sequential_decode(recording.video)
    # read in this process: a default client's worker processes do not see this process's memory://
    with dask.config.set(scheduler="synchronous"):
        ds = open_frames(location).load()
    assert ds["frames"].dims == ("time", "y", "x", "rgb")
    assert ds["frames"].dtype == np.uint8
    np.testing.assert_array_equal(ds["frames"].values, frames)
    expected_times = times if recording.frametimes is None else FRAME_TIMES
    np.testing.assert_array_equal(ds["time"].values, expected_times)
    np.testing.assert_array_equal(ds["frame"].values, np.arange(len(frames)))
    assert ds["frame"].dims == ("time",) and ds["frame"].dtype == np.int64
    assert CONTRACT_ATTRS <= set(ds.attrs)
    assert ds.attrs["gmfx_complete"] is True
    assert ds.attrs["n_frames"] == len(frames)
    assert (ds.attrs["height"], ds.attrs["width"]) == frames.shape[1:3]
    assert ds.attrs["source"] == recording.video.url
    chunk = ds.attrs["chunk_frames"]
    if chunk_frames is not None:
        assert chunk == chunk_frames
    kwargs = {} if location.is_local else {"storage_options": dict(location.storage_options)}
    group = zarr.open_group(location.url, mode="r", zarr_format=3, **kwargs)
    stored = ["frames"] if ds.attrs["frames_layout"] == "rgb" else ["y_plane", "u_plane", "v_plane"]
    assert sorted(name for name, _ in group.arrays()) == sorted([*stored, "time", "frame"])
    for name in stored:
        assert group[name].chunks[0] == chunk and group[name].shards[0] == ds.attrs["shard_frames"]
        assert "zstd" in type(group[name].compressors[0]).__name__.lower()


# -- results equal a plain decode ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "chunk_frames", "segment_frames"),
    [
        ("real", None, None),  # defaults: one segment each
        ("real", 8, 24),  # several chunks per segment
        ("gen", 4, 4),  # one chunk per segment
        ("gen", 1, 1),  # one frame per segment
        ("times", 6, 12),
    ],
)
def test_stores_equal_a_sequential_decode_on_a_cluster(
    dask_client, dataset, tmp_path, task, chunk_frames, segment_frames
):
    selected = recordings(dataset, task)
    out = Location(str(tmp_path / "out"))
    stores = run_decode(
        selected, out, client=dask_client, chunk_frames=chunk_frames, segment_frames=segment_frames, progress=False
    )
    assert stores == [store_location(out, r, "decode") for r in selected]
    for store, recording in zip(stores, selected):
        assert_store_equals_video(store, recording, chunk_frames=chunk_frames)
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"


def test_round_trip_on_every_storage(any_root, dataset):
    selected = [r for r in recordings(dataset, "gen") if r.subject == "03"]
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        (store,) = run_decode(selected, any_root, client=client, chunk_frames=8, segment_frames=16, progress=False)
    assert store.url.endswith("sub-03/sub-03_task-gen_frames.zarr")
    assert_store_equals_video(store, selected[0], chunk_frames=8)
    np.testing.assert_allclose(open_frames(store)["time"].values, VFR_TIMES, atol=1 / 90000)
    assert any_root.child("dataset_description.json").exists()
    again = plan_decode(selected[0], any_root, chunk_frames=8, segment_frames=16)
    assert again.tasks == [] and again.regions == 4


def test_dataset_on_s3_decoded_by_worker_processes(dask_client, s3_root):
    root = s3_root.child("study")
    write_bids_recording(root, subject="01", task="s3", video=dict(n_frames=36, keyint=6, bframes=2))
    write_bids_recording(root, subject="02", task="s3", video=dict(n_frames=20, width=97, height=75, pix_fmt="yuv444p"))
    selected = find_recordings(root)
    out = s3_root.child("out")
    stores = run_decode(selected, out, client=dask_client, chunk_frames=8, segment_frames=16, progress=False)
    for store, recording in zip(stores, selected):
        assert store.url.startswith("s3://")
        assert_store_equals_video(store, recording, chunk_frames=8)


def test_frame_times_tsv_is_used(dataset, tmp_path):
    (recording,) = recordings(dataset, "times")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        (store,) = run_decode([recording], Location(str(tmp_path)), client=client, chunk_frames=16, progress=False)
    ds = open_frames(store)  # the time coordinate is in memory, no computation
    np.testing.assert_array_equal(ds["time"].values, FRAME_TIMES)
    assert ds.attrs["frame_times_source"] == recording.frametimes.url


def test_downscaled_store(dataset, tmp_path):
    recording = next(r for r in recordings(dataset, "real") if r.subject == "01")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        (store,) = run_decode([recording], Location(str(tmp_path)), client=client, max_size=160, progress=False)
    with dask.config.set(scheduler="synchronous"):
        ds = open_frames(store).load()
    assert ds["frames"].shape == (72, 90, 160, 3)
    sizes = [ds.attrs[name] for name in ("width", "height", "source_width", "source_height")]
    assert sizes == [160, 90, 640, 360]
    with av.open(recording.video.url) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24", width=160, height=90, interpolation="AREA")
    np.testing.assert_array_equal(ds["frames"][0].values, first)


# -- planning, resume, determinism -----------------------------------------------------------------
def test_task_keys_are_deterministic_and_cover_the_video(dataset, tmp_path):
    recording = next(r for r in recordings(dataset, "gen") if r.subject == "05")
    out = Location(str(tmp_path))
    first = plan_decode(recording, out, chunk_frames=4, segment_frames=10)
    second = plan_decode(recording, out, chunk_frames=4, segment_frames=10)
    assert [t.key for t in first.tasks] == [t.key for t in second.tasks]
    assert len({t.key for t in first.tasks}) == first.regions == 4  # 45 frames, 12 a segment
    assert all(t.key.startswith("decode-sub-05_task-gen_run-1-") for t in first.tasks)
    assert sum(t.weight for t in first.tasks) == 45
    assert first.attrs["shard_frames"] == 12 and first.attrs["frames_layout"] == "planes"


def test_resume_decodes_only_the_missing_regions(dataset, tmp_path, monkeypatch):
    recording = next(r for r in recordings(dataset, "gen") if r.subject == "05")
    out = Location(str(tmp_path / "resumed"))
    real_iter_decoded = decode_stage.iter_decoded
    decoded_starts: list[int] = []
    failing_start = None

    def counting_iter_decoded(video, index, start, stop, **kwargs):
        decoded_starts.append(start)
        if start == failing_start:  # fails every time, retries included
            raise OSError("injected failure: disk unplugged")
        return real_iter_decoded(video, index, start, stop, **kwargs)

    monkeypatch.setattr(decode_stage, "iter_decoded", counting_iter_decoded)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        failing_start = 36  # the last of 4 regions of 12 frames
        with pytest.raises(Exception, match="injected failure"):
            run_decode([recording], out, client=client, chunk_frames=4, segment_frames=12, progress=False)
        store = RegionStore(store_location(out, recording, "decode"), "decode")
        assert not store.is_complete()
        with pytest.raises(IncompleteStoreError):
            open_frames(store.location)
        done = store.done_regions()
        missing = sorted(set(range(4)) - done)
        assert 3 in missing and len(missing) < 4

        failing_start = None
        plan = plan_decode(recording, out, chunk_frames=4, segment_frames=12)
        assert [int(t.key.rsplit("-", 1)[1]) for t in plan.tasks] == missing
        decoded_starts.clear()
        run_decode([recording], out, client=client, chunk_frames=4, segment_frames=12, progress=False)
        assert sorted(decoded_starts) == [12 * i for i in missing]
        clean = run_decode(
            [recording], Location(str(tmp_path / "clean")), client=client, chunk_frames=4, segment_frames=12,
            progress=False,
        )
    with dask.config.set(scheduler="synchronous"):
        resumed_ds, clean_ds = open_frames(store.location).load(), open_frames(clean[0]).load()
    np.testing.assert_array_equal(resumed_ds["frames"].values, clean_ds["frames"].values)
    np.testing.assert_array_equal(resumed_ds["time"].values, clean_ds["time"].values)
    assert_store_equals_video(store.location, recording, chunk_frames=4)


def test_other_parameters_need_overwrite(dataset, tmp_path):
    recording = next(r for r in recordings(dataset, "gen") if r.subject == "04")
    out = Location(str(tmp_path))
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        run_decode([recording], out, client=client, chunk_frames=8, progress=False)
        with pytest.raises(StorageError, match="other inputs or parameters") as error:
            plan_decode(recording, out, chunk_frames=4)
        assert store_location(out, recording, "decode").url in str(error.value)
        plan = plan_decode(recording, out, chunk_frames=4, overwrite=True)
        assert len(plan.tasks) == plan.regions
        (store,) = run_decode([recording], out, client=client, chunk_frames=4, progress=False)
    assert_store_equals_video(store, recording, chunk_frames=4)


def test_a_replaced_video_is_not_taken_for_the_decoded_one(tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=12, crf=18))
    (recording,) = find_recordings(root)
    out = Location(str(tmp_path / "out"))
    plan_decode(recording, out)
    write_video(recording.video, n_frames=12, crf=30)  # same frames and times, other bytes
    plan = plan_decode(recording, out)  # the stale store is rewritten, never reused (issue 9)
    assert len(plan.tasks) == plan.regions


# -- bad input -------------------------------------------------------------------------------------
def test_corrupted_video_fails_and_nothing_is_complete(tmp_path):
    good = write_video(tmp_path / "good.mp4", n_frames=48, keyint=8, bframes=2)
    with av.open(good.url) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    _, pos, size = packets[37]
    data = bytearray(open(good.url, "rb").read())
    data[pos : pos + size] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    root = Location(str(tmp_path / "bids"))
    video = write_bids_recording(root, subject="01", task="bad", video=bytes(data))
    (recording,) = find_recordings(root)
    out = Location(str(tmp_path / "out"))
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        with pytest.raises(VideoError, match=r"cannot be decoded near frame (3[7-9]|4[01])") as error:
            run_decode([recording], out, client=client, chunk_frames=8, segment_frames=16, progress=False)
    assert video.url in str(error.value)
    store = RegionStore(store_location(out, recording, "decode"), "decode")
    assert not store.is_complete() and 2 not in store.done_regions()
    with pytest.raises(IncompleteStoreError):
        open_frames(store.location)


def test_not_a_video_is_refused_before_writing(tmp_path):
    root = Location(str(tmp_path / "bids"))
    video = write_bids_recording(root, subject="01", task="bad", video=b"GIF89a not really a video" * 40)
    (recording,) = find_recordings(root)
    out = Location(str(tmp_path / "out"))
    with pytest.raises(VideoError, match="not a (readable|real) video") as error:
        plan_decode(recording, out)
    assert video.url in str(error.value)
    assert not store_location(out, recording, "decode").exists()


def test_frame_times_mismatch_names_both_files(tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=20), frametimes=np.arange(21) / 25)
    (recording,) = find_recordings(root)
    with pytest.raises(FrameTimesError) as error:
        plan_decode(recording, Location(str(tmp_path / "out")))
    message = str(error.value)
    assert "21 rows" in message and "20 decodable frames" in message
    assert recording.video.url in message and recording.frametimes.url in message


def test_unwritable_output_is_a_storage_error(dataset, tmp_path):
    recording = next(r for r in recordings(dataset, "gen") if r.subject == "04")
    (tmp_path / "file").write_text("a file where the output folder should be")
    out = Location(str(tmp_path / "file" / "out"))
    with pytest.raises(StorageError) as error:
        plan_decode(recording, out)
    assert str(tmp_path / "file" / "out") in str(error.value)


@pytest.mark.parametrize(
    ("width", "height", "frames"), [(640, 360, 4), (1920, 1080, 1), (3840, 2160, 1), (64, 48, 325)]
)
def test_default_chunk_frames_stay_under_1_5_mb_of_planes(width, height, frames):
    frame_bytes = width * height * 3 // 2  # yuv420p
    assert default_chunk_frames(frame_bytes) == frames
    assert frames == 1 or frames * frame_bytes <= 1_500_000


@pytest.mark.parametrize("option", ["chunk_frames", "segment_frames", "max_size"])
def test_bad_parameters(dataset, tmp_path, option):
    recording = recordings(dataset, "gen")[0]
    with pytest.raises(ParameterError, match=re.escape(f"run_decode({option}=...)")):
        plan_decode(recording, Location(str(tmp_path)), **{option: 0})
