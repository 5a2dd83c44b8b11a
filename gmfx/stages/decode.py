"""Decode stage: every video becomes a chunked Zarr store of RGB frames with exact per-frame times.

The store ``<out>/sub-XX/[ses-YY/]<recording>_frames.zarr`` holds ``frames`` ``(time, y, x, rgb)`` uint8,
chunked ``(chunk_frames, H, W, 3)`` and compressed with zstd, and the coordinates ``time`` (seconds,
from ``_frametimes.tsv`` when present, else the container's pts) and ``frame`` (0..n-1).

Planning indexes each video (demux only), checks its frame times and writes the store's template with
the coordinates. Each task then decodes one *segment* (whole chunks) and writes it chunk by chunk while
decoding the next chunk, so a task holds about three chunks in memory however long its segment is; once
every chunk is in, :meth:`RegionStore.mark_done` records the region as done.

Defaults, from measurements on 640x360 video (``benchmarks/decode.py``):

* ``chunk_frames``: 64 frames (about 2 s of video, 44 MB raw and 10-20 MB stored at 640x360), fewer
  when 64 frames would exceed 64 MiB raw; later stages read whole chunks, and objects of 10+ MB suit S3.
* ``segment_frames``: about 512 frames (whole chunks). A task seeks to the keyframe before its segment
  and decodes from there, so segments much longer than the keyframe interval waste little work, while
  several segments per video keep every worker busy.
* zstd level 2 (``compression_level``): frames stored 3.2x smaller than raw, compressing about 640
  frames/s on one core; level 1 compresses 13 % faster but stores 26 % more, level 3 stores 12 % less
  but compresses 22 % slower. Compression costs about twice the CPU of decoding, so it sets the speed.
"""

from __future__ import annotations

import hashlib
import queue
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dask.array
import numpy as np
import xarray as xr
from distributed import Client
from zarr.codecs import ZstdCodec

from gmfx._errors import ParameterError, parameter
from gmfx._execute import StorePlan, execute_plans
from gmfx._validate import check_frame_times
from gmfx._version import __version__
from gmfx._video import VideoIndex, display_rotation, index_video, iter_segment, output_size, read_frame_times
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
from gmfx.types import STAGES, Region, Task, split_regions

__all__ = ["STAGE", "RotationWarning", "plan_decode", "run_decode", "open_frames", "default_chunk_frames"]

STAGE = STAGES["decode"]

#: chunks hold at most this many frames, and at most ``MAX_CHUNK_BYTES`` raw
MAX_CHUNK_FRAMES = 64
MAX_CHUNK_BYTES = 64 * 2**20
#: frames a task decodes by default (rounded to whole chunks)
SEGMENT_FRAMES = 512
COMPRESSION_LEVEL = 2


class RotationWarning(UserWarning):
    """A video carries a display rotation that gmfx records but does not apply."""


