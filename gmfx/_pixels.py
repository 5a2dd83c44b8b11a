"""The decoder's own pixels: keep its planes (Y, U, V) and turn them into RGB later, exactly.

A decoded frame of a planar 8-bit YUV format (``yuv420p``, ``yuvj420p``, ``yuv422p``, ``yuv444p``,
``gray``, ...) is kept as its planes, each a ``(rows, columns)`` uint8 image; that costs a copy
(about 0.05 ms a 640x360 frame here) where converting to RGB costs 0.4-0.8 ms and stores 2x the bytes.

RGB is made later with the very conversion a plain ``frame.to_ndarray(format="rgb24")`` runs
(libswscale through PyAV), on a frame that libavcodec's rawvideo decoder rebuilds from the planes
with the source frame's properties: pixel format, size, colour matrix and range, interlacing (field
order) and chroma siting. The result is then exact by construction. PyAV does not expose a frame's
chroma siting, so :func:`pixel_format` finds it by trial: it fills a copy of a decoded frame with
noise, converts it, and keeps the first siting whose rebuilt frame converts to the same bytes (the
siting changes the result only where libswscale interpolates chroma, e.g. odd heights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import av
import numpy as np

__all__ = ["PLANE_NAMES", "PixelFormat", "PlanesToRgb", "copy_planes", "pixel_format", "same_properties"]

#: names of the stored planes, in the order of the pixel format's planes (components Y, U, V, alpha)
PLANE_NAMES = ("y_plane", "u_plane", "v_plane", "a_plane")
#: chroma sitings tried in order (libswscale reads an unspecified siting as "center")
_SITINGS = ("unspecified", "left", "center", "topleft", "top", "bottomleft", "bottom")


@dataclass(frozen=True)
class PixelFormat:
    """What rebuilding a decoded frame from its planes needs (stored in the frames store's attributes).

    Attributes
    ----------
    pixel_format
        libav's name of the decoder's pixel format (``yuv420p``, ...).
    width, height
        Frame size in pixels.
    planes
        ``(rows, columns)`` of every plane, in order (see :data:`PLANE_NAMES`).
    colorspace, color_range
        libav's codes of the colour matrix and range the decoder reported.
    interlaced
        Whether frames are interlaced (libswscale converts their fields separately).
    chroma_location
        Chroma siting that reproduces the decoder's frame (found by :func:`pixel_format`).
    """

    pixel_format: str
    width: int
    height: int
    planes: tuple[tuple[int, int], ...]
    colorspace: int
    color_range: int
    interlaced: bool
    chroma_location: str

    @property
    def plane_names(self) -> tuple[str, ...]:
        return PLANE_NAMES[: len(self.planes)]

    @property
    def frame_bytes(self) -> int:
        return sum(rows * columns for rows, columns in self.planes)

    def to_attrs(self) -> dict:
        attrs = asdict(self)
        attrs["planes"] = [list(shape) for shape in self.planes]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict) -> "PixelFormat":
        return cls(**{**attrs, "planes": tuple(tuple(int(n) for n in shape) for shape in attrs["planes"])})


def _plane_shapes(frame: av.VideoFrame) -> tuple[tuple[int, int], ...] | None:
    """The planes' shapes when every component is 8 bits in a plane of its own (Y, U, V, A order)."""
    fmt = frame.format
    components = fmt.components
    if fmt.is_rgb or fmt.has_palette or fmt.is_bit_stream or len(components) not in (1, 3, 4):
        return None
    if any(c.bits != 8 or c.plane != i for i, c in enumerate(components)) or len(frame.planes) != len(components):
        return None
    return tuple((int(p.height), int(p.width)) for p in frame.planes)


def copy_planes(frame: av.VideoFrame, out: Sequence[np.ndarray]) -> None:
    """Copy ``frame``'s planes into ``out`` (one ``(rows, columns)`` uint8 array a plane)."""
    for plane, target in zip(frame.planes, out):
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)  # rows may be padded
        target[...] = rows[:, : target.shape[1]]


def same_properties(frame: av.VideoFrame, pixels: PixelFormat) -> bool:
    """Whether ``frame`` has the format, size, colour and interlacing of ``pixels``."""
    return (
        frame.format.name == pixels.pixel_format
        and (frame.width, frame.height) == (pixels.width, pixels.height)
        and (frame.colorspace, frame.color_range) == (pixels.colorspace, pixels.color_range)
        and bool(frame.interlaced_frame) == pixels.interlaced
    )


class PlanesToRgb:
    """Converts stored planes to RGB frames, equal to ``to_ndarray(format="rgb24")`` of the decoded frames.

    One rawvideo decoder (libavcodec) rebuilds each frame with the source's properties; libswscale
    converts it on one thread (the caller parallelises over frames or chunks).
    """

    def __init__(self, pixels: PixelFormat) -> None:
        self.pixels = pixels
        context = av.CodecContext.create("rawvideo", "r")
        context.width, context.height, context.pix_fmt = pixels.width, pixels.height, pixels.pixel_format
        context.options = {
            "field_order": "tt" if pixels.interlaced else "progressive",
            "chroma_sample_location": pixels.chroma_location,
        }
        context.colorspace, context.color_range = pixels.colorspace, pixels.color_range
        context.open()
        self._context = context

    def frame(self, planes: Sequence[np.ndarray]) -> av.VideoFrame:
        """The decoded frame rebuilt from its planes (each ``(rows, columns)``)."""
        packet = av.Packet(np.concatenate([np.ascontiguousarray(p).reshape(-1) for p in planes]).tobytes())
        (frame,) = self._context.decode(packet)
        frame.colorspace, frame.color_range = self.pixels.colorspace, self.pixels.color_range
        return frame

    def __call__(self, *planes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 ``(n, H, W, 3)`` from planes ``(n, rows, columns)`` (one array a plane, in order)."""
        n = len(planes[0])
        out = np.empty((n, self.pixels.height, self.pixels.width, 3), np.uint8) if out is None else out
        for i in range(n):
            rgb = self.frame([p[i] for p in planes]).reformat(format="rgb24", threads=1)
            plane = rgb.planes[0]
            rows = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)
            out[i] = rows[:, : rgb.width * 3].reshape(rgb.height, rgb.width, 3)
        return out


def pixel_format(frame: av.VideoFrame) -> PixelFormat | str:
    """How a video's frames can be stored as planes and converted exactly, or why not (a sentence).

    ``frame`` is a decoded frame of the video: it is overwritten with noise (its properties stay),
    and the siting kept is the first whose rebuilt noise frame converts to the same RGB bytes.
    """
    shapes = _plane_shapes(frame)
    if shapes is None:
        return f"its pixel format {frame.format.name} is not 8-bit YUV or gray with a plane a component"
    frame.make_writable()  # the decoder's buffers become this frame's own, with the frame's properties
    generator = np.random.default_rng(0)
    planes = [generator.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    for plane, values in zip(frame.planes, planes):
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        rows[:, : values.shape[1]] = values
    expected = frame.to_ndarray(format="rgb24")
    for siting in _SITINGS:
        pixels = PixelFormat(
            pixel_format=frame.format.name,
            width=frame.width,
            height=frame.height,
            planes=shapes,
            colorspace=int(frame.colorspace),
            color_range=int(frame.color_range),
            interlaced=bool(frame.interlaced_frame),
            chroma_location=siting,
        )
        if np.array_equal(PlanesToRgb(pixels)(*[p[None] for p in planes])[0], expected):
            return pixels
    return f"no frame rebuilt from its {frame.format.name} planes converts to RGB as the decoder's frames do"
