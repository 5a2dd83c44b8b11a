"""Rendering entry points: videos of any mesh store as Dask tasks per segment, and stills.

A video is cut into segments of whole frames; each segment is one task that reads its vertices (and
frames) from the stores, draws them (:func:`gmfx.render._views.render_range`) and encodes them to H.264;
the client joins the segments into one mp4 with the store's own frame times (variable frame rates stay
variable). The mp4 appears under its name only once every segment is in: an interrupted run leaves no
video that looks finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import xarray as xr
from distributed import Client

from gmfx._errors import ParameterError, StorageError
from gmfx._execute import run_tasks
from gmfx.render._encode import encode_segment, join_segments, ticks
from gmfx.render._views import ViewOptions, ViewPlan, plan_view, render_range
from gmfx.storage import Location, LocationLike, as_location, plan_token
from gmfx.types import Task, split_regions

__all__ = ["SEGMENT_FRAMES", "render_frames", "render_still", "render_video", "open_mesh_store"]

#: frames per render task: 256 frames of 640x360 take about a second to draw and encode on one core,
#: and their mp4 is a few MB to send back
SEGMENT_FRAMES = 256

Source = LocationLike | xr.Dataset


def _location(source: LocationLike) -> Location:
    return as_location(source, where="source")


def open_mesh_store(source: Source) -> tuple[xr.Dataset, str]:
    """The dataset of ``source`` (a store URL/Location, opened lazily, or a dataset) and a name for messages."""
    if isinstance(source, xr.Dataset):
        return source, "the given dataset"
    location = _location(source)
    location.exists()  # one request first: an unreachable endpoint is one clear error, not zarr's parallel probes
    try:
        return xr.open_zarr(**location.zarr_kwargs()), location.url
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise StorageError(
            f"cannot open the mesh store ({type(error).__name__}: {error})",
            where=location.url,
            fix="give the URL of a store with v and tris (a recon, preproc or model store)",
        ) from error
    except Exception as error:  # noqa: BLE001 - an unreachable endpoint, refused credentials: one clear message
        raise location.error("the mesh store cannot be opened", error) from None


def _open_frames(frames: Source | None) -> xr.Dataset | None:
    if frames is None or isinstance(frames, xr.Dataset):
        return frames
    from gmfx.stages.decode import open_frames

    return open_frames(_location(frames))


def render_frames(
    source: Source, indices: Sequence[int], *, frames: Source | None = None, view: ViewOptions = ViewOptions()
) -> np.ndarray:
    """Draw frames ``indices`` of a mesh store as ``(n, H, W, 3)`` uint8 images (see :class:`ViewOptions`)."""
    ds, where = open_mesh_store(source)
    frames_ds = _open_frames(frames)
    plan = plan_view(ds, view, frames_ds, where=where)
    indices = np.asarray(indices, int)
    if indices.size and (indices.min() < 0 or indices.max() >= len(plan.times)):
        raise ParameterError(
            f"frame {indices.max() if indices.max() >= len(plan.times) else indices.min()} is outside the "
            f"store's {len(plan.times)} frames",
            where=where,
            fix=f"give frames 0 to {len(plan.times) - 1}",
        )
    return _draw(plan, _needed(ds, view).isel(time=indices), _frames_at(frames_ds, plan, indices))


def _needed(ds: xr.Dataset, view: ViewOptions) -> xr.Dataset:
    """Only the variables drawing reads (a task loads its whole time slice of them)."""
    names = ["v", "tris", *(["mat"] if "mat" in ds else []), *([view.color] if view.color in ds else [])]
    return ds[names]


def _frames_at(frames: xr.Dataset | None, plan: ViewPlan, indices: np.ndarray) -> xr.DataArray | None:
    if frames is None:
        return None
    return frames["frames"].isel(time=plan.frame_index[indices])


def _draw(plan: ViewPlan, ds_range: xr.Dataset, frames: xr.DataArray | None) -> np.ndarray:
    import dask

    with dask.config.set(scheduler="synchronous"):  # inside a task: no nested scheduling
        ds_range = ds_range.load()
        images = None if frames is None else np.asarray(frames.values)
    return render_range(plan, ds_range, images)


def render_still(
    source: Source,
    out: LocationLike,
    *,
    frame: int | None = None,
    time: float | None = None,
    frames: Source | None = None,
    view: ViewOptions = ViewOptions(),
) -> Location:
    """Draw one frame (by index, or the one nearest ``time`` seconds; default the middle) to a PNG."""
    from PIL import Image

    ds, _ = open_mesh_store(source)
    if frame is not None and time is not None:
        raise ParameterError("both a frame and a time were given", where="--frame / --time", fix="give one of them")
    times = np.asarray(ds["time"].values, np.float64)
    if time is not None:
        frame = int(np.argmin(np.abs(times - time)))
    elif frame is None:
        frame = len(times) // 2
    (image,) = render_frames(ds, [frame], frames=frames, view=view)
    target = _location(out)
    _write_atomic(target, _png(Image.fromarray(image)))
    return target


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomic(target: Location, data: bytes) -> None:
    """Write ``data`` to ``target`` under a temporary name, then rename: never a half-written file."""
    fs, path = target.filesystem()
    fs.makedirs(fs._parent(path), exist_ok=True)
    partial = path + ".partial"
    fs.pipe_file(partial, data)
    fs.mv(partial, path)


def _render_segment(plan: ViewPlan, ds_range: xr.Dataset, frames: xr.DataArray | None, origin: float) -> tuple[bytes, int]:
    """Task body: one segment drawn and encoded; its mp4 and the tick of its first frame."""
    images = _draw(plan, ds_range, frames)
    times = np.asarray(ds_range["time"].values, np.float64)
    return encode_segment(images, times), int(ticks(times[:1], origin)[0])


def video_tasks(
    source: Source, *, frames: Source | None = None, view: ViewOptions = ViewOptions(), segment_frames: int = SEGMENT_FRAMES, label: str = "render"
) -> list[Task]:
    """One task per segment of the video of ``source`` (results: ``(mp4 bytes, first tick)``)."""
    ds, where = open_mesh_store(source)
    frames_ds = _open_frames(frames)
    plan = plan_view(ds, view, frames_ds, where=where)
    if segment_frames < 1:
        raise ParameterError(f"segment_frames={segment_frames}", where="--segment-frames", fix="give 1 or more")
    token = plan_token(Location(label), {"source": where, "view": repr(view), "frames": len(plan.times)})
    tasks = []
    for region in split_regions(len(plan.times), segment_frames):
        indices = np.arange(region.start, region.stop)
        segment_plan = replace(plan, times=plan.times[region.slice], frame_index=None if plan.frame_index is None else plan.frame_index[region.slice])
        tasks.append(
            Task(
                key=f"gmfx-render-{token}-{region.index}",
                function=_render_segment,
                args=(segment_plan, _needed(ds, view).isel(time=region.slice), _frames_at(frames_ds, plan, indices), float(plan.times[0])),
                weight=len(region),
            )
        )
    return tasks


def render_video(
    source: Source,
    out: LocationLike,
    *,
    frames: Source | None = None,
    view: ViewOptions = ViewOptions(),
    client: Client | None = None,
    segment_frames: int = SEGMENT_FRAMES,
    progress: bool = True,
) -> Location:
    """Render a mesh store to an mp4 at ``out`` (local or any fsspec URL), segments in parallel.

    The video's frame times are the store's ``time`` coordinate, relative to its first frame.
    """
    target = _location(out)
    tasks = video_tasks(source, frames=frames, view=view, segment_frames=segment_frames, label=target.url)
    segments = run_tasks(client, tasks, description=f"render {target.name}", progress=progress)
    _write_atomic(target, join_segments(segments, view_comment(source, view)))
    return target


def view_comment(source: Source, view: ViewOptions) -> str:
    """What a video shows, written into its metadata: a video is kept on resume only when this matches."""
    where = source.url if isinstance(source, Location) else str(source) if not isinstance(source, xr.Dataset) else "dataset"
    return f"gmfx render of {where}: {view!r}"
