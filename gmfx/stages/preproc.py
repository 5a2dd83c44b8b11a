"""Preprocessing stages: recon store -> preproc store (align, interpolate, filter), preproc -> epochs store.

Layout (per recording, below the output root ``out``)::

    <name>_recon.zarr               read
    <name>_preproc.zarr             the result of the chain (align -> interpolate -> filter, the steps
                                    switched on); ``attrs["gmfx_history"]`` lists each step and its parameters
    <name>_preproc-scratch.zarr     unfiltered scratch of a chain with a filter: removed when the chain succeeds,
                                    kept after a failed filter so that the rerun resumes from it (never an output)
    <name>_epochs.zarr              epochs of the preproc store around the events of ``<name>_events.tsv``

Each single step (``gmfx align``, ``gmfx interpolate``, ``gmfx filter``) is the chain with the other
steps switched off, reading the store of the step before it and writing its own
(``<name>_aligned.zarr``, ``<name>_interpolated.zarr``, ``<name>_filtered.zarr``; see
:data:`gmfx.types.STAGES`).

Writing. A lazy result chunked along its first dimension is written as a template plus one region per
chunk (a task each, on the Dask client when one is given). A filter needs each vertex's whole time
series, so a chain with a filter first writes its unfiltered part to a scratch store whose ``v`` is
chunked along vertices as well; the filter then reads one block of vertices over the whole time axis
(a plain concatenation of chunks, bounded memory) and writes that block into the final store, which
holds the same chunking. Every region or block leaves a marker, so an interrupted run resumes, and
the store is marked complete only when every marker is in.

Speed (measured on a 2-core box, 5,023 vertices at 30 fps; see ``benchmarks/preproc.py``):

* each region task computes the alignment of its own frames plus the few halo frames interpolation
  needs (``align_with_frames`` hands its per-frame recipes to ``interpolate(frames=...)``), never whole
  neighbouring chunks;
* a task's graph is culled, not blockwise-fused by ``dask.optimize`` (fusion would repeat the shared
  fit once per output variable); a whole-recording reference (``first``, ``mean``) is computed once;
* the filter reads each vertex block with a single rechunk of the scratch store (a chained rechunk
  would make every block read the whole store) and runs a numba ``sosfiltfilt`` with SciPy's
  recurrence over all columns at once (~10x SciPy's per-column loop);
* the scratch store is uncompressed; float results use byte-shuffled LZ4 (smaller and several times
  faster than zarr's default zstd on float32 vertices);
* filter blocks are sized by work (:func:`vertex_block_size`): a short recording is one block (the
  example's 72 frames: 3 preproc tasks in all, where 8 blocks of 0.05 MB each cost 0.58 s of task time
  for 4 ms of filtering), a long one up to 48 MB a block.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import cloudpickle
import dask
import dask.array as da
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph
import xarray as xr
from distributed import Client
from zarr.codecs import BloscCodec

from gmfx import preproc as ops
from gmfx._checks import check_options
from gmfx._errors import EventsError, GmfxError
from gmfx._execute import StorePlan, execute_plans
from gmfx._validate import check_events, warn_short_stretches
from gmfx.dataset import Recording
from gmfx.storage import Location, LocationLike, RegionStore, as_location, open_dataset, plan_token, store_location
from gmfx.storage._fingerprint import file_digest, relative_name, require_chunks, store_fingerprint
from gmfx.storage._regions import _plan_json
from gmfx.storage._template import lazy_template
from gmfx.types import Task

__all__ = ["run_preproc", "run_epochs", "run_chain", "write_lazy", "chain", "vertex_block_size"]

#: float32 bytes of ``v`` per vertex block of a filtered store (the filter holds ~3x that in float64)
_BLOCK_BYTES = 48 * 2**20
#: vertex blocks a filtered store is split into when it is large enough (so one recording keeps workers busy)
_MIN_BLOCKS = 8
#: smallest block worth a task of its own: a filter task's fixed cost (its graph unpickled, two stores
#: opened, a marker written) was ~70 ms on a loaded 2-core box, and the numba filter runs at ~110-150 MB/s
#: of float32 input there, so a block under ~8 MB spends about as long being a task as being filtered
#: (the example's 72 frames x 478 vertices made 8 blocks of 0.05 MB: 0.58 s of task time for 4 ms of filtering)
_MIN_TASK_BYTES = 8 * 2**20
#: codecs of the scratch store: written once, read once, deleted; float noise barely compresses
_SCRATCH_ENCODING = {"compressors": None}
#: codecs of float time series in result stores: byte-shuffled LZ4 packs float32 vertices to ~84% at
#: several times the speed of zarr's default zstd (~91%), writing and reading
_FLOAT_ENCODING = {"compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]}
#: epochs per region of an epochs store
_EPOCHS_PER_REGION = 16

Options = bool | Mapping[str, Any] | None


def _options(value: Options) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    return {} if value is True else dict(value)


def _global_references(ds: xr.Dataset, align: Options, client: Client | None) -> Options:
    """``align`` options with a whole-recording reference (``"first"``, ``"mean"``) computed once.

    Left lazy, that reduction would sit in every region task's graph and be recomputed by each
    (reading the whole recording once per region)."""
    options = _options(align)
    if options is None or options.get("reference") not in ("first", "mean"):
        return align
    shape = ops.reference_shape(ds, options["reference"], vertices=options.get("vertices"), scale=options.get("scale", False))
    computed = client.compute(shape).result() if client is not None else shape.compute()
    return {**options, "reference": computed}


def chain(ds: xr.Dataset, *, align: Options = True, interpolate: Options = True, filter: Options = True) -> xr.Dataset:  # noqa: A002
    """The lazy chain align -> interpolate -> filter with the steps given (``True`` = defaults, a dict = options).

    Interpolation gets align's frame recipes, so that each chunk aligns only the frames it reads."""
    frames: dict[str, ops.FrameRecipe] = {}
    if (options := _options(align)) is not None:
        ds, frames = ops.align_with_frames(ds, **options)
    if (options := _options(interpolate)) is not None:
        ds = ops.interpolate(ds, **{"frames": frames, **options})
    if (options := _options(filter)) is not None:
        ds = ops.filter(ds, **options)
    return ds


