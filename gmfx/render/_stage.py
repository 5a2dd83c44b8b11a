"""``gmfx render`` over a dataset: one video (or still) per recording, all segments as one submission."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distributed import Client

from gmfx._errors import ParameterError
from gmfx._execute import run_tasks
from gmfx.dataset import Recording
from gmfx.render._api import SEGMENT_FRAMES, _write_atomic, render_still, video_tasks, view_comment
from gmfx.render._encode import join_segments, read_comment
from gmfx.render._views import ViewOptions
from gmfx.storage import Location, LocationLike, as_location, store_location
from gmfx.types import STAGES

__all__ = ["run_render", "render_location", "RENDERABLE"]

#: stores with ``v (time, face, vertex, coord)`` that gmfx's stages write
RENDERABLE = ("recon", "preproc", "align", "interpolate", "filter")


def render_location(out: Location, recording: Recording, store: str, view: ViewOptions, ending: str = ".mp4") -> Location:
    """``<out>/sub-XX/[ses-YY/]<recording>_<store>_<space>_<panels>[_<color>]<ending>``."""
    name = f"{recording.name}_{STAGES[store].suffix}_{view.space}_{'-'.join(view.panels)}"
    return out.child(recording.relative_dir, name + (f"_{view.color}" if view.color else "") + ending)


def _finished(target: Location, comment: str) -> bool:
    """The video exists and shows what is asked (its metadata names the same store and view)."""
    if not target.exists():
        return False
    with target.open("rb") as handle:
        return read_comment(handle.read()) == comment


@dataclass(frozen=True)
class _Job:
    target: Location
    tasks: list
    comment: str


def run_render(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client | None,
    store: str = "recon",
    view: ViewOptions = ViewOptions(),
    frame: int | None = None,
    time: float | None = None,
    segment_frames: int = SEGMENT_FRAMES,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Location]:
    """Render ``store`` (recon, preproc, ...) of every recording: an mp4 each, or a PNG of one ``frame``
    (or the frame nearest ``time`` seconds) when given. A video that exists and shows the same view of
    the same store (its metadata says so) is kept unless ``overwrite``; one of another view is redone."""
    if store not in RENDERABLE:
        raise ParameterError(f"cannot render the {store!r} store", where="--store", fix=f"use one of {', '.join(RENDERABLE)}")
    out = as_location(out, where="run_render(out=...)")
    uses_frames = view.space == "image" or view.needs_frames
    targets: list[Location] = []
    jobs: list[_Job] = []
    for recording in recordings:
        source = store_location(out, recording, store)
        frames = store_location(out, recording, "decode") if uses_frames else None
        if frame is not None or time is not None:
            label = f"frame-{frame}" if frame is not None else f"time-{time:g}s"
            target = render_location(out, recording, store, view, f"_{label}.png")
            targets.append(render_still(source, target, frame=frame, time=time, frames=frames, view=view))
            continue
        target = render_location(out, recording, store, view)
        targets.append(target)
        if not overwrite and _finished(target, view_comment(source, view)):
            continue
        tasks = video_tasks(source, frames=frames, view=view, segment_frames=segment_frames, label=target.url)
        jobs.append(_Job(target, tasks, view_comment(source, view)))
    results = run_tasks(client, [task for job in jobs for task in job.tasks], description="render", progress=progress)
    position = 0
    for job in jobs:
        _write_atomic(job.target, join_segments(results[position : position + len(job.tasks)], job.comment))
        position += len(job.tasks)
    return targets
