"""H.264 encoding of rendered segments and their join into one mp4, with the source's frame times.

Each segment is encoded on its own (libx264, no B-frames, so decoding order is presentation order and
segments join without reordering) into an in-memory mp4 whose timestamps are the frames' own times on
a 1/90000 s clock, relative to the first frame of the video. Joining remuxes the packets of the
segments into one mp4 without re-encoding: a variable frame rate stays variable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

__all__ = ["CLOCK", "encode_segment", "join_segments", "read_comment", "read_times"]

#: timestamp unit of the written videos: 90 kHz, MPEG's clock, exact for 24/25/30/60 fps and 1/90 ms otherwise
CLOCK = Fraction(1, 90000)
#: x264 constant rate factor: 18 is visually lossless for rendered meshes at a few hundred kB/s
CRF = 18


def ticks(times: np.ndarray, origin: float) -> np.ndarray:
    """``times`` (s) after ``origin`` on the :data:`CLOCK`."""
    return np.round((np.asarray(times, np.float64) - origin) / float(CLOCK)).astype(np.int64)


def encode_segment(images: np.ndarray, times: np.ndarray, *, crf: int = CRF) -> bytes:
    """An mp4 of ``images`` ``(n, H, W, 3)`` uint8 shown at ``times`` (s).

    The segment's own timestamps start at 0 (the mp4 muxer shifts a later start by the encoder's delay);
    :func:`join_segments` puts each segment back at its tick.
    """
    n, height, width, _ = images.shape
    own = ticks(times, float(times[0]))
    rate = _nominal_rate(times)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = CLOCK
        stream.codec_context.time_base = CLOCK
        stream.options = {"crf": str(crf), "bf": "0", "preset": "veryfast"}
        for image, tick in zip(images, own):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = int(tick)
            frame.time_base = CLOCK
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _nominal_rate(times: np.ndarray) -> Fraction:
    """The median frame rate (the encoder's rate control needs one; timestamps stay the real ones)."""
    steps = np.diff(np.asarray(times, np.float64))
    steps = steps[steps > 0]
    return Fraction(1 / float(np.median(steps))).limit_denominator(1001) if steps.size else Fraction(30)


def join_segments(segments: Sequence[tuple[bytes, int]], comment: str = "") -> bytes:
    """One mp4 (bytes) holding the packets of the mp4 ``segments`` in order, not re-encoded, each
    shifted to start at its tick (``(mp4, tick)`` pairs: the tick of the segment's first frame);
    ``comment`` goes into its metadata (gmfx writes the view there, to know a video it can keep)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        if comment:
            output.metadata["comment"] = comment
        stream = None
        for data, start in segments:
            with av.open(io.BytesIO(data), mode="r") as source:
                video = source.streams.video[0]
                if stream is None:
                    stream = output.add_stream_from_template(video)
                    stream.time_base = CLOCK
                for packet in source.demux(video):
                    if packet.dts is None:  # the flush packet
                        continue
                    shift = int(start * CLOCK / packet.time_base)
                    packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                    packet.stream = stream
                    output.mux(packet)
    return buffer.getvalue()


def read_comment(data: bytes | str) -> str:
    """The ``comment`` of a video's metadata ("" when it has none)."""
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else data) as container:
        return container.metadata.get("comment", "")


def read_times(data: bytes | str) -> np.ndarray:
    """Presentation times (s) of the frames of a video (bytes or path), in presentation order."""
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else data) as container:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream) if packet.dts is not None]
        return np.sort(np.asarray(pts, np.float64)) * float(stream.time_base)