# -- writing lazy results --------------------------------------------------------------------------


def _leading(ds: xr.Dataset) -> tuple[str, list[str]]:
    lead = ds["v"].dims[0]
    return lead, [name for name in ds.data_vars if ds[name].dims[:1] == (lead,)]


def _template(ds: xr.Dataset, chunk: int, vertex_chunk: int | None) -> xr.Dataset:
    """Every leading-dim variable as lazy zeros chunked by ``chunk`` (and ``vertex_chunk``); the rest computed."""
    lead, timed = _leading(ds)
    return lazy_template(ds, written=timed, chunks={lead: chunk, **({"vertex": vertex_chunk} if vertex_chunk else {})})


def _encoding(ds: xr.Dataset, timed: Sequence[str], *, scratch: bool = False) -> dict[str, dict]:
    if scratch:
        return {name: dict(_SCRATCH_ENCODING) for name in timed}
    return {name: dict(_FLOAT_ENCODING) for name in timed if ds[name].dtype.kind == "f"}


def _write_region(location: Location, stage: str, index: int, start: int, stop: int, graph: bytes) -> int:
    """Compute the pickled arrays of one region and write them (a task)."""
    arrays = cloudpickle.loads(graph)
    values = dict(zip(arrays, dask.compute(*arrays.values(), scheduler="sync"), strict=True))
    RegionStore(location, stage).write_region(index, slice(start, stop), values)
    return stop - start


def _write_vertex_block(location: Location, stage: str, index: int, start: int, stop: int, graph: bytes) -> int:
    """Compute ``v`` for vertices ``start:stop`` over the whole time axis and write it (a task)."""
    (values,) = dask.compute(cloudpickle.loads(graph), scheduler="sync")
    # retried, and marked done after the data; every chunk is written, also an all-NaN one
    RegionStore(location, stage).write_block({"v": values}, offsets={"vertex": start}, region=index)
    return stop - start


def _pickled(arrays: Mapping[str, da.Array] | da.Array) -> bytes:
    """The arrays with only the graph they need, pickled for one task.

    The graph is culled, not run through ``dask.optimize``: its blockwise fusion copies a shared
    per-chunk step (the alignment fit feeds ``v``, ``mat`` and ``motion``) into every output, which
    then computes it once per output.
    """
    single = isinstance(arrays, da.Array)
    named = {"": arrays} if single else dict(arrays)
    keys = set(flatten([array.__dask_keys__() for array in named.values()]))
    graph = HighLevelGraph.merge(*(array.__dask_graph__() for array in named.values())).cull(keys)
    graph = dict(graph)  # a plain task dict: small, and pickles without the layers' own machinery
    culled = {name: da.Array(graph, array.name, array.chunks, meta=array._meta) for name, array in named.items()}
    return cloudpickle.dumps(culled[""] if single else culled)


