"""Analysis stages: preproc store + events -> ``_glm.zarr``; fits -> a group ``_glm.zarr``; fits -> generated movements.

Layout (below the output root ``out``)::

    sub-01/<name>_glm.zarr                        per recording: gmfx.glm of <name>_preproc.zarr and <name>_events.tsv
    group/task-<task>_glm.zarr                    gmfx.group of the task's per-recording fits
    sub-01/<name>_cond-<condition>_generated.zarr gmfx.generate of a fit (group/task-<task>_cond-... for the group)

Writing. Every variable with a ``vertex`` axis is written in vertex blocks (one task each: the block's
fit over the whole recording, so memory follows the block, not the recording's length), each block
leaves a marker, and the store is marked complete only when every block is in; a rerun resumes. The
store's attributes hold the design and contrasts (``gmfx_design``), the operation history
(``gmfx_history``), the source store and the software versions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import xarray as xr
from distributed import Client

from gmfx import analysis
from gmfx._errors import EventsError, ParameterError
from gmfx._execute import StorePlan, execute_plans
from gmfx.analysis._api import versions
from gmfx.dataset import Recording
from gmfx.stages.preproc import _encoding, _pickled
from gmfx.storage import Location, RegionStore, open_dataset, plan_token, store_location
from gmfx.storage._template import lazy_template
from gmfx.types import Task

__all__ = ["glm", "group", "generate", "write_result", "glm_location", "group_location", "generated_location"]

#: vertices per block of stores whose variables are not chunked along vertex yet (group, generate)
_DEFAULT_BLOCK = 512


def glm_location(out: Location, recording: Recording) -> Location:
    """``<out>/sub-01/[ses-1/]<name>_glm.zarr``."""
    return out.child(recording.relative_dir, f"{recording.name}_glm.zarr")


def group_location(out: Location, task: str) -> Location:
    """``<out>/group/task-<task>_glm.zarr``."""
    return out.child("group", f"task-{task}_glm.zarr")


def generated_location(fit: Location, condition: str) -> Location:
    """The generated movement of ``condition`` beside its fit: ``..._cond-<condition>_generated.zarr``."""
    label = re.sub(r"[^A-Za-z0-9]+", "", condition) or "condition"
    return Location(fit.url.removesuffix("_glm.zarr") + f"_cond-{label}_generated.zarr", fit.storage_options)


# -- writing ----------------------------------------------------------------------------------------
def _vertex_blocks(ds: xr.Dataset) -> list[tuple[int, int, int]]:
    chunks = next((ds[n].chunksizes["vertex"] for n in ds.data_vars if "vertex" in ds[n].dims and ds[n].chunks), None)
    sizes = chunks or (_DEFAULT_BLOCK,) * -(-ds.sizes["vertex"] // _DEFAULT_BLOCK)
    if len(set(sizes[:-1])) > 1:
        sizes = (max(sizes),) * len(sizes)
    step = int(sizes[0])
    n = ds.sizes["vertex"]
    return [(i, a, min(a + step, n)) for i, a in enumerate(range(0, n, step))]


def _blocked(ds: xr.Dataset) -> list[str]:
    return [n for n in ds.data_vars if "vertex" in ds[n].dims and n not in ("template",)]


def plan_result(ds: xr.Dataset, location: Location, *, stage: str, source: str, overwrite: bool = False, label: str = "") -> StorePlan:
    """Write the template of a lazy analysis result and plan one task per vertex block."""
    blocks = _vertex_blocks(ds)
    step = blocks[0][2] - blocks[0][1]
    blocked = _blocked(ds)
    plan = {"regions": len(blocks), "source": source, "history": ds.attrs.get("gmfx_history", []), "vertex_chunk": step,
            "layout": "vertex-blocks"}  # fmt: skip
    store = RegionStore(location, stage)
    template = lazy_template(ds, written=blocked, chunks={"vertex": step})
    done = store.prepare(template, plan=plan, overwrite=overwrite, encoding=_encoding(ds, blocked))
    token = plan_token(location, plan)
    tasks = []
    for index, a, b in blocks:
        if index in done:
            continue
        arrays = {}
        for name in blocked:
            data = ds[name].data if isinstance(ds[name].data, da.Array) else da.from_array(ds[name].data)
            arrays[name] = data[(slice(None),) * ds[name].dims.index("vertex") + (slice(a, b),)]
        tasks.append(Task(key=f"{stage}-block-{token}-{index:06d}", function=_write_block,
                          args=(location, stage, index, a, b, _pickled(arrays)), weight=b - a))  # fmt: skip
    attrs = {"gmfx_history": ds.attrs.get("gmfx_history", []), "gmfx_source": source, "gmfx_versions": json.dumps(versions())}
    if "gmfx_design" in ds.attrs:
        attrs["gmfx_design"] = ds.attrs["gmfx_design"]
    return StorePlan(store=store, tasks=tasks, regions=len(blocks), attrs=attrs, label=label or location.url)


def _write_block(location: Location, stage: str, index: int, start: int, stop: int, graph: bytes) -> int:
    """Compute the vertex block ``start:stop`` of every blocked variable and write it (a task); chunks that
    hold only the fill value (NaN: vertices without data) are left unwritten and read as NaN."""
    import cloudpickle

    arrays = cloudpickle.loads(graph)
    values = dict(zip(arrays, dask.compute(*arrays.values(), scheduler="sync"), strict=True))
    RegionStore(location, stage).write_block(values, offsets={"vertex": start}, region=index, write_empty_chunks=False)
    return stop - start


def write_result(
    ds: xr.Dataset, location: Location, *, stage: str = "glm", client: Client | None = None, overwrite: bool = False,
    progress: bool = True, source: str = "",
) -> Location:  # fmt: skip
    """Write a lazy :mod:`gmfx.analysis` result as a finished store (vertex blocks, resumable)."""
    plan = plan_result(ds, location, stage=stage, source=source or str(ds.attrs.get("gmfx_source", "")), overwrite=overwrite)
    execute_plans(client, [plan], description=stage, progress=progress)
    return location


# -- stages over a dataset ---------------------------------------------------------------------------
def glm(
    recordings: Sequence[Recording],
    out: Location,
    *,
    client: Client | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> list[Location]:
    """Fit each recording's preproc store to its events (``options`` go to :func:`gmfx.glm`); return the fits' locations."""
    plans = []
    for recording in recordings:
        if recording.events is None:
            raise EventsError(
                f"recording {recording.name} has no events file",
                where=recording.video.url.rsplit("/", 1)[0],
                fix=f"add {recording.name}_events.tsv (onset, duration, trial_type) next to the video",
            )
        source = store_location(out, recording, "preproc")
        fit = analysis.glm(open_dataset(source, stage="preproc"), recording.events, **options)
        plans.append(plan_result(fit, glm_location(out, recording), stage="glm", source=source.url, overwrite=overwrite, label=recording.name))
    execute_plans(client, plans, description="glm", progress=progress)
    return [plan.store.location for plan in plans]


def group(
    recordings: Sequence[Recording],
    out: Location,
    *,
    client: Client | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> list[Location]:
    """Combine the fits of each task's recordings into ``group/task-<task>_glm.zarr`` (``options`` go to :func:`gmfx.group`)."""
    tasks: dict[str, list[Recording]] = {}
    for recording in recordings:
        tasks.setdefault(recording.task, []).append(recording)
    plans = []
    for task, members in sorted(tasks.items()):
        if len(members) < 2:
            raise ParameterError(
                f"task {task} has {len(members)} recording(s); a group needs at least 2",
                where=", ".join(r.name for r in members),
                fix="select more participants, or leave out --group",
            )
        fits = []
        for recording in members:
            fit = open_dataset(glm_location(out, recording), stage="glm")
            fit.attrs["gmfx_source"] = glm_location(out, recording).url
            fits.append(fit)
        combined = analysis.group(fits, **options)
        plans.append(plan_result(combined, group_location(out, task), stage="glm", source=", ".join(f.attrs["gmfx_source"] for f in fits),
                                 overwrite=overwrite, label=f"group task-{task}"))  # fmt: skip
    execute_plans(client, plans, description="glm (group)", progress=progress)
    return [plan.store.location for plan in plans]


def generate(
    fits: Sequence[Location],
    *,
    conditions: Sequence[str] | None = None,
    client: Client | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> list[Location]:
    """Write the movement each condition predicts (all conditions by default) beside each fit store."""
    plans = []
    for location in fits:
        fit = open_dataset(location, stage="glm")
        for condition in conditions or [str(c) for c in fit["condition"].values]:
            movement = analysis.generate(fit, condition, **options)
            target = generated_location(location, condition)
            plans.append(plan_result(movement, target, stage="generate", source=location.url, overwrite=overwrite, label=target.name))
    execute_plans(client, plans, description="generate", progress=progress)
    return [plan.store.location for plan in plans]
