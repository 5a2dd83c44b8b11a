"""Pure video functions: index a video, decode a segment of it, read its frame times.

A video is *indexed* by demuxing its packets (no decoding): the decodable frames are the packets that
carry data and are not flagged for discarding (edit lists mark the frames before the start that way),
and their presentation timestamps, sorted, give every frame's pts. Keyframe packets give the places
where a segment can start decoding. A segment ``[start, stop)`` is decoded by seeking to the last
keyframe at or before the segment's first frame, skipping the frames before it, and checking that every
decoded frame has the pts the index expects: a mismatch is an error that names the frame, never a
silently shifted result.

Frame times are ``pts * time_base`` of the decoded frames, never ``n / average_rate``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import pandas as pd

from gmfx._errors import FrameTimesError, VideoError
from gmfx.storage import Location

__all__ = [
    "VideoIndex",
    "index_video",
    "output_size",
    "iter_decoded",
    "iter_segment",
    "first_frame",
    "rgb_into",
    "decode_segment",
    "read_frame_times",
]

_REENCODE = "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -crf 12 OUT.mp4`, or remove it from the dataset"


@dataclass(frozen=True)
class VideoIndex:
    """What decoding a video needs to know, found without decoding it.

    Attributes
    ----------
    source
        URL or path of the video.
    size
        Size of the file in bytes.
    codec
        Name of the video codec (``h264``, ...).
    width, height
        Size of the decoded frames.
    time_base
        Unit of the timestamps, in seconds.
    pts
        Presentation timestamp of every decodable frame, increasing (int64, ``(n_frames,)``).
    keyframe_pts
        Presentation timestamps of the keyframes (including discarded ones), increasing.
    keyframe_seek
        The timestamp to seek to for each keyframe (its dts, which a seek never overshoots).
    """

    source: str
    size: int
    codec: str
    width: int
    height: int
    time_base: Fraction
    pts: np.ndarray
    keyframe_pts: np.ndarray
    keyframe_seek: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    @property
    def times(self) -> np.ndarray:
        """Presentation time of every frame in seconds (float64)."""
        return self.pts.astype(np.float64) * float(self.time_base)


@contextlib.contextmanager
def _open_container(location: Location) -> Iterator[tuple[av.container.InputContainer, int]]:
    """Open ``location`` with PyAV (through fsspec when it is not local); yield it and the file's size.

    Failures to open become :class:`VideoError`.
    """
    fs, path = location.filesystem()
    try:
        size = fs.size(path)
    except FileNotFoundError as error:
        raise VideoError(
            "the video file does not exist", where=location.url, fix="check the path or URL of the video"
        ) from error
    if size == 0:
        raise VideoError(
            "the video file is empty (0 bytes)",
            where=location.url,
            fix="copy the video again from its source (the copy was probably interrupted)",
        )
    with contextlib.ExitStack() as stack:
        source = location.url if location.is_local else stack.enter_context(location.open("rb"))
        try:
            container = stack.enter_context(av.open(source, mode="r"))
        except av.error.FFmpegError as error:
            raise VideoError(
                f"the file is not a readable video ({error})",
                where=location.url,
                fix="check that it plays in a video player; a truncated .mp4 often lacks its index (moov "
                "atom): copy it again, or " + _REENCODE,
            ) from error
        if not container.streams.video:
            raise VideoError(
                "the file has no video stream",
                where=location.url,
                fix="give a file that contains video (this one may be audio only)",
            )
        yield container, size


def index_video(location: Location) -> VideoIndex:
    """Index the first video stream of ``location`` by demuxing its packets (no decoding).

    Raises
    ------
    VideoError
        The file is missing, empty, not a video, has no video stream, has packets without
        timestamps, or holds fewer packets than its container declares (truncated).
    """
    with _open_container(location) as (container, size):
        stream = container.streams.video[0]
        if not stream.codec_context.width or not stream.codec_context.height:
            raise VideoError(
                f"the video stream ({stream.codec_context.name}) has no frame size: the file is not a real video",
                where=location.url,
                fix="check that it plays in a video player, or " + _REENCODE,
            )
        declared = stream.frames
        pts: list[int] = []
        keyframes: list[tuple[int, int]] = []
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                packets += 1
                if packet.pts is None:
                    raise VideoError(
                        f"packet {packets - 1} of the video stream has no presentation timestamp",
                        where=location.url,
                        fix="remux it into mp4 or mkv (`ffmpeg -i IN -c copy OUT.mp4`), or " + _REENCODE,
                    )
                if packet.is_keyframe:
                    keyframes.append((packet.pts, packet.dts if packet.dts is not None else packet.pts))
                if not packet.is_discard:
                    pts.append(packet.pts)
        except av.error.FFmpegError as error:
            raise VideoError(
                f"the video stream cannot be read after packet {packets} ({error})",
                where=location.url,
                fix="the file is truncated or corrupted: copy it again, or " + _REENCODE,
            ) from error
        if declared and packets < declared:
            raise VideoError(
                f"the container declares {declared} frames but only {packets} can be read: the file is "
                f"truncated after frame {packets}",
                where=location.url,
                fix="copy the video again from its source, or " + _REENCODE,
            )
        if not pts:
            raise VideoError(
                "the video stream holds no decodable frame", where=location.url, fix="give a non-empty video"
            )
        ordered = np.sort(np.asarray(pts, dtype=np.int64))
        repeated = np.flatnonzero(np.diff(ordered) == 0)
        if repeated.size:
            raise VideoError(
                f"two frames share the presentation timestamp {ordered[repeated[0]]} "
                f"(frame {repeated[0] + 1})",
                where=location.url,
                fix=_REENCODE,
            )
        keys = np.asarray(sorted(keyframes) or [(ordered[0], ordered[0])], dtype=np.int64)
        codec = stream.codec_context
        return VideoIndex(
            source=location.url,
            size=size,
            codec=codec.name,
            width=codec.width,
            height=codec.height,
            time_base=Fraction(stream.time_base),
            pts=ordered,
            keyframe_pts=keys[:, 0],
            keyframe_seek=keys[:, 1],
        )


def output_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """The frame size after shrinking the longest side to ``max_size`` (aspect kept, never enlarged)."""
    if max_size is None or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _seek_target(index: VideoIndex, start: int) -> int | None:
    """The timestamp to seek to before decoding frame ``start`` (``None``: decode from the beginning)."""
    k = int(np.searchsorted(index.keyframe_pts, index.pts[start], side="right")) - 1
    return None if k <= 0 else int(index.keyframe_seek[k])


def iter_decoded(
    location: Location, index: VideoIndex, start: int, stop: int, *, threads: int = 0
) -> Iterator[av.VideoFrame]:
    """Decode frames ``[start, stop)`` in order, checking each frame's pts against the index.

    ``threads`` sets the decoder's threads (0: as many as cores).

    Raises
    ------
    VideoError
        A frame cannot be decoded, is missing, or has another pts than the index says (names the frame).
    """
    if not 0 <= start < stop <= index.n_frames:
        raise ValueError(f"bad segment [{start}, {stop}) of {index.n_frames} frames")
    target = _seek_target(index, start)
    position = start
    with contextlib.ExitStack() as stack:
        frames = stack.enter_context(_decoded_from(location, index, start, target, threads))
        first = next(frames, None)
        if target is not None and (first is None or first.pts != index.pts[start]):
            target = None  # the seek overshot the segment: decode from the beginning instead
            frames = stack.enter_context(_decoded_from(location, index, start, target, threads))
            first = next(frames, None)
        for frame in itertools.chain([first] if first is not None else [], frames):
            if frame.pts != index.pts[position]:
                raise _pts_error(location, index, position, frame.pts, target)
            yield frame
            position += 1
            if position == stop:
                return
    raise VideoError(
        f"the video ends before frame {position} (t={index.times[position]:.6f} s); "
        f"{index.n_frames} frames were expected",
        where=location.url,
        fix="the file is truncated or corrupted: copy it again, or " + _REENCODE,
    )


def iter_segment(
    location: Location,
    index: VideoIndex,
    start: int,
    stop: int,
    *,
    batch: int,
    max_size: int | None = None,
    threads: int = 0,
) -> Iterator[np.ndarray]:
    """Decode frames ``[start, stop)`` as RGB uint8 arrays of ``batch`` frames ``(n, H, W, 3)``.

    The last batch may be shorter. Frames are shrunk to ``max_size`` on their longest side (area
    interpolation) when given. ``threads`` sets the decoder's threads (0: as many as cores).

    Raises
    ------
    VideoError
        A frame cannot be decoded, is missing, or has another pts than the index says (names the frame).
    """
    if not 0 <= start < stop <= index.n_frames or batch < 1:
        raise ValueError(f"bad segment [{start}, {stop}) of {index.n_frames} frames (batch {batch})")
    width, height = output_size(index.width, index.height, max_size)
    buffer = np.empty((min(batch, stop - start), height, width, 3), np.uint8)
    filled, position = 0, start
    for frame in iter_decoded(location, index, start, stop, threads=threads):
        rgb_into(frame, buffer[filled], max_size)
        filled += 1
        position += 1
        if filled == len(buffer):
            yield buffer
            if position < stop:
                buffer = np.empty((min(batch, stop - position), height, width, 3), np.uint8)
                filled = 0


@contextlib.contextmanager
def _decoded_from(
    location: Location, index: VideoIndex, start: int, target: int | None, threads: int
) -> Iterator[Iterator[av.VideoFrame]]:
    """Decoded frames from ``target`` on (the beginning when ``None``), skipping those before frame ``start``."""
    with _open_container(location) as (container, _):
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        if target is not None:
            container.seek(target, backward=True, any_frame=False, stream=stream)
        yield _decode_packets(location, index, container, stream, int(index.pts[start]))


def _decode_packets(
    location: Location, index: VideoIndex, container, stream, first_pts: int
) -> Iterator[av.VideoFrame]:
    """Decode packet by packet, so that a decoding failure names the frame whose packet is broken."""
    packet = None
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                if frame.pts is not None and frame.pts >= first_pts:
                    yield frame
    except av.error.FFmpegError as error:
        raise _decode_error(location, index, packet, error) from error


def _decode_error(location: Location, index: VideoIndex, packet, error: Exception) -> VideoError:
    if packet is None or packet.pts is None:
        place = "its first packet" if packet is None else "a packet without timestamp"
    else:
        i = int(np.searchsorted(index.pts, packet.pts))
        exact = i < index.n_frames and index.pts[i] == packet.pts
        place = f"frame {i} (t={index.times[i]:.6f} s)" if exact else f"the packet with pts {packet.pts}"
    return VideoError(
        # threaded decoders report a broken packet a few packets late, hence "near"
        f"the video cannot be decoded near {place} ({error})",
        where=location.url,
        fix="the file is corrupted there: copy it again, or " + _REENCODE,
    )


def rgb_into(frame: av.VideoFrame, out: np.ndarray, max_size: int | None = None) -> None:
    """Convert ``frame`` to RGB (shrunk to ``max_size``, area interpolation) straight into ``out``: one
    copy, as ``to_ndarray`` makes."""
    width, height = output_size(frame.width, frame.height, max_size)
    resize = {} if (width, height) == (frame.width, frame.height) else {
        "width": width, "height": height, "interpolation": "AREA"
    }
    rgb = frame.reformat(format="rgb24", **resize)
    plane = rgb.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)  # rows may be padded
    out[...] = rows[:, : rgb.width * 3].reshape(rgb.height, rgb.width, 3)


def _pts_error(location: Location, index: VideoIndex, position: int, got: int, target: int | None) -> VideoError:
    seek = "from the start" if target is None else f"after seeking to timestamp {target}"
    return VideoError(
        f"frame {position} decoded with pts {got} where the index expects {index.pts[position]} ({seek}): "
        "frames were dropped or the video cannot be cut into segments exactly",
        where=location.url,
        fix="the file may be corrupted at that frame; decode it as one segment (--segment-frames larger than "
        "the video), or " + _REENCODE,
    )


def decode_segment(
    location: Location, index: VideoIndex, start: int, stop: int, *, max_size: int | None = None, threads: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Decode frames ``[start, stop)``: RGB uint8 ``(n, H, W, 3)`` and their times in seconds."""
    (frames,) = iter_segment(location, index, start, stop, batch=stop - start, max_size=max_size, threads=threads)
    return frames, index.times[start:stop]