def plan_lazy(
    ds: xr.Dataset, location: Location, *, stage: str, source: str | Mapping[str, Any], overwrite: bool = False,
    chunk: int | None = None, vertex_chunk: int | None = None, label: str = "", scratch: bool = False,
) -> StorePlan:  # fmt: skip
    """Write the template of a lazy result and plan one task per chunk along its leading dimension."""
    lead, timed = _leading(ds)
    length = ds.sizes[lead]
    chunk = int(chunk or ds["v"].chunks[0][0])
    regions = [(i, a, min(a + chunk, length)) for i, a in enumerate(range(0, length, chunk))]
    plan = {"regions": len(regions), "inputs": source, "history": ds.attrs.get("gmfx_history", []), "chunk": chunk,
            "vertex_chunk": vertex_chunk}  # fmt: skip
    store = RegionStore(location, stage)
    encoding = _encoding(ds, timed, scratch=scratch)
    done = store.prepare(_template(ds, chunk, vertex_chunk), plan=plan, overwrite=overwrite, encoding=encoding)
    arrays = {name: ds[name].data.rechunk({0: chunk}) for name in timed}
    token = plan_token(location, plan)
    tasks = [
        Task(
            key=f"{stage}-region-{token}-{index:06d}",
            function=_write_region,
            args=(location, stage, index, a, b, _pickled({n: x[a:b] for n, x in arrays.items()})),
            weight=b - a,
        )
        for index, a, b in regions
        if index not in done
    ]
    return StorePlan(store=store, tasks=tasks, regions=len(regions), label=label or location.url)


def _plan_filtered(
    filtered: xr.Dataset, location: Location, *, source: Mapping[str, Any], overwrite: bool, chunk: int, vertex_chunk: int, label: str
) -> StorePlan:
    """Plan one task per vertex block of ``v`` (whole time axis) plus one for every other time variable."""
    _, timed = _leading(filtered)
    n_vertex = filtered.sizes["vertex"]
    blocks = [(i, a, min(a + vertex_chunk, n_vertex)) for i, a in enumerate(range(0, n_vertex, vertex_chunk))]
    plan = _filtered_plan(filtered, source, chunk, vertex_chunk)
    store = RegionStore(location, "preproc")
    done = store.prepare(_template(filtered, chunk, vertex_chunk), plan=plan, overwrite=overwrite, encoding=_encoding(filtered, timed))
    token = plan_token(location, plan)
    v = filtered["v"].data
    tasks = [
        Task(
            key=f"preproc-block-{token}-{index:06d}",
            function=_write_vertex_block,
            args=(location, "preproc", index, a, b, _pickled(v[:, :, a:b])),
            weight=b - a,
        )
        for index, a, b in blocks
        if index not in done
    ]
    others = {name: filtered[name].data for name in timed if name != "v"}
    if len(blocks) not in done:
        n_time = filtered.sizes["time"]
        tasks.append(
            Task(
                key=f"preproc-rest-{token}",
                function=_write_region,
                args=(location, "preproc", len(blocks), 0, n_time, _pickled(others)),
            )
        )
    return StorePlan(store=store, tasks=tasks, regions=len(blocks) + 1, label=label)


def _source_fingerprint(source: Location) -> dict[str, str]:
    """What a preproc or epochs plan records of the store it reads; checks that none of its chunks is missing."""
    stage = "recon" if source.name.endswith("_recon.zarr") else "preproc"
    require_chunks(source, stage)
    return store_fingerprint(source, stage)


