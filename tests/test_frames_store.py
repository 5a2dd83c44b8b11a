"""The frames store's layout: the decoder's planes, converted to RGB exactly as a plain PyAV decode does;
shards that bound both one frame's read and the objects an hour of video makes; stores of the previous
layout read, kept or refused, never mixed."""

from __future__ import annotations

import json
import threading

import av
import dask
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

from gmfx._errors import StorageError
from gmfx._pixels import PixelFormat, PlanesToRgb, pixel_format
from gmfx.dataset import find_recordings
from gmfx.stages.decode import (
    MAX_SHARD_BYTES,
    FrameReader,
    _shard_frames,
    default_chunk_frames,
    open_frames,
    plan_decode,
    run_decode,
)
from gmfx.storage import Location, RegionStore, store_location
from gmfx.testing._flaky import LocalFilesUnderProtocol
from gmfx.testing._videos import frame_pattern, write_bids_recording, write_video


def plain_decode(url: str) -> np.ndarray:
    """The oracle: every frame of the video through PyAV's ``to_ndarray(format="rgb24")``."""
    with av.open(url) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def read_all(location: Location) -> xr.Dataset:
    with dask.config.set(scheduler="synchronous"):
        return open_frames(location).load()


def write_interlaced(path, n_frames: int = 6) -> None:
    """An interlaced H.264 video (libswscale converts its frames field by field)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"flags": "+ildct+ilme", "x264-params": "interlaced=1:tff=1"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, 120, 160), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# -- exact RGB from the planes ---------------------------------------------------------------------
VIDEOS = {
    "h264 yuv444p 97x75": dict(n_frames=6, width=97, height=75, pix_fmt="yuv444p"),
    "h264 yuv422p 98x74": dict(n_frames=6, width=98, height=74, pix_fmt="yuv422p"),
    "h264 yuvj420p (full range)": dict(n_frames=6, width=160, height=120, pix_fmt="yuvj420p"),
    "ffv1 yuv420p 97x75 (odd: chroma interpolated)": dict(n_frames=6, width=97, height=75, codec="ffv1"),
    "ffv1 gray 97x75": dict(n_frames=6, width=97, height=75, codec="ffv1", pix_fmt="gray"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory, data_dir) -> dict[str, tuple[Location, str]]:
    """Every real video of the project, and generated ones of every pixel format and odd sizes."""
    root = Location(str(tmp_path_factory.mktemp("bids")))
    found = {}
    for i, name in enumerate(sorted(p.name for p in data_dir.glob("*.mp4"))):
        found[name] = (write_bids_recording(root, subject=f"0{i}", task="real", video=data_dir / name), "planes")
    for i, (name, options) in enumerate(VIDEOS.items(), 10):
        extension = ".mkv" if options.get("codec") == "ffv1" else ".mp4"
        found[name] = (write_bids_recording(root, subject=str(i), task="gen", extension=extension, video=options), "planes")
    interlaced = tmp_path_factory.mktemp("interlaced") / "video.mp4"
    write_interlaced(interlaced)
    found["h264 interlaced"] = (write_bids_recording(root, subject="20", task="gen", video=interlaced), "planes")
    found["ffv1 bgr0 (packed RGB: stored as RGB)"] = (
        write_bids_recording(root, subject="21", task="gen", extension=".mkv", video=dict(n_frames=6, codec="ffv1", pix_fmt="bgr0")),
        "rgb",
    )
    return found


def test_every_video_reads_back_as_its_plain_pyav_decode(videos, tmp_path):
    out = Location(str(tmp_path / "out"))
    recordings = {r.video.url: r for r in find_recordings(videos["single_face.mp4"][0].url.split("/sub-")[0])}
    for name, (video, layout) in videos.items():
        (store,) = run_decode([recordings[video.url]], out, client=None, segment_frames=24, progress=False)
        ds = read_all(store)
        assert ds.attrs["frames_layout"] == layout, name
        expected = plain_decode(video.url)
        assert ds["frames"].dims == ("time", "y", "x", "rgb") and ds["frames"].dtype == np.uint8
        np.testing.assert_array_equal(ds["frames"].values, expected, err_msg=name)
        # the recon workers' path: planes read by ShardReader and converted on the worker, in odd slices
        reader = FrameReader(store)
        np.testing.assert_array_equal(reader[slice(1, 4)], expected[1:4], err_msg=name)
        np.testing.assert_array_equal(reader[slice(3, len(expected))], expected[3:], err_msg=name)
        picks = np.array([0, 2, len(expected) - 1])  # the identity pass samples frames over the recording
        assert reader.shape == expected.shape
        np.testing.assert_array_equal(reader.get_orthogonal_selection((picks,)), expected[picks], err_msg=name)


def test_threads_reading_at_once_each_get_their_own_frames(data_dir, tmp_path):
    """Dask's threads and recon's read-ahead convert chunks at the same time: each gets its own frames."""
    from concurrent.futures import ThreadPoolExecutor

    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=data_dir / "single_face.mp4")
    (store,) = run_decode(find_recordings(root), Location(str(tmp_path / "out")), client=None, segment_frames=8, progress=False)
    expected = plain_decode(find_recordings(root)[0].video.url)
    starts = [(7 * i) % 64 for i in range(32)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: FrameReader(store)[slice(s, s + 8)], starts))
    for start, frames in zip(starts, got):
        np.testing.assert_array_equal(frames, expected[start : start + 8])
    with dask.config.set(scheduler="threads", num_workers=4):
        np.testing.assert_array_equal(open_frames(store)["frames"].values, expected)


def test_planes_cost_half_the_bytes_of_rgb(data_dir, tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=data_dir / "single_face.mp4")
    (recording,) = find_recordings(root)
    sizes = {}
    for layout in ("auto", "rgb"):
        (store,) = run_decode([recording], Location(str(tmp_path / layout)), client=None, frames_layout=layout, progress=False)
        files = [p for p in (tmp_path / layout).rglob("*") if p.is_file() and "/c/" in p.as_posix()]
        sizes[layout] = sum(p.stat().st_size for p in files if "/time/" not in p.as_posix() and "/frame/" not in p.as_posix())
    per_frame = sizes["auto"] / 72
    assert per_frame <= 106_000, per_frame  # the target: half of the 212 kB of RGB frames
    assert sizes["auto"] < 0.5 * sizes["rgb"]


def test_the_chroma_siting_found_by_trial_reproduces_the_source():
    """Frames of an odd height whose chroma is sited top-left (libswscale interpolates chroma there): the
    siting found on one noise frame converts other frames exactly, and the default siting would not."""
    width, height = 97, 75
    source = av.CodecContext.create("rawvideo", "r")
    source.width, source.height, source.pix_fmt = width, height, "yuv420p"
    source.options = {"chroma_sample_location": "topleft"}
    source.open()
    rng = np.random.default_rng(7)
    shapes = [(75, 97), (38, 49), (38, 49)]

    def decoded(planes):
        (frame,) = source.decode(av.Packet(b"".join(p.tobytes() for p in planes)))
        return frame

    found = pixel_format(decoded([rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]))
    assert isinstance(found, PixelFormat) and found.chroma_location == "topleft"
    planes = [rng.integers(0, 256, (3, *s), dtype=np.uint8) for s in shapes]
    expected = np.stack([decoded([p[i] for p in planes]).to_ndarray(format="rgb24") for i in range(3)])
    np.testing.assert_array_equal(PlanesToRgb(found)(*planes), expected)
    unspecified = PixelFormat(**{**found.__dict__, "chroma_location": "unspecified"})
    assert not np.array_equal(PlanesToRgb(unspecified)(*planes), expected)


# -- shards: one frame's read, objects an hour ------------------------------------------------------
class CountingFileSystem(LocalFilesUnderProtocol):
    """Local files behind ``counting://`` that count the bytes every read returns."""

    protocol = ("counting",)
    read_bytes = 0
    _lock = threading.Lock()

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        with self._lock:
            CountingFileSystem.read_bytes += len(data)
        return data


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