def first_frame(location: Location) -> av.VideoFrame | None:
    """The first decoded frame of the video (``None`` when nothing decodes)."""
    with _open_container(location) as (container, _):
        for frame in container.decode(container.streams.video[0]):
            return frame
    return None


def display_rotation(location: Location, frame: av.VideoFrame | None = None) -> int:
    """The counter-clockwise display rotation (degrees) the container asks players to apply, e.g. 90 for
    a portrait phone video; read from the first decoded frame (``frame`` when given)."""
    frame = frame if frame is not None else first_frame(location)
    return 0 if frame is None else int(round(frame.rotation or 0)) % 360


def read_frame_times(frametimes: Location, video: Location, n_frames: int | None) -> np.ndarray:
    """Read column ``t`` of a ``_frametimes.tsv`` and check it against the video's ``n_frames``.

    Raises
    ------
    FrameTimesError
        The file cannot be read, has no ``t`` column, holds a missing or non-numeric value, times that
        do not increase, or another number of rows than the video has decodable frames.
    """
    try:
        with frametimes.open("rb") as handle:
            table = pd.read_csv(handle, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise FrameTimesError(
            f"the frame times file cannot be read as a tab-separated table ({type(error).__name__}: {error})",
            where=frametimes.url,
            fix="write it as a TSV file with a header line and a column `t` (seconds), one row per frame",
        ) from error
    if "t" not in table.columns and len(table.columns) == 1 and "," in str(table.columns[0]):
        raise FrameTimesError(
            f"the frame times file is comma-separated (header {table.columns[0]!r}), not tab-separated",
            where=frametimes.url,
            fix="save it with tabs between columns (e.g. pandas: to_csv(path, sep='\\t', index=False))",
        )
    if "t" not in table.columns:
        raise FrameTimesError(
            f"the frame times file has no column `t` (columns: {', '.join(map(str, table.columns)) or 'none'})",
            where=frametimes.url,
            fix="name the column of acquisition times (seconds) `t` in the header line",
        )
    times = pd.to_numeric(table["t"].str.strip(), errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise FrameTimesError(
            f"row {bad[0] + 1} of column `t` is missing or not a number ({table['t'].iloc[bad[0]]!r})",
            where=frametimes.url,
            fix="give a time in seconds for every frame (no empty cells, n/a or NaN)",
        )
    if n_frames is not None and len(times) != n_frames:  # None: checked later, against the decoded video
        raise FrameTimesError(
            f"the frame times file has {len(times)} rows but the video has {n_frames} decodable frames",
            where=f"{frametimes.url} and {video.url}",
            fix="give one row per decoded frame (frames the container discards, e.g. by an edit list, "
            "have no row), or remove the frame times file to use the video's own timestamps",
        )
    backwards = np.flatnonzero(np.diff(times) <= 0)
    if backwards.size:
        row = backwards[0] + 2
        before, after = float(times[row - 2]), float(times[row - 1])
        raise FrameTimesError(
            f"times do not increase at row {row} of column `t` ({before!r} then {after!r})",
            where=frametimes.url,
            fix="frame times must increase strictly, one row per frame in order",
        )
    return times