def _filtered_plan(filtered: xr.Dataset, source: Mapping[str, Any], chunk: int, vertex_chunk: int) -> dict[str, Any]:
    blocks = -(-filtered.sizes["vertex"] // vertex_chunk)
    return {"regions": blocks + 1, "inputs": source, "history": filtered.attrs.get("gmfx_history", []),
            "chunk": chunk, "vertex_chunk": vertex_chunk, "layout": "vertex-blocks"}  # fmt: skip


def _finished(location: Location, plan: Mapping[str, Any]) -> bool:
    """True when the store at ``location`` is complete and was written with ``plan``."""
    attrs = RegionStore(location, "preproc").attrs()
    return bool(attrs and attrs.get("gmfx_complete") and attrs.get("gmfx_plan") == _plan_json(plan))


def _finalize_attrs(ds: xr.Dataset, source: Location) -> dict[str, Any]:
    return {"gmfx_history": ds.attrs.get("gmfx_history", []), "gmfx_source": source.url}


def _scratch(location: Location) -> Location:
    return Location(location.url.removesuffix(".zarr") + "-scratch.zarr", location.storage_options)


def _vertex_chunk(ds: xr.Dataset) -> int:
    return vertex_block_size(*ds["v"].shape)


def vertex_block_size(n_time: int, n_face: int, n_vertex: int, n_coord: int) -> int:
    """Vertices per block of a filtered store, sized by work: at most ``_BLOCK_BYTES`` of float32 a
    block; ``_MIN_BLOCKS`` blocks when each still holds ``_MIN_TASK_BYTES``, fewer (down to one) for
    shorter recordings, whose filtering would otherwise cost less than scheduling its tasks."""
    vertex_bytes = 4 * n_time * n_face * n_coord
    total = vertex_bytes * n_vertex
    blocks = max(1, -(-total // _BLOCK_BYTES), min(_MIN_BLOCKS, total // _MIN_TASK_BYTES))
    return int(max(1, min(-(-n_vertex // blocks), _BLOCK_BYTES // vertex_bytes)))


def run_chain(
    sources: Sequence[Location],
    targets: Sequence[Location],
    *,
    client: Client | None = None,
    align: Options = True,
    interpolate: Options = True,
    filter: Options = True,  # noqa: A002
    overwrite: bool = False,
    progress: bool = True,
    labels: Sequence[str] | None = None,
) -> list[Location]:
    """Run the chain on each recon store of ``sources`` and write each preproc store of ``targets``."""
    for step, value in (("align", align), ("interpolate", interpolate), ("filter", filter)):
        if isinstance(value, Mapping):
            check_options(value, getattr(ops, step), function="run_preproc", name=step)
    labels = list(labels or [t.url for t in targets])
    filter_options = _options(filter)
    if filter_options is not None:  # a too-short stretch with a face is left NaN with a warning, by default
        filter_options = {"on_short": "nan", **filter_options}
    recons = [ops.open_recon(s) for s in sources]  # codes-only stores get their vertices lazily
    fingerprints = [_source_fingerprint(s) for s in sources]
    opened = [chain(ds, align=_global_references(ds, align, client), interpolate=interpolate, filter=False) for ds in recons]
    if filter_options is None:
        plans = [
            plan_lazy(ds, t, stage="preproc", source=f, overwrite=overwrite, label=name)
            for ds, f, t, name in zip(opened, fingerprints, targets, labels, strict=True)
        ]
        for plan, ds, s in zip(plans, opened, sources, strict=True):
            plan.attrs = _finalize_attrs(ds, s)
        execute_plans(client, plans, description="preproc", progress=progress)
        return list(targets)
    # a filter needs whole time series: unfiltered scratch with vertex blocks, then one task per block
    chunks = [int(ds["v"].chunks[0][0]) for ds in opened]
    vertex_chunks = [_vertex_chunk(ds) for ds in opened]
    # a finished store with the same plan needs nothing (its scratch store is gone: don't redo it)
    requested = list(targets)
    todo = [
        overwrite or not _finished(t, _filtered_plan(ops.filter(ds, vertex_chunk=vchunk, **filter_options), f, chunk, vchunk))
        for ds, f, t, chunk, vchunk in zip(opened, fingerprints, targets, chunks, vertex_chunks, strict=True)
    ]  # fmt: skip
    if not all(todo):
        opened, fingerprints, sources, targets, labels, chunks, vertex_chunks = (
            [x for x, keep in zip(column, todo, strict=True) if keep]
            for column in (opened, fingerprints, sources, targets, labels, chunks, vertex_chunks)
        )
    scratch = [_scratch(t) for t in targets]
    plans = []
    for ds, f, where, name, chunk, vchunk in zip(opened, fingerprints, scratch, labels, chunks, vertex_chunks, strict=True):
        plans.append(plan_lazy(ds, where, stage="preproc", source=f, overwrite=overwrite, chunk=chunk,
                               vertex_chunk=vchunk, label=name, scratch=True))  # fmt: skip
    execute_plans(client, plans, description="preproc (align, interpolate)", progress=progress)
    if filter_options.get("on_short", "error") == "nan":
        for where, name in zip(scratch, labels, strict=True):
            warn_short_stretches(open_dataset(where, stage="preproc"), filter_options, recording=name)
    plans = []
    for s, f, where, t, name, chunk, vchunk in zip(sources, fingerprints, scratch, targets, labels, chunks, vertex_chunks, strict=True):
        filtered = ops.filter(open_dataset(where, stage="preproc"), vertex_chunk=vchunk, **filter_options)
        plan = _plan_filtered(filtered, t, source=f, overwrite=overwrite, chunk=chunk, vertex_chunk=vchunk, label=name)
        plan.attrs = _finalize_attrs(filtered, s)
        plans.append(plan)
    try:
        execute_plans(client, plans, description="preproc (filter)", progress=progress)
    except GmfxError as error:  # say what the scratch stores left behind are, and that a rerun uses them
        kept = ", ".join(where.url for where in scratch)
        error.fix = (f"{error.fix}; " if error.fix else "") + (
            f"the unfiltered scratch ({kept}) is kept so that the rerun filters without redoing align and "
            "interpolate; it is not a result and is removed when preproc succeeds"
        )
        raise
    for where in scratch:
        RegionStore(where, "preproc").delete()
    return requested


def run_preproc(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client | None = None,
    align: Options = True,
    interpolate: Options = True,
    filter: Options = True,  # noqa: A002
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Location]:
    """Align, interpolate and filter each recording's recon store into its preproc store.

    ``align``, ``interpolate`` and ``filter`` take ``True`` (defaults), ``False``/``None`` (skip) or a
    dict of options for :func:`gmfx.preproc.align` etc. ``out`` is a path, URL (with
    ``storage_options``) or :class:`Location`. Returns the preproc stores' locations.
    """
    out = as_location(out, storage_options, where="out")
    return run_chain(
        [store_location(out, r, "recon") for r in recordings],
        [store_location(out, r, "preproc") for r in recordings],
        client=client, align=align, interpolate=interpolate, filter=filter, overwrite=overwrite,
        progress=progress, labels=[r.name for r in recordings],
    )  # fmt: skip


def run_epochs(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[Location]:
    """Cut each recording's preproc store into epochs around its events (``options`` go to :func:`gmfx.preproc.epoch`)."""
    out = as_location(out, storage_options, where="out")
    check_options(options, ops.epoch, function="run_epochs", name="options")
    plans = []
    for recording in recordings:
        if recording.events is None:
            raise EventsError(
                f"recording {recording.name} has no events file",
                where=posixpath.dirname(recording.video.url),
                fix=f"add {recording.name}_events.tsv (onset, duration, trial_type) next to the video",
            )
        check_events(recording.events, anchor=options.get("anchor", "onset"), where=recording.events.url)
        source = store_location(out, recording, "preproc")
        inputs = {
            **_source_fingerprint(source),
            "events": relative_name(recording.events, recording.root),
            "events_digest": file_digest(recording.events),
        }
        result = ops.epoch(open_dataset(source, stage="preproc"), recording.events, **options)
        # the plan names the events file by its path in the dataset (a moved dataset keeps its plan)
        history = [entry.replace(json.dumps(recording.events.url)[1:-1], inputs["events"])
                   for entry in result.attrs.get("gmfx_history", [])]  # fmt: skip
        result.attrs["gmfx_history"] = history
        plan = plan_lazy(result, store_location(out, recording, "epoch"), stage="epoch", source=inputs,
                         overwrite=overwrite, chunk=_EPOCHS_PER_REGION, label=recording.name)  # fmt: skip
        plan.attrs = _finalize_attrs(result, source)
        plans.append(plan)
    execute_plans(client, plans, description="epochs", progress=progress)
    return [plan.store.location for plan in plans]


def write_lazy(
    ds: xr.Dataset, location: Location, *, stage: str, client: Client | None = None, overwrite: bool = False,
    progress: bool = True,
) -> Location:  # fmt: skip
    """Write any lazy result of :mod:`gmfx.preproc` (chunked along its first dimension) as a finished store."""
    plan = plan_lazy(ds, location, stage=stage, source=str(ds.attrs.get("gmfx_source", "")), overwrite=overwrite)
    plan.attrs = {"gmfx_history": ds.attrs.get("gmfx_history", [])}
    execute_plans(client, [plan], description=stage, progress=progress)
    return location

