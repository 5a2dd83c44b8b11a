"""Real test videos written with PyAV, whose frames say which frame they are.

Every frame carries its index as a row of black and white blocks (one block per bit, most significant
first) over a background that changes with the index, so a shifted, dropped or repeated frame is
visible and :func:`read_frame_number` recovers the index from a decoded frame even after lossy
compression.

Sizes: libx264 with ``yuv420p`` (4:2:0, the default) needs even widths and heights; for odd sizes such
as 97x75 pass ``pix_fmt="yuv444p"`` (libx264's High 4:4:4 profile), or use ``codec="ffv1"`` in ``.mkv``.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import tempfile
from collections.abc import Mapping, Sequence
from fractions import Fraction

import av
import numpy as np
import pandas as pd

from gmfx.storage import Location

__all__ = ["FRAME_NUMBER_BITS", "frame_pattern", "read_frame_number", "write_video", "write_bids_recording"]

#: frame indices up to ``2**FRAME_NUMBER_BITS - 1`` can be written into a frame
FRAME_NUMBER_BITS = 12

_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}


def _band(height: int, width: int) -> tuple[int, int]:
    """Height of the band of bit blocks and width of one block."""
    return max(4, height // 3), width // FRAME_NUMBER_BITS


def frame_pattern(index: int, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image ``(height, width, 3)`` that shows ``index`` as bit blocks on a moving gradient."""
    if not 0 <= index < 2**FRAME_NUMBER_BITS:
        raise ValueError(f"frame index {index} does not fit in {FRAME_NUMBER_BITS} bits")
    band, block = _band(height, width)
    if block < 4:
        raise ValueError(f"a {width}x{height} frame is too small for {FRAME_NUMBER_BITS} bit blocks of 4 pixels")
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x * 255 // max(width - 1, 1) + 7 * index) % 256
    image[..., 1] = (y * 255 // max(height - 1, 1) + 13 * index) % 256
    image[..., 2] = (31 * index) % 256
    bits = [(index >> (FRAME_NUMBER_BITS - 1 - b)) & 1 for b in range(FRAME_NUMBER_BITS)]
    for b, bit in enumerate(bits):
        image[:band, b * block : (b + 1) * block] = 255 * bit
    return image


def read_frame_number(image: np.ndarray) -> int:
    """The index that :func:`frame_pattern` wrote into ``image`` (also after lossy coding or resizing)."""
    height, width = image.shape[:2]
    band, block = _band(height, width)
    value = 0
    for b in range(FRAME_NUMBER_BITS):
        # the centre of each block, away from edges that lossy coding blurs
        cell = image[band // 4 : band - band // 4, b * block + block // 4 : (b + 1) * block - block // 4]
        value = (value << 1) | int(cell.mean() > 127)
    return value


def write_video(
    target: str | os.PathLike | Location,
    *,
    n_frames: int = 48,
    width: int = 160,
    height: int = 120,
    fps: int = 25,
    times: Sequence[float] | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    keyint: int | None = None,
    bframes: int | None = None,
    crf: int | None = 18,
    frames: Sequence[np.ndarray] | None = None,
    faststart: bool = False,
) -> Location:
    """Encode a real video file whose frames show their index (see :func:`frame_pattern`).

    Parameters
    ----------
    target
        Local path or location (any fsspec URL); the extension picks the container.
    n_frames, width, height, fps
        Number and size of frames; ``fps`` sets the timestamps unless ``times`` is given.
    times
        Presentation time of every frame in seconds (variable frame rate), stored on a 1/90000 s clock.
    codec, pix_fmt
        Encoder and pixel format (``yuv444p`` for odd sizes with libx264).
    keyint, bframes
        Keyframe interval (``g``) and the number of consecutive B-frames (``bf``) of the encoder.
    crf
        libx264 quality (lower is better); ignored by other encoders.
    frames
        RGB images to encode instead of the numbered pattern (their number sets ``n_frames``).
    faststart
        Put an mp4's index (``moov``) before the frame data, as streaming files do: cutting such a
        file short leaves it readable up to the cut, which tests of truncated files need.
    """
    location = target if isinstance(target, Location) else Location(os.fspath(target))
    extension = posixpath.splitext(location.url)[1].lower()
    if extension not in _FORMATS:
        raise ValueError(f"unknown video extension {extension!r}; use one of {', '.join(_FORMATS)}")
    if frames is not None:
        n_frames = len(frames)
        height, width = frames[0].shape[:2]
    if times is not None and len(times) != n_frames:
        raise ValueError(f"{len(times)} times for {n_frames} frames")
    clock = Fraction(1, 90000) if times is not None else Fraction(1, fps)
    options = {}
    if keyint is not None:
        options["g"] = str(keyint)
    if bframes is not None:
        options["bf"] = str(bframes)
    if codec == "libx264":
        options["x264-params"] = "scenecut=0"  # keyframes exactly every `keyint` frames
        if crf is not None:
            options["crf"] = str(crf)
    with tempfile.TemporaryDirectory(prefix="gmfx-video-") as folder:
        encoded = os.path.join(folder, f"video{extension}")  # a real file: faststart rewrites it
        muxer_options = {"movflags": "faststart"} if faststart else {}
        with av.open(encoded, mode="w", format=_FORMATS[extension], options=muxer_options) as container:
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.codec_context.time_base = clock
            for i in range(n_frames):
                image = frames[i] if frames is not None else frame_pattern(i, height, width)
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.time_base = clock
                frame.pts = round(times[i] / clock) if times is not None else i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        fs, path = location.filesystem()
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(encoded, path)
    return location


def write_bids_recording(
    root: str | os.PathLike | Location,
    *,
    subject: str,
    task: str,
    video: str | os.PathLike | bytes | Mapping,
    session: str | None = None,
    run: str | None = None,
    extension: str = ".mp4",
    frametimes: Sequence[float] | str | None = None,
    events: pd.DataFrame | str | None = None,
) -> Location:
    """Write one recording of a BIDS-like dataset below ``root``; return the video's location.

    Parameters
    ----------
    root
        The dataset folder (local path or location, e.g. ``s3://bucket/study``).
    subject, task, session, run
        BIDS labels without their prefixes (``"01"``, ``"mini"``).
    video
        A video file to copy (path), its bytes, or keyword arguments for :func:`write_video`.
    frametimes
        Times in seconds for ``_frametimes.tsv`` (column ``t``), or the file's raw text.
    events
        A table for ``_events.tsv``, or the file's raw text.
    """
    base = root if isinstance(root, Location) else Location(os.fspath(root))
    name = "_".join(
        [f"sub-{subject}"]
        + ([f"ses-{session}"] if session else [])
        + [f"task-{task}"]
        + ([f"run-{run}"] if run else [])
    )
    folder = base.child(f"sub-{subject}", *([f"ses-{session}"] if session else []))
    fs, folder_path = folder.filesystem()
    fs.makedirs(folder_path, exist_ok=True)
    target = folder.child(f"{name}_video{extension}")
    if isinstance(video, Mapping):
        write_video(target, **video)
    else:
        data = video if isinstance(video, bytes) else pathlib.Path(video).read_bytes()
        fs.pipe_file(posixpath.join(folder_path, target.name), data)
    if frametimes is not None:
        if isinstance(frametimes, str):
            text = frametimes
        else:
            text = "t\n" + "".join(f"{t!r}\n" for t in map(float, frametimes))
        fs.pipe_file(posixpath.join(folder_path, f"{name}_frametimes.tsv"), text.encode())
    if events is not None:
        text = events if isinstance(events, str) else events.to_csv(sep="\t", index=False, na_rep="n/a")
        fs.pipe_file(posixpath.join(folder_path, f"{name}_events.tsv"), text.encode())
    return target