def test_one_frame_reads_under_2_mb_and_an_hour_stays_under_2000_objects(data_dir, tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=data_dir / "single_face.mp4")
    (recording,) = find_recordings(root)
    out = Location(f"counting://{tmp_path}/out")
    (store,) = run_decode([recording], out, client=None, segment_frames=16, progress=False)  # 5 shards of 16
    expected = plain_decode(recording.video.url)

    ds = open_frames(store)  # metadata read here, not counted below
    CountingFileSystem.read_bytes = 0
    with dask.config.set(scheduler="synchronous"):
        still = ds["frames"].isel(time=37).values  # a QC still
    assert 0 < CountingFileSystem.read_bytes <= 2_000_000, CountingFileSystem.read_bytes
    np.testing.assert_array_equal(still, expected[37])

    # objects: a shard a plane, a marker a shard, the coordinates and the metadata
    objects = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    shards = -(-72 // 16)
    fixed = len([p for p in objects if p.name in ("zarr.json", "dataset_description.json")]) + 2  # + time, frame
    assert len(objects) == 3 * shards + shards + fixed
    # an hour of 640x360 at 30 fps with the default shards
    chunk = default_chunk_frames(640 * 360 * 3 // 2)
    shard = _shard_frames(chunk, 640 * 360 * 3 // 2, None)
    assert shard * 640 * 360 * 3 // 2 <= MAX_SHARD_BYTES
    per_hour = 4 * -(-108_000 // shard) + fixed
    assert per_hour < 2000, per_hour


# -- stores of the previous layout --------------------------------------------------------------------
def _schema_1_store(recording, out: Location, *, complete: bool) -> Location:
    """A frames store as gmfx wrote it before schema 2: RGB ``frames`` in 64-frame chunks, no schema attribute,
    with the plan inputs this gmfx computes for the same video."""
    scratch = plan_decode(recording, Location(out.url + "-scratch"))
    inputs = json.loads(scratch.store.attrs()["gmfx_plan"])["inputs"]
    frames = plain_decode(recording.video.url)
    plan = {"inputs": inputs, "chunk_frames": 64, "segment_frames": 512, "max_size": None, "width": frames.shape[2],
            "height": frames.shape[1], "compression_level": 2, "regions": 1}  # fmt: skip
    with av.open(recording.video.url) as container:
        stream = container.streams.video[0]
        times = np.array([f.pts * float(stream.time_base) for f in container.decode(stream)])
    location = store_location(out, recording, "decode")
    ds = xr.Dataset(
        {"frames": (("time", "y", "x", "rgb"), frames)},
        coords={"time": ("time", times), "frame": ("time", np.arange(len(frames)))},
        attrs={"gmfx_version": "0.1.0", "gmfx_stage": "decode", "gmfx_plan": json.dumps(plan, sort_keys=True),
               "gmfx_regions": 1, "gmfx_complete": complete, "chunk_frames": 64, "n_frames": len(frames)},  # fmt: skip
    )
    ds.to_zarr(location.url, mode="w", zarr_format=3, consolidated=False,
               encoding={"frames": {"chunks": (64, *frames.shape[1:])}})  # fmt: skip
    if complete:
        zarr.consolidate_metadata(location.url)
    return location


@pytest.fixture
def real_recording(data_dir, tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=data_dir / "single_face.mp4")
    (recording,) = find_recordings(root)
    return recording


def test_a_complete_schema_1_store_is_read_and_kept(real_recording, tmp_path):
    out = Location(str(tmp_path / "out"))
    location = _schema_1_store(real_recording, out, complete=True)
    expected = plain_decode(real_recording.video.url)
    np.testing.assert_array_equal(read_all(location)["frames"].values, expected)
    np.testing.assert_array_equal(FrameReader(location)[slice(60, 72)], expected[60:])
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    plan = plan_decode(real_recording, out)
    assert plan.tasks == [] and "frames_schema" not in RegionStore(location, "decode").attrs()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    with pytest.raises(StorageError, match="other frame sizes"):
        plan_decode(real_recording, out, max_size=160)


def test_an_incomplete_schema_1_store_is_never_resumed(real_recording, tmp_path):
    out = Location(str(tmp_path / "out"))
    location = _schema_1_store(real_recording, out, complete=False)
    with pytest.raises(StorageError, match="never resumes into another layout") as error:
        plan_decode(real_recording, out)
    assert location.url in str(error.value) and "--overwrite" in str(error.value)
    assert "frames_schema" not in RegionStore(location, "decode").attrs()  # untouched
    (store,) = run_decode([real_recording], out, client=None, overwrite=True, progress=False)
    ds = read_all(store)
    assert ds.attrs["frames_schema"] == 2 and "frames" not in zarr.open_group(store.url, mode="r")
    np.testing.assert_array_equal(ds["frames"].values, plain_decode(real_recording.video.url))


def test_a_store_of_a_newer_schema_is_refused(real_recording, tmp_path):
    out = Location(str(tmp_path / "out"))
    (store,) = run_decode([real_recording], out, client=None, progress=False)
    group = zarr.open_group(store.url, mode="r+")
    group.attrs["frames_schema"] = 3
    zarr.consolidate_metadata(store.url)
    with pytest.raises(StorageError, match="schema 3.*reads schemas 1 to 2") as error:
        open_frames(store)
    assert "upgrade gmfx" in str(error.value)


def test_parallel_compression_writes_each_shard_after_all_its_chunks(data_dir, tmp_path, monkeypatch):
    """A task compresses on GMFX_CORES_PER_THREAD threads: the first chunk of every shard finishing last
    (it sleeps) must still be in the shard, and the frames equal PyAV's."""
    import time

    from gmfx.storage._shards import ShardBuilder

    add = ShardBuilder.add
    threads: set[str] = set()

    def slow_first_chunk(self, i, values):
        threads.add(threading.current_thread().name)
        if i == 0:
            time.sleep(0.2)
        add(self, i, values)

    monkeypatch.setattr(ShardBuilder, "add", slow_first_chunk)
    monkeypatch.setenv("GMFX_CORES_PER_THREAD", "3")
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=data_dir / "single_face.mp4")
    (store,) = run_decode(find_recordings(root), Location(str(tmp_path / "out")), client=None, segment_frames=16, progress=False)
    np.testing.assert_array_equal(read_all(store)["frames"].values, plain_decode(find_recordings(root)[0].video.url))
    assert 1 < len(threads) <= 3 and all(name.startswith("gmfx-decode-compress") for name in threads), threads