def default_chunk_frames(width: int, height: int) -> int:
    """Frames per chunk: ``MAX_CHUNK_FRAMES``, fewer when that would exceed ``MAX_CHUNK_BYTES`` raw."""
    return max(1, min(MAX_CHUNK_FRAMES, MAX_CHUNK_BYTES // (width * height * 3)))


def plan_decode(
    recording: Recording,
    out: Location,
    *,
    chunk_frames: int | None = None,
    segment_frames: int | None = None,
    max_size: int | None = None,
    compression_level: int = COMPRESSION_LEVEL,
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
        Frames per Zarr chunk (default: :func:`default_chunk_frames`).
    segment_frames
        Frames per task, rounded up to whole chunks (default: about 512).
    max_size
        Shrink frames so that their longest side is at most this many pixels.
    compression_level
        zstd level of the stored frames.
    overwrite
        Replace a store written with other inputs or parameters.

    Raises
    ------
    VideoError, FrameTimesError, StorageError, ParameterError
    """
    _check_positive(chunk_frames=chunk_frames, segment_frames=segment_frames, max_size=max_size)
    index = index_video(recording.video)
    times = (
        index.times
        if recording.frametimes is None
        else read_frame_times(recording.frametimes, recording.video, index.n_frames)
    )
    if recording.frametimes is not None:
        check_frame_times(times, index.times, frametimes=recording.frametimes.url, video=recording.video.url)
    width, height = output_size(index.width, index.height, max_size)
    chunk = chunk_frames or default_chunk_frames(width, height)
    chunks_per_segment = max(1, -(-(segment_frames or SEGMENT_FRAMES) // chunk))
    regions = split_regions(index.n_frames, chunk, chunks_per_segment)
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
        # frames are stored as coded; players rotate them by this (portrait phone videos): meshes are in
        # the coded image's coordinates
        "source_rotation": display_rotation(recording.video),
    }
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
        "chunk_frames": chunk,
        "segment_frames": chunks_per_segment * chunk,
        "max_size": max_size,
        "width": width,
        "height": height,
        "compression_level": compression_level,
        "regions": len(regions),
    }
    store = RegionStore(store_location(out, recording, STAGE.name), STAGE.name)
    template, encoding = _template(times, width, height, chunk, compression_level, attrs)
    done = store.prepare(template, plan=plan, overwrite=overwrite, encoding=encoding)
    # the store is part of the key: the same video decoded into two stores must not share tasks
    token = plan_token(store.location, plan)
    tasks = [
        Task(
            key=f"decode-{recording.name}-{token}-{region.index:06d}",
            function=decode_region,
            args=(store, recording.video, index, region, chunk, max_size),
            weight=len(region),
        )
        for region in regions
        if region.index not in done
    ]
    return StorePlan(store=store, tasks=tasks, regions=len(regions), attrs=attrs, label=recording.name)


def decode_region(
    store: RegionStore, video: Location, index: VideoIndex, region: Region, chunk_frames: int, max_size: int | None
) -> int:
    """Decode ``region`` of ``video`` into ``store`` chunk by chunk; mark it done; return its frame count.

    Chunks are compressed and written in background threads while the next chunk decodes (at most
    two wait, which bounds memory); the region is marked done once all of them are in.
    """
    pending: list[Future] = []
    recycled: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # chunk buffers already written

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        while not recycled.empty():
            buffer = recycled.get()
            if buffer.shape == shape:
                return buffer
        return np.empty(shape, np.uint8)

    def write(time: slice, batch: np.ndarray) -> None:
        store.write_block({"frames": batch}, offsets={"time": time.start})
        recycled.put(batch)

    start = region.start
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gmfx-decode-write") as writer:
        segment = iter_segment(
            video, index, region.start, region.stop, batch=chunk_frames, max_size=max_size, allocate=allocate
        )
        for batch in segment:
            if len(pending) >= 2:
                pending.pop(0).result()
            pending.append(writer.submit(write, slice(start, start + len(batch)), batch))
            start += len(batch)
        for future in pending:
            future.result()
    store.mark_done(region.index)
    return len(region)


def run_decode(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client,
    chunk_frames: int | None = None,
    segment_frames: int | None = None,
    max_size: int | None = None,
    compression_level: int = COMPRESSION_LEVEL,
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
            overwrite=overwrite,
        )
        for recording in recordings
    ]
    execute_plans(client, plans, description="decode", progress=progress)
    write_dataset_description(out, recordings[0].root)
    return [plan.store.location for plan in plans]


def open_frames(location: LocationLike, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a complete frames store lazily (``frames`` with ``time`` and ``frame`` coordinates)."""
    return open_dataset(as_location(location, storage_options), stage=STAGE.name)


def _template(
    times: np.ndarray, width: int, height: int, chunk: int, level: int, attrs: dict
) -> tuple[xr.Dataset, dict]:
    n = len(times)
    frames = dask.array.zeros((n, height, width, 3), dtype=np.uint8, chunks=(chunk, height, width, 3))
    template = xr.Dataset(
        {"frames": (("time", "y", "x", "rgb"), frames)},
        coords={"time": ("time", times), "frame": ("time", np.arange(n, dtype=np.int64))},
        attrs=attrs,
    )
    template["time"].attrs["units"] = "s"
    encoding = {
        "frames": {"chunks": (chunk, height, width, 3), "compressors": [ZstdCodec(level=level)]},
        "time": {"chunks": (chunk,)},
        "frame": {"chunks": (chunk,)},
    }
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
