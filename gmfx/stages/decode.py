"""Decode stage: every video becomes a sharded Zarr store of the decoder's own pixels with exact per-frame times.

The store ``<out>/sub-XX/[ses-YY/]<recording>_frames.zarr`` holds, for a video of planar 8-bit YUV (what
H.264, HEVC, VP9 and AV1 decoders give), the decoder's planes ``y_plane`` ``(time, y, x)`` and ``u_plane``,
``v_plane`` ``(time, chroma_y, chroma_x)`` uint8 with the ``pixels`` attribute (pixel format, colour
matrix and range, interlacing, chroma siting) that converting them needs; :func:`open_frames` shows them
as ``frames`` ``(time, y, x, rgb)`` uint8, converted chunk by chunk, equal to a plain PyAV
``to_ndarray(format="rgb24")`` decode (see :mod:`gmfx._pixels`). Resized frames (``max_size``) and other
pixel formats are stored as ``frames`` RGB (``frames_layout="rgb"``). The coordinates are ``time``
(seconds, from ``_frametimes.tsv`` when present, else the container's pts) and ``frame`` (0..n-1).

Planning indexes each video (demux only), checks its frame times and writes the store's template with
the coordinates. Each task decodes one *segment* of whole shards, writing each shard (one object per
plane) in the background while it decodes the next, so a task holds at most two shards of raw pixels;
once every shard is in, :meth:`RegionStore.mark_done` records the region as done.

Defaults, measured on 640x360 H.264 here (``benchmarks/frames_codecs.py``, CPU per frame to store):

* planes instead of RGB: 0.05 ms instead of 0.4-0.8 ms to take a frame from the decoder, and zstd
  level 2 stores 94 kB a frame instead of 216 kB (RGB) in 1.0 ms instead of 2.3 ms; level 1 stores
  113 kB, level 3 84 kB for 15 % more CPU, blosc-lz4 172 kB for 25 % less.
* ``chunk_frames`` (the unit a read decompresses): at most 1.5 MB of raw pixels, 4 frames at 640x360,
  so one frame (a QC still) reads about 0.36 MB; 1 frame a chunk costs 2x the CPU of 4 per frame.
* shards (the objects): at most 256 MiB of raw pixels, 776 frames at 640x360 (about 70 MB stored), so
  an hour of 30 fps video is about 140 shards a plane and 560 objects with the markers.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import av
import dask.array
import numpy as np
import xarray as xr
import zarr
from distributed import Client
from zarr.codecs import ZstdCodec

from gmfx._errors import ParameterError, StorageError, VideoError, parameter
from gmfx._execute import StorePlan, execute_plans
from gmfx._pixels import PixelFormat, PlanesToRgb, copy_planes, pixel_format, same_properties
from gmfx._threads import task_threads
from gmfx._validate import check_frame_times
from gmfx._version import __version__
from gmfx._video import (
    VideoIndex,
    display_rotation,
    first_frame,
    index_video,
    iter_decoded,
    output_size,
    read_frame_times,
    rgb_into,
)
from gmfx.dataset import Recording
from gmfx.storage import (
    Location,
    LocationLike,
    RegionStore,
    as_location,
    open_dataset,
    plan_token,
    store_location,
    write_dataset_description,
)
from gmfx.storage._fingerprint import relative_name
from gmfx.storage._frames_schema import FRAMES_SCHEMA, converter, frames_layout, keep_other_schema
from gmfx.storage._location import redact
from gmfx.storage._retry import retry_transient
from gmfx.storage._shards import ShardBuilder, ShardReader, object_key, shard_level
from gmfx.types import STAGES, Region, Task, split_regions

__all__ = [
    "STAGE", "RotationWarning", "FrameReader", "plan_decode", "run_decode", "open_frames", "default_chunk_frames",
]  # fmt: skip

STAGE = STAGES["decode"]

#: a chunk (what one read decompresses) holds at most this many raw bytes, and at least one frame
MAX_CHUNK_BYTES = 1_500_000
#: a shard (one stored object a plane, what one task writes) holds at most this many raw bytes
MAX_SHARD_BYTES = 256 * 2**20
COMPRESSION_LEVEL = 2
#: dimensions of the stored planes, by plane name
_PLANE_DIMS = {
    "y_plane": ("time", "y", "x"),
    "u_plane": ("time", "chroma_y", "chroma_x"),
    "v_plane": ("time", "chroma_y", "chroma_x"),
    "a_plane": ("time", "y", "x"),
}
_RGB_DIMS = ("time", "y", "x", "rgb")


class RotationWarning(UserWarning):
    """A video carries a display rotation that gmfx records but does not apply."""


@dataclass(frozen=True)
class _Layout:
    """What a decode task stores of each frame: the planes (``pixels``) or RGB frames of ``width`` x ``height``."""

    pixels: PixelFormat | None
    width: int
    height: int
    max_size: int | None

    @property
    def variables(self) -> dict[str, tuple[int, ...]]:
        """Stored variable -> shape of one frame of it."""
        if self.pixels is None:
            return {"frames": (self.height, self.width, 3)}
        return dict(zip(self.pixels.plane_names, self.pixels.planes))

    @property
    def frame_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.variables.values())


def default_chunk_frames(frame_bytes: int) -> int:
    """Frames per chunk: as many as fit in ``MAX_CHUNK_BYTES`` raw, at least one."""
    return max(1, MAX_CHUNK_BYTES // frame_bytes)


def _shard_frames(chunk: int, frame_bytes: int, segment_frames: int | None) -> int:
    """Frames per shard: whole chunks within ``MAX_SHARD_BYTES`` raw, or the segment when it is shorter."""
    by_bytes = chunk * max(1, MAX_SHARD_BYTES // (chunk * frame_bytes))
    return by_bytes if segment_frames is None else min(by_bytes, -(-segment_frames // chunk) * chunk)


def plan_decode(
    recording: Recording,
    out: Location,
    *,
    chunk_frames: int | None = None,
    segment_frames: int | None = None,
    max_size: int | None = None,
    compression_level: int = COMPRESSION_LEVEL,
    frames_layout: Literal["auto", "rgb"] = "auto",
    overwrite: bool = False,
) -> StorePlan:
    """Index ``recording``'s video, write its frames store's template, and list the regions left to do.

    Parameters
    ----------
    recording
        The recording to decode (its video, and ``_frametimes.tsv`` when present).
    out
        The output root; the store goes to ``<out>/sub-XX/[ses-YY/]<recording>_frames.zarr``.
    chunk_frames
        Frames per Zarr chunk, the unit a read decompresses (default: :func:`default_chunk_frames`).
    segment_frames
        Frames per task, rounded up to whole shards (default: one shard, at most 256 MiB raw).
    max_size
        Shrink frames so that their longest side is at most this many pixels (stored as RGB).
    compression_level
        zstd level of the stored pixels.
    frames_layout
        ``"auto"``: the decoder's planes when they convert to RGB exactly (planar 8-bit YUV, no
        ``max_size``), else RGB frames; ``"rgb"``: RGB frames always.
    overwrite
        Replace a store written with other inputs or parameters.

    Raises
    ------
    VideoError, FrameTimesError, StorageError, ParameterError
    """
    _check_positive(chunk_frames=chunk_frames, segment_frames=segment_frames, max_size=max_size)
    if frames_layout not in ("auto", "rgb"):
        raise ParameterError(
            f"frames_layout must be 'auto' or 'rgb', not {frames_layout!r}",
            where=parameter("run_decode", "frames_layout"),
            fix="give 'auto' (the decoder's planes when exact) or 'rgb'",
        )
    index = index_video(recording.video)
    times = (
        index.times
        if recording.frametimes is None
        else read_frame_times(recording.frametimes, recording.video, index.n_frames)
    )
    if recording.frametimes is not None:
        check_frame_times(times, index.times, frametimes=recording.frametimes.url, video=recording.video.url)
    width, height = output_size(index.width, index.height, max_size)
    first = first_frame(recording.video)
    rotation = display_rotation(recording.video, first)
    layout, why_rgb = _choose_layout(first, frames_layout, width, height, max_size)
    chunk = min(chunk_frames or default_chunk_frames(layout.frame_bytes), index.n_frames)
    shard = min(_shard_frames(chunk, layout.frame_bytes, segment_frames), -(-index.n_frames // chunk) * chunk)
    regions = split_regions(index.n_frames, shard)
    attrs = {
        "gmfx_version": __version__,
        "source": recording.video.url,
        "frame_times_source": "container" if recording.frametimes is None else recording.frametimes.url,
        "codec": index.codec,
        "source_width": index.width,
        "source_height": index.height,
        "width": width,
        "height": height,
        "time_base": f"{index.time_base.numerator}/{index.time_base.denominator}",
        "n_frames": index.n_frames,
        "chunk_frames": chunk,
        "shard_frames": shard,
        "frames_schema": FRAMES_SCHEMA,
        "frames_layout": "rgb" if layout.pixels is None else "planes",
        # frames are stored as coded; players rotate them by this (portrait phone videos): meshes are in
        # the coded image's coordinates
        "source_rotation": rotation,
    }
    if layout.pixels is not None:
        attrs["pixels"] = layout.pixels.to_attrs()
    else:
        attrs["frames_layout_reason"] = why_rgb
    if attrs["source_rotation"]:
        warnings.warn(
            f"recording {recording.name}: the video asks players to rotate it by {attrs['source_rotation']} degrees; "
            "gmfx stores and reconstructs the frames as coded (not rotated) and records the rotation in the "
            "frames store's attribute source_rotation",
            RotationWarning,
            stacklevel=2,
        )
    plan = {
        # what was decoded, by content and by path below the dataset root (a moved dataset keeps its plan)
        "inputs": {
            "video": relative_name(recording.video, recording.root),
            "video_bytes": index.size,
            "video_pts": _digest(index.pts.tobytes()),
            "frame_times": "container" if recording.frametimes is None else relative_name(recording.frametimes, recording.root),
            "frame_times_digest": _digest(times.tobytes()),
        },
        "frames_schema": FRAMES_SCHEMA,
        "frames_layout": attrs["frames_layout"],
        "pixels": attrs.get("pixels"),
        "chunk_frames": chunk,
        "segment_frames": shard,
        "max_size": max_size,
        "width": width,
        "height": height,
        "compression_level": compression_level,
        "regions": len(regions),
    }
    store = RegionStore(store_location(out, recording, STAGE.name), STAGE.name)
    if not overwrite and keep_other_schema(store.attrs(), plan, store.location.url):
        return StorePlan(store=store, tasks=[], regions=len(regions), attrs={}, label=recording.name)
    template, encoding = _template(times, layout, chunk, shard, compression_level, attrs)
    done = store.prepare(template, plan=plan, overwrite=overwrite, encoding=encoding)
    # the store is part of the key: the same video decoded into two stores must not share tasks
    token = plan_token(store.location, plan)
    tasks = [
        Task(
            key=f"decode-{recording.name}-{token}-{region.index:06d}",
            function=decode_region,
            args=(store, recording.video, index, region, layout, shard),
            weight=len(region),
        )
        for region in regions
        if region.index not in done
    ]
    return StorePlan(store=store, tasks=tasks, regions=len(regions), attrs=attrs, label=recording.name)


def _choose_layout(
    first: av.VideoFrame | None, frames_layout: str, width: int, height: int, max_size: int | None
) -> tuple[_Layout, str]:
    """The layout to store, and why it is RGB when it is."""
    rgb = functools.partial(_Layout, None, width, height, max_size)
    if frames_layout == "rgb":
        return rgb(), "frames_layout='rgb' was asked for"
    if first is None:
        return rgb(), "no frame decodes"
    if (width, height) != (first.width, first.height):
        return rgb(), f"frames are resized to {width}x{height} (max_size)"
    found = pixel_format(first)
    if isinstance(found, str):
        return rgb(), found
    return _Layout(found, width, height, max_size), ""


def decode_region(
    store: RegionStore, video: Location, index: VideoIndex, region: Region, layout: _Layout, shard: int
) -> int:
    """Decode ``region`` of ``video`` into ``store`` shard by shard; mark it done; return its frame count.

    Each chunk is compressed by a pool of :func:`~gmfx._threads.task_threads` threads as soon as its
    frames are decoded (the decoder runs on half as many), and each shard is stored in one write once its
    chunks are in (:class:`~gmfx.storage._shards.ShardBuilder`); the task
    holds at most two shards of raw pixels. The region is marked done once every shard is in. With
    planes, every frame must have the format and colour properties of the plan, and the first frame of
    every shard must convert to the RGB the decoder's own frame gives (a check of the conversion on
    real pixels, at 1/shard of the cost).
    """
    variables = layout.variables
    group = zarr.open_group(**store.location.zarr_kwargs(), mode="r", zarr_format=3)
    arrays = {name: group[name] for name in variables}
    chunk = arrays[next(iter(variables))].chunks[0]
    levels = {shard_level(array) for array in arrays.values()}
    if len(levels) != 1 or None in levels:
        raise StorageError(
            f"the frames store's arrays {', '.join(variables)} are not the zstd shards this gmfx writes",
            where=store.location.url,
            fix="rewrite the store: gmfx decode --overwrite",
        )
    level = levels.pop()
    convert = None if layout.pixels is None else PlanesToRgb(layout.pixels)
    shard_buffers: list[dict[str, np.ndarray]] = []
    jobs: list[list[Future]] = [[], []]  # the compressions and the write of each buffer set's last shard

    def finished(which: int) -> None:
        for job in jobs[which]:
            job.result()  # raises what failed in the writer thread
        jobs[which] = []

    threads = task_threads()
    with (
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gmfx-decode-compress") as compress,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmfx-decode-write") as writer,
    ):
        start, filled, which = region.start, 0, 0
        # half the threads decode (frame threading costs 0.4 ms more CPU a frame than one thread, measured
        # here), all compress
        frames = iter_decoded(video, index, region.start, region.stop, threads=max(1, threads // 2))
        for position, frame in enumerate(frames, region.start):
            if filled == 0:
                finished(which)  # the previous shard of this buffer set is stored: its buffers are free
                if len(shard_buffers) == which:
                    shard_buffers.append({name: np.empty((shard, *shape), np.uint8) for name, shape in variables.items()})
                buffers, builders = shard_buffers[which], _builders(variables, chunk, shard, level)
            if convert is None:
                rgb_into(frame, buffers["frames"][filled], layout.max_size)
            else:
                planes = [buffers[name][filled] for name in variables]
                _check_frame(frame, layout.pixels, video, index, position)
                copy_planes(frame, planes)
                if filled == 0:
                    _check_conversion(frame, planes, convert, video, index, position)
            filled += 1
            last = position + 1 == region.stop
            if filled % chunk == 0 or last:
                i = (filled - 1) // chunk
                jobs[which] += [compress.submit(b.add, i, buffers[name][i * chunk : filled]) for name, b in builders.items()]
            if filled == shard or last:
                # the shard is written once its chunks are compressed, by one thread in order
                jobs[which].append(writer.submit(_write_when_done, list(jobs[which]), store, arrays, builders, start, -(-filled // chunk)))
                start, filled, which = position + 1, 0, 1 - which
        finished(0)
        finished(1)
    store.mark_done(region.index)
    return len(region)


def _write_when_done(
    compressions: list[Future], store: RegionStore, arrays: Mapping[str, zarr.Array], builders: Mapping[str, ShardBuilder],
    start: int, chunks: int,
) -> None:
    for job in compressions:
        job.result()
    _write_shard(store, arrays, builders, start, chunks)


def _builders(variables: Mapping[str, tuple[int, ...]], chunk: int, shard: int, level: int) -> dict[str, ShardBuilder]:
    return {name: ShardBuilder((chunk, *shape), -(-shard // chunk), level) for name, shape in variables.items()}


def _write_shard(
    store: RegionStore, arrays: Mapping[str, zarr.Array], builders: Mapping[str, ShardBuilder], start: int, chunks: int
) -> None:
    """Store the shards (one a variable) of ``chunks`` chunks that start at frame ``start``, each in one write."""
    fs, root = store.location.filesystem()
    for name, builder in builders.items():
        array = arrays[name]
        key = object_key(array, start // array.shards[0])
        path = posixpath.join(root, name, key)
        data = builder.finish(chunks)

        def put(path: str = path, data: bytes = data, key: str = key, name: str = name) -> None:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)  # a no-op on object stores
            try:
                fs.pipe_file(path, data)
            except Exception as error:
                # an object store's error names no key (S3's "503 SlowDown"): say which shard was written
                error.add_note(f"while writing chunk {store.location.url.rstrip('/')}/{name}/{key}")
                raise

        retry_transient(
            put,
            what=f"writing {name} from time {start} of the decode store",
            where=store.location.url,
            redactor=lambda text: redact(text, store.location.storage_options),
        )


def _check_frame(frame: av.VideoFrame, pixels: PixelFormat, video: Location, index: VideoIndex, position: int) -> None:
    if not same_properties(frame, pixels):
        raise VideoError(
            f"frame {position} (t={index.times[position]:.6f} s) is {frame.format.name} {frame.width}x{frame.height} "
            f"(colour matrix {frame.colorspace}, range {frame.color_range}, interlaced {frame.interlaced_frame}) "
            f"while the first frame is {pixels.pixel_format} {pixels.width}x{pixels.height} (colour matrix "
            f"{pixels.colorspace}, range {pixels.color_range}, interlaced {pixels.interlaced}): the video changes "
            "format midway, which the planes layout cannot store",
            where=video.url,
            fix="decode it with frames_layout='rgb' (gmfx decode --frames-layout rgb --overwrite)",
        )


def _check_conversion(
    frame: av.VideoFrame, planes: list[np.ndarray], convert: PlanesToRgb, video: Location, index: VideoIndex, position: int
) -> None:
    expected = frame.to_ndarray(format="rgb24")
    if not np.array_equal(convert(*[p[None] for p in planes])[0], expected):
        raise VideoError(
            f"frame {position} (t={index.times[position]:.6f} s) rebuilt from its planes does not convert to the "
            "RGB the decoder's frame gives (its chroma siting or colour properties changed midway)",
            where=video.url,
            fix="decode it with frames_layout='rgb' (gmfx decode --frames-layout rgb --overwrite)",
        )


def run_decode(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client,
    chunk_frames: int | None = None,
    segment_frames: int | None = None,
    max_size: int | None = None,
    compression_level: int = COMPRESSION_LEVEL,
    frames_layout: Literal["auto", "rgb"] = "auto",
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Location]:
    """Decode every recording's video into its frames store on ``client``; return the stores.

    All recordings run as one submission; a rerun after a failure or an interruption decodes only the
    segments that are missing, and a complete store with the same inputs and parameters is kept as is.
    ``out`` is a path, URL (with ``storage_options``) or :class:`Location`. See :func:`plan_decode`
    for the other parameters.
    """
    out = as_location(out, storage_options, where="out")
    if not recordings:
        return []
    plans = [
        plan_decode(
            recording,
            out,
            chunk_frames=chunk_frames,
            segment_frames=segment_frames,
            max_size=max_size,
            compression_level=compression_level,
            frames_layout=frames_layout,
            overwrite=overwrite,
        )
        for recording in recordings
    ]
    execute_plans(client, plans, description="decode", progress=progress)
    write_dataset_description(out, recordings[0].root)
    return [plan.store.location for plan in plans]


def open_frames(location: LocationLike, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a complete frames store lazily: ``frames`` ``(time, y, x, rgb)`` uint8 with ``time`` and ``frame``
    coordinates, whatever its layout (planes are converted to RGB chunk by chunk when read; see
    :func:`gmfx.storage._frames_schema.rgb_view`)."""
    return open_dataset(as_location(location, storage_options), stage=STAGE.name)


