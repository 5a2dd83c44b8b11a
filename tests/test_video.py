"""Pure video functions: indexing, segment decoding and frame times, against a plain PyAV decode."""

from __future__ import annotations

import re
import uuid

import av
import numpy as np
import pandas as pd
import pytest

from gmfx._errors import FrameTimesError, VideoError
from gmfx._video import decode_segment, index_video, iter_segment, output_size, read_frame_times
from gmfx.dataset import find_recordings
from gmfx.storage import Location
from gmfx.testing._videos import frame_pattern, read_frame_number, write_bids_recording, write_video

VFR_TIMES = np.cumsum(np.r_[0.25, np.random.default_rng(7).uniform(0.005, 0.12, 44)])

#: generated videos: name -> write_video arguments
GENERATED = {
    "cfr.mp4": dict(n_frames=30, fps=25),
    "vfr.mp4": dict(n_frames=45, times=VFR_TIMES, keyint=8, bframes=2),
    "gop_bframes.mp4": dict(n_frames=70, keyint=9, bframes=3),
    "odd_97x75.mp4": dict(n_frames=24, width=97, height=75, pix_fmt="yuv444p", keyint=5),
    "odd_97x75.mkv": dict(n_frames=24, width=97, height=75, codec="ffv1", keyint=6),
    "gop_bframes.mkv": dict(n_frames=40, keyint=7, bframes=2),
}
REAL = ("single_face.mp4", "no_face.mp4")


@pytest.fixture(scope="module")
def videos(tmp_path_factory, data_dir) -> dict[str, Location]:
    folder = tmp_path_factory.mktemp("videos")
    found = {name: write_video(folder / name, **kwargs) for name, kwargs in GENERATED.items()}
    found.update({name: Location(str(data_dir / name)) for name in REAL})
    return found


@pytest.fixture(scope="module")
def reference(videos) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Plain sequential PyAV decode of every video: pts and RGB frames."""
    result = {}
    for name, location in videos.items():
        with av.open(location.url) as container:
            decoded = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
        result[name] = (np.array([p for p, _ in decoded]), np.stack([a for _, a in decoded]))
    return result


def segmentations(n: int) -> dict[str, list[tuple[int, int]]]:
    bounds = sorted({0, n, *range(0, n, max(1, n // 7)), n // 3 + 1})
    return {
        "one": [(0, n)],
        "many": list(zip(bounds[:-1], bounds[1:])),
        "single_frames": [(i, i + 1) for i in range(n)],
    }


# -- index -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*GENERATED, *REAL])
def test_index_matches_sequential_decode(videos, reference, name):
    index = index_video(videos[name])
    pts, frames = reference[name]
    np.testing.assert_array_equal(index.pts, pts)
    assert (index.height, index.width) == frames.shape[1:3]
    with av.open(videos[name].url) as container:
        time_base = container.streams.video[0].time_base
    np.testing.assert_array_equal(index.times, pts * float(time_base))
    assert index.keyframe_pts[0] <= index.pts[0]


def test_edit_list_gives_decodable_frames_and_real_spacing(videos):
    index = index_video(videos["no_face.mp4"])
    with av.open(videos["no_face.mp4"].url) as container:
        stream = container.streams.video[0]
        assert stream.frames == 98  # what the container claims
        claimed_rate = float(stream.average_rate)
    assert index.n_frames == 95
    np.testing.assert_allclose(np.diff(index.times), 1 / 24, rtol=0, atol=1e-9)
    assert abs(claimed_rate - 24) > 0.3  # n / average_rate would be wrong


def test_variable_frame_rate_times_are_the_written_ones(videos):
    index = index_video(videos["vfr.mp4"])
    np.testing.assert_allclose(index.times, VFR_TIMES, atol=1 / 90000)


def test_generated_videos_have_several_keyframes_and_b_frames(videos):
    index = index_video(videos["gop_bframes.mp4"])
    np.testing.assert_array_equal(index.keyframe_pts, index.pts[::9])
    with av.open(videos["gop_bframes.mp4"].url) as container:
        packets = [p.pts for p in container.demux(video=0) if p.size]
    assert packets != sorted(packets)  # B-frames: decode order differs from presentation order


# -- segments --------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["one", "many", "single_frames"])
@pytest.mark.parametrize("name", [*GENERATED, *REAL])
def test_segments_equal_sequential_decode(videos, reference, name, split):
    index = index_video(videos[name])
    pts, expected = reference[name]
    segments = segmentations(index.n_frames)[split]
    if split == "single_frames" and name in REAL:  # one keyframe each: every frame decodes from frame 0
        segments = segments[::6] + [segments[-1]]
    for start, stop in segments:
        frames, times = decode_segment(videos[name], index, start, stop)
        np.testing.assert_array_equal(frames, expected[start:stop], err_msg=f"{name} [{start}, {stop})")
        np.testing.assert_array_equal(times, index.times[start:stop])


def test_a_seek_that_overshoots_falls_back_to_decoding_from_the_start(videos, reference, monkeypatch):
    import gmfx._video

    index = index_video(videos["gop_bframes.mp4"])
    # every seek target at the last frame: a seek lands after the segment's first frame
    late = np.full_like(index.keyframe_seek, index.pts[-1])
    overshooting = type(index)(**{**index.__dict__, "keyframe_seek": late})
    targets = []
    decoded_from = gmfx._video._decoded_from
    monkeypatch.setattr(gmfx._video, "_decoded_from", lambda *args: targets.append(args[3]) or decoded_from(*args))
    frames, _ = decode_segment(videos["gop_bframes.mp4"], overshooting, 20, 31)
    np.testing.assert_array_equal(frames, reference["gop_bframes.mp4"][1][20:31])
    assert targets == [index.pts[-1], None]


@pytest.mark.parametrize("name", GENERATED)
def test_decoded_frames_show_their_own_number(videos, name):
    index = index_video(videos[name])
    for start in (0, index.n_frames // 2, index.n_frames - 1):
        frames, _ = decode_segment(videos[name], index, start, index.n_frames)
        assert [read_frame_number(f) for f in frames] == list(range(start, index.n_frames))


def test_iter_segment_batches_cover_the_segment(videos, reference):
    index = index_video(videos["gop_bframes.mp4"])
    batches = list(iter_segment(videos["gop_bframes.mp4"], index, 5, 47, batch=8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 8, 2]
    np.testing.assert_array_equal(np.concatenate(batches), reference["gop_bframes.mp4"][1][5:47])


def test_downscale_matches_pyav_area_resize(videos, reference):
    index = index_video(videos["single_face.mp4"])
    frames, _ = decode_segment(videos["single_face.mp4"], index, 10, 20, max_size=320)
    assert frames.shape == (10, 180, 320, 3)
    with av.open(videos["single_face.mp4"].url) as container:
        expected = [
            f.to_ndarray(format="rgb24", width=320, height=180, interpolation="AREA")
            for i, f in enumerate(container.decode(video=0))
            if 10 <= i < 20
        ]
    np.testing.assert_array_equal(frames, np.stack(expected))


def test_decode_reads_through_fsspec(videos, reference):
    location = Location(f"memory://gmfx-video-{uuid.uuid4().hex[:8]}/clip.mp4")
    fs, path = location.filesystem()
    fs.pipe_file(path, open(videos["gop_bframes.mkv"].url, "rb").read())
    index = index_video(location)
    frames, _ = decode_segment(location, index, 12, 30)
    np.testing.assert_array_equal(frames, reference["gop_bframes.mkv"][1][12:30])


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((640, 360), None, (640, 360)),
        ((640, 360), 640, (640, 360)),
        ((640, 360), 1000, (640, 360)),
        ((640, 360), 320, (320, 180)),
        ((360, 640), 320, (180, 320)),
        ((97, 75), 50, (50, 39)),
        ((1000, 1), 10, (10, 1)),
    ],
)
def test_output_size(size, max_size, expected):
    assert output_size(*size, max_size) == expected


def test_frame_pattern_round_trips_and_rejects_tiny_frames():
    for i in (0, 1, 1234, 4095):
        assert read_frame_number(frame_pattern(i, 40, 60)) == i
    with pytest.raises(ValueError):
        frame_pattern(1, 10, 20)


# -- bad videos ------------------------------------------------------------------------------------
def assert_names(error: pytest.ExceptionInfo, location: Location, *words: str) -> None:
    message = str(error.value)
    assert location.url in message
    for word in words:
        assert re.search(word, message), (word, message)
    assert "how to fix" in message


def test_not_a_video(tmp_path):
    location = Location(str(tmp_path / "notes.mp4"))
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, "not a readable video")


def test_empty_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    location = Location(str(tmp_path / "empty.mp4"))
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, r"empty \(0 bytes\)")


def test_missing_file(tmp_path):
    location = Location(str(tmp_path / "gone.mp4"))
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, "does not exist")


def test_truncated_without_index(tmp_path, videos):
    data = open(videos["gop_bframes.mp4"].url, "rb").read()  # index (moov) at the end
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    location = Location(str(tmp_path / "cut.mp4"))
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, "not a readable video", "truncated")


def test_truncated_mid_stream(tmp_path):
    full = write_video(tmp_path / "full.mp4", n_frames=60, keyint=10, bframes=2, faststart=True)
    data = open(full.url, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    location = Location(str(tmp_path / "cut.mp4"))
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, "declares 60 frames but only 3[0-9] can be read", r"truncated after frame \d+")


def test_corrupted_mid_stream_names_the_frame(tmp_path):
    good = write_video(tmp_path / "good.mp4", n_frames=60, keyint=10, bframes=2)
    with av.open(good.url) as container:
        packets = [(p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size]
    index = index_video(good)
    pts, pos, size = next(p for p in packets if p[0] == index.pts[30])
    data = bytearray(open(good.url, "rb").read())
    data[pos : pos + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    location = Location(str(tmp_path / "bad.mp4"))
    with pytest.raises(VideoError) as error:
        decode_segment(location, index_video(location), 0, 60)
    assert_names(error, location, "cannot be decoded near frame", "corrupted")
    frame = int(re.search(r"near frame (\d+)", str(error.value))[1])
    assert 30 <= frame <= 34  # threaded decoders report it a few packets late


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    location = Location(str(path))
    with pytest.raises(VideoError) as error:
        index_video(location)
    assert_names(error, location, "no video stream")


def test_a_frame_the_decoder_drops_is_named(videos):
    index = index_video(videos["cfr.mp4"])
    expected = np.insert(index.pts, 3, index.pts[2] + 1)  # the index expects a frame that never comes
    dropped = type(index)(**{**index.__dict__, "pts": expected})
    with pytest.raises(VideoError) as error:
        decode_segment(videos["cfr.mp4"], dropped, 0, 5)
    message = f"frame 3 decoded with pts {index.pts[3]} where the index expects {index.pts[2] + 1}"
    assert_names(error, videos["cfr.mp4"], message)


# -- frame times -----------------------------------------------------------------------------------
VIDEO = Location("/data/sub-01/sub-01_task-x_video.mp4")


def tsv(tmp_path, text: str) -> Location:
    (tmp_path / "sub-01_task-x_frametimes.tsv").write_text(text)
    return Location(str(tmp_path / "sub-01_task-x_frametimes.tsv"))


def test_frame_times_are_read(tmp_path):
    location = tsv(tmp_path, "t\tother\n0.5\ta\n0.54\tb\n0.6\tc\n")
    np.testing.assert_array_equal(read_frame_times(location, VIDEO, 3), [0.5, 0.54, 0.6])


def test_frame_times_on_memory_filesystem():
    location = Location(f"memory://gmfx-ft-{uuid.uuid4().hex[:8]}/x_frametimes.tsv")
    fs, path = location.filesystem()
    fs.pipe_file(path, b"t\n1\n2\n")
    np.testing.assert_array_equal(read_frame_times(location, VIDEO, 2), [1.0, 2.0])


@pytest.mark.parametrize(
    ("text", "n", "words"),
    [
        ("time\n0.1\n0.2\n", 2, ["no column `t`", "columns: time"]),
        ("t\tx\n0.1\ta\n\tb\n0.3\tc\n", 3, ["row 2 of column `t` is missing or not a number"]),
        ("t\n0.1\nNaN\n0.3\n", 3, ["row 2 .* missing or not a number"]),
        ("t\n0.1\nabc\n0.3\n", 3, ["row 2 .*'abc'"]),
        ("t\n0.1\n0.3\n0.2\n", 3, ["do not increase at row 3", "0.3 then 0.2"]),
        ("t\n0.1\n0.1\n", 2, ["do not increase at row 2"]),
        ("t\n0.1\n0.2\n", 5, ["has 2 rows but the video has 5 decodable frames", re.escape(VIDEO.url)]),
        ("", 1, ["cannot be read"]),
    ],
)
def test_bad_frame_times(tmp_path, text, n, words):
    location = tsv(tmp_path, text)
    with pytest.raises(FrameTimesError) as error:
        read_frame_times(location, VIDEO, n)
    assert_names(error, location, *words)


# -- test-data writers -----------------------------------------------------------------------------
def test_bids_recording_writer_makes_a_discoverable_recording():
    root = Location(f"memory://gmfx-bids-{uuid.uuid4().hex[:8]}/study")
    events = pd.DataFrame({"onset": [0.5, 1.5], "duration": [0.2, 0.2], "trial_type": ["a", "b"]})
    times = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    video = write_bids_recording(
        root, subject="01", session="2", task="mini", run="3", video=dict(n_frames=6), frametimes=times, events=events
    )
    (recording,) = find_recordings(root)
    assert video.filesystem()[1] == recording.video.filesystem()[1]
    assert recording.name == "sub-01_ses-2_task-mini_run-3"
    assert recording.video.url.endswith("sub-01/ses-2/sub-01_ses-2_task-mini_run-3_video.mp4")
    index = index_video(recording.video)
    np.testing.assert_array_equal(read_frame_times(recording.frametimes, recording.video, index.n_frames), times)
    with recording.events.open() as handle:
        pd.testing.assert_frame_equal(pd.read_csv(handle, sep="\t"), events)