class FrameReader:
    """Reads RGB frames ``[start:stop]`` of a complete frames store on a worker, whatever its layout.

    Planes are read and converted on the worker: ``[start:stop]`` through :class:`ShardReader` (one
    ranged read per shard per plane, indexes cached: make one reader per task) when every array is
    sharded as the decode stage writes it, else through Zarr, as are orthogonal selections;
    ``chunk_names(start, stop)`` names the stored objects a read touches, for messages.
    """

    def __init__(self, location: Location) -> None:
        group = zarr.open_group(**location.zarr_kwargs(), mode="r", zarr_format=3)
        layout = frames_layout(dict(group.attrs), location.url)
        self.pixels = None if layout == "rgb" else PixelFormat.from_attrs(dict(group.attrs)["pixels"])
        names = ["frames"] if self.pixels is None else list(self.pixels.plane_names)
        self.arrays = [group[name] for name in names]
        sharded = all(shard_level(array) is not None for array in self.arrays)
        self._shards = ShardReader(self.arrays, location) if sharded else None

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.arrays[0].chunks

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(time, y, x, rgb)`` of the RGB frames."""
        if self.pixels is None:
            return tuple(self.arrays[0].shape)
        return (self.arrays[0].shape[0], self.pixels.height, self.pixels.width, 3)

    def __getitem__(self, time: slice) -> np.ndarray:
        """RGB frames ``[start:stop]``."""
        start, stop, step = time.indices(self.arrays[0].shape[0])
        if self._shards is None or step != 1:
            return self._rgb([array[time] for array in self.arrays])
        return self._rgb(self._shards.read(start, max(start, stop)))

    def get_orthogonal_selection(self, selection: tuple[Sequence[int]]) -> np.ndarray:
        """RGB frames at the time indices ``selection[0]`` (as zarr's orthogonal selection, time only)."""
        (times,) = selection
        return self._rgb([array.get_orthogonal_selection((times,)) for array in self.arrays])

    def _rgb(self, values: list[np.ndarray]) -> np.ndarray:
        return values[0] if self.pixels is None else converter(self.pixels)(*values)

    def chunk_names(self, start: int, stop: int) -> str:
        """The stored objects (chunks or shards) that frames ``[start, stop)`` read."""
        names = []
        for array in self.arrays:
            step = array.shards[0] if array.shards else array.chunks[0]
            names += [f"{array.basename}/{object_key(array, i)}" for i in range(start // step, -(-stop // step))]
        return ", ".join(names)


def _template(
    times: np.ndarray, layout: _Layout, chunk: int, shard: int, level: int, attrs: dict
) -> tuple[xr.Dataset, dict]:
    n = len(times)
    data, encoding = {}, {}
    for name, shape in layout.variables.items():
        dims = _RGB_DIMS if name == "frames" else _PLANE_DIMS[name]
        data[name] = (dims, dask.array.zeros((n, *shape), dtype=np.uint8, chunks=(shard, *shape)))
        encoding[name] = {"chunks": (chunk, *shape), "shards": (shard, *shape), "compressors": [ZstdCodec(level=level)]}
    template = xr.Dataset(
        data, coords={"time": ("time", times), "frame": ("time", np.arange(n, dtype=np.int64))}, attrs=attrs
    )
    template["time"].attrs["units"] = "s"
    encoding.update({"time": {"chunks": (n,)}, "frame": {"chunks": (n,)}})
    return template, encoding


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ParameterError(
                f"{name} must be a positive number of {'pixels' if name == 'max_size' else 'frames'}, not {value}",
                where=parameter("run_decode", name),
                fix="give a value of 1 or more, or leave it out for the default",
            )
