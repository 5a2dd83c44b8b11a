"""Reconstruction: frames store -> per-frame face meshes, one Dask task per time segment.

Each task reads its segment of frames from the frames store (local or object storage), runs the
backend loaded once per worker process, tracks faces within the segment and writes its own region of
the recon store. Tasks of GPU models carry ``resources={"GPU": 1}`` so only GPU workers run them. With
more than one face, segments are tracked independently and then given one shared face index
(:func:`gmfx.models._tracking.stitch_segments`) before the store is marked complete.

Models with a per-person identity (``Backend.identity``, e.g. EMICA's MICA shape) run two passes:

1. one task per recording reads ``Backend.identity_frames`` frames evenly spaced over it, calls
   ``estimate_identity`` and writes ``identity_<code>`` (face, <code>_param), ``identity_frame`` (face,
   identity_sample: the frame numbers used, -1 padded) and ``identity_signature`` as the store's last
   region (its marker makes a rerun reuse it);
2. every segment task reads those identities from the store it writes and passes them to
   ``reconstruct(..., identities=...)``; faces go to the slot of their identity (no stitching).

Pass 2 starts when pass 1 of every recording is written: a barrier of one identity task, which keeps
each segment task a function of stored inputs (a retried or resumed segment uses the stored identity
bit for bit). A recording in which pass 1 sees no face keeps NaN identity rows and NaN segments.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from distributed import Client

from gmfx._errors import GmfxWarning, ModelError, ParameterError, StorageError, parameter
from gmfx._execute import StorePlan, run_tasks
from gmfx._threads import limit_threads
from gmfx._version import __version__
from gmfx.cluster import GPU_FIX, require_resource, resolve_device
from gmfx.dataset import Recording
from gmfx.models import Backend, Face, Identity, get_backend, load_backend
from gmfx.models._output import pack_faces
from gmfx.models._tracking import segment_ends, stitch_segments
from gmfx.stages.decode import FrameReader, open_frames
from gmfx.storage import Location, LocationLike, RegionStore, as_location, open_dataset, plan_token, redact, store_location
from gmfx.storage._fingerprint import require_chunks, store_fingerprint
from gmfx.storage._retry import retry_transient
from gmfx.types import STAGES, Region, Task, split_regions

__all__ = [
    "STAGE",
    "LowDetectionWarning",
    "identity_sample",
    "plan_recon",
    "read_identities",
    "run_recon",
    "stitch_store",
]

STAGE = STAGES["recon"]

#: frames per task (rounded to whole frames-store chunks): restarting MediaPipe's tracker costs about
#: 20 ms (under 2% of 256 frames), and short segments spread a video evenly over the workers
SEGMENT_FRAMES = 256
#: below this fraction of frames with a face, recon warns
LOW_DETECTION_FRACTION = 0.5
_FRAMES_VARIABLES = {"frames": ("time", "y", "x", "rgb"), "time": ("time",), "frame": ("time",)}
_IDENTITY_KEY = "recon-identity-"


class LowDetectionWarning(GmfxWarning):
    """A face was found in few frames of a recording."""


def plan_recon(
    recording: Recording,
    out: Location,
    *,
    model: str | type[Backend] = "mediapipe",
    device: str = "auto",
    batch_size: int | None = None,
    max_faces: int = 1,
    overwrite: bool = False,
    segment_frames: int = SEGMENT_FRAMES,
    model_options: Mapping[str, Any] | None = None,
    client: Client | None = None,
    save_vertices: bool = False,
) -> StorePlan:
    """Write the recon store's template for ``recording`` and plan a task per unfinished segment.

    The frames store must be complete. ``device="auto"`` is resolved with ``client``'s workers when
    given (cpu otherwise). Models whose vertices follow from their codes (``derives_vertices``) store
    codes and ``mat`` only, unless ``save_vertices``.
    """
    backend = get_backend(model)
    device = resolve_device(backend, device, client)
    if max_faces < 1:
        raise ParameterError(f"max_faces must be at least 1, not {max_faces}", where=parameter("run_recon", "max_faces"), fix="use 1 or more")
    batch = batch_size or backend.batch_size
    if batch < 1:
        raise ParameterError(f"batch_size must be at least 1, not {batch}", where=parameter("run_recon", "batch_size"), fix="use 1 or more")
    options = dict(model_options or {})
    frames_location = store_location(out, recording, "decode")
    frames = _open_frames(frames_location)
    n_frames = frames.sizes["time"]
    chunk = int(frames["frames"].encoding["chunks"][0])
    region_frames = chunk * max(1, round(segment_frames / chunk))
    regions = split_regions(n_frames, region_frames)
    topology = backend.topology()
    plan = {
        "regions": len(regions) + bool(backend.identity),
        "region_frames": region_frames,
        "inputs": {"frames": store_fingerprint(frames_location, "decode")},
        "model": backend.name,
        "model_version": backend.version,
        "model_options": options,
        "device": device,
        "max_faces": max_faces,
    }
    if backend.identity:
        plan["identity_frames"] = backend.identity_frames  # the last region is the identity pass
    store_vertices = save_vertices or not backend.derives_vertices
    if not store_vertices:
        plan["vertices"] = "derived from codes"
    attrs = {
        "model": backend.name,
        "model_version": backend.version,
        "device": device,
        "max_faces": max_faces,
        "topology": topology.name,
        "gmfx_version": __version__,
        "frames_store": frames_location.url,
        **_provenance(backend, options),
    }
    store = RegionStore(store_location(out, recording, "recon"), STAGE.name)
    template = recon_template(backend, frames, max_faces=max_faces, region_frames=region_frames, store_vertices=store_vertices)
    done = store.prepare(template, plan=plan, overwrite=overwrite)
    token = plan_token(store.location, plan)
    resources = {"GPU": 1} if device.startswith("cuda") else None
    identity_region = len(regions) if backend.identity else None
    tasks = [
        Task(
            key=f"{_IDENTITY_KEY}{token}",
            function=estimate_identity_region,
            args=(backend, device, options, frames_location, store.location, identity_region, max_faces),
            resources=resources,
            weight=backend.identity_frames,
        )
    ] if identity_region is not None and identity_region not in done else []
    tasks += [
        Task(
            key=f"recon-{token}-{region.index:06d}",
            function=reconstruct_region,
            args=(backend, device, options, frames_location, store.location, region, max_faces, batch, store_vertices,
                  identity_region),
            resources=resources,
            weight=len(region),
        )
        for region in regions
        if region.index not in done
    ]
    return StorePlan(store=store, tasks=tasks, regions=len(regions), attrs=attrs, label=recording.name)


def run_recon(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client,
    model: str | type[Backend] = "mediapipe",
    device: str = "auto",
    batch_size: int | None = None,
    max_faces: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    segment_frames: int = SEGMENT_FRAMES,
    model_options: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    save_vertices: bool = False,
) -> list[Location]:
    """Reconstruct every recording's faces on the cluster; return the recon stores' locations.

    Recordings without a complete frames store are decoded first. GPU models (or ``device="cuda"``)
    run only on workers offering the ``GPU`` resource, and fail at once when there is none. ``out``
    is a path, URL (with ``storage_options``) or :class:`Location`.
    """
    out = as_location(out, storage_options, where="out")
    backend = get_backend(model)
    device = resolve_device(backend, device, client)
    if device.startswith("cuda"):
        require_resource(client, "GPU", fix=GPU_FIX)
    undecoded = [r for r in recordings if not RegionStore(store_location(out, r, "decode"), "decode").is_complete()]
    if undecoded:
        from gmfx.stages.decode import run_decode

        run_decode(undecoded, out, client=client, progress=progress)
    plans = [
        plan_recon(
            recording,
            out,
            model=backend,
            device=device,
            batch_size=batch_size,
            max_faces=max_faces,
            overwrite=overwrite,
            segment_frames=segment_frames,
            model_options=model_options,
            client=client,
            save_vertices=save_vertices,
        )
        for recording in recordings
    ]
    tasks = [task for plan in plans for task in plan.tasks]
    first = [task for task in tasks if task.key.startswith(_IDENTITY_KEY)]
    faceless = set()  # stores whose identity pass saw no face (warned once, here)
    if first:  # pass 1: the identities every segment of a recording needs
        found = run_tasks(client, first, description="recon identity", progress=progress)
        for task, n_found in zip(first, found):
            if not n_found:
                faceless.add(task.args[4].url)
                _warn_no_identity(task.args[4], backend.identity_frames)
    run_tasks(client, [task for task in tasks if not task.key.startswith(_IDENTITY_KEY)], description="recon", progress=progress)
    for plan in plans:
        if max_faces > 1 and not backend.identity and not plan.store.is_complete():
            stitch_store(plan.store, max_faces)
        plan.store.finalize(plan.attrs)
        if plan.store.location.url not in faceless:
            _warn_if_few_faces(plan.store)
    return [plan.store.location for plan in plans]


def recon_template(
    backend: type[Backend], frames: xr.Dataset, *, max_faces: int, region_frames: int, store_vertices: bool = True
) -> xr.Dataset:
    """The recon store's layout: lazy NaN arrays along time, the topology and coordinates in full
    (without ``v`` when not ``store_vertices``)."""
    n = frames.sizes["time"]
    topology = backend.topology()
    n_vertices = topology.n_vertices

    def lazy(shape: tuple[int, ...], dtype: str, fill) -> da.Array:
        return da.full((n, *shape), fill, dtype=dtype, chunks=(region_frames, *shape))

    data = {
        "v": (("time", "face", "vertex", "coord"), lazy((max_faces, n_vertices, 3), "float32", np.nan),
              {"space": "world", "units": backend.units}),
        "mat": (("time", "face", "row", "col"), lazy((max_faces, 4, 4), "float32", np.nan),
                {"description": "local (template) -> world affine"}),
        "detected": (("time", "face"), lazy((max_faces,), "bool", False)),
        "score": (("time", "face"), lazy((max_faces,), "float32", np.nan)),
        "tris": (("triangle", "corner"), np.asarray(topology.triangles, dtype=np.int32)),
        "template": (("vertex", "coord"), np.asarray(topology.template, dtype=np.float32), {"units": topology.units}),
        "rigid": (("vertex",), np.asarray(topology.rigid, dtype=bool)),
    }
    for name, size in backend.outputs.codes.items():
        data[f"code_{name}"] = (("time", "face", f"{name}_param"), lazy((max_faces, size), "float32", np.nan))
    if backend.outputs.n_landmarks:
        data["landmarks"] = (
            ("time", "face", "landmark", "coord"),
            lazy((max_faces, backend.outputs.n_landmarks, 3), "float32", np.nan),
            {"space": "world", "units": backend.units},
        )
    if not store_vertices:
        del data["v"]
    if topology.rigid_weight is not None:
        data["rigid_weight"] = (("vertex",), np.asarray(topology.rigid_weight, dtype=np.float32))
    data.update(_identity_template(backend, max_faces))
    coords = {
        "time": ("time", frames["time"].values, frames["time"].attrs),
        "frame": ("time", frames["frame"].values),
        "face": ("face", np.arange(max_faces)),
        "coord": ("coord", ["x", "y", "z"]),
    }
    return xr.Dataset(data, coords=coords)


def _identity_template(backend: type[Backend], max_faces: int) -> dict[str, tuple]:
    """The identity pass's variables: ``identity_<code>`` (face, <code>_param), ``identity_frame``
    (face, identity_sample) and, when the backend gives one, ``identity_signature``."""
    if not backend.identity:
        return {}

    def lazy(shape: tuple[int, ...], dtype: str, fill) -> da.Array:
        return da.full(shape, fill, dtype=dtype, chunks=shape)

    data = {
        f"identity_{name}": (("face", f"{name}_param"), lazy((max_faces, size), "float32", np.nan),
                             {"description": f"{name} code fixed per face over the recording"})
        for name, size in backend.identity.items()
    }
    data["identity_frame"] = (("face", "identity_sample"), lazy((max_faces, backend.identity_frames), "int64", -1),
                              {"description": "frame numbers the identity was estimated from (-1: none)"})
    if backend.identity_signature:
        data["identity_signature"] = (("face", "signature_param"), lazy((max_faces, backend.identity_signature), "float32", np.nan),
                                      {"description": "tells this face from the others (e.g. a face-recognition embedding)"})
    return data


def identity_sample(n_frames: int, n_samples: int) -> np.ndarray:
    """The frames the identity pass reads: ``n_samples`` evenly spaced over ``n_frames`` (rounded to
    the nearest frame, first and last included; all frames when there are fewer)."""
    if n_frames <= n_samples:
        return np.arange(n_frames, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n_frames - 1, n_samples)).astype(np.int64))


def estimate_identity_region(
    backend: type[Backend],
    device: str,
    options: Mapping[str, Any],
    frames_location: Location,
    store_location_: Location,
    region_index: int,
    max_faces: int,
) -> int:
    """Task body of pass 1: estimate the identities of one recording and write them as region
    ``region_index``; return how many were found."""
    model = _worker_model(backend, device, options)
    frames = _frames_array(frames_location)
    picks = identity_sample(frames.shape[0], backend.identity_frames)
    try:
        images = retry_transient(
            lambda: frames.get_orthogonal_selection((picks,)),
            what="reading the frames the identity pass samples from the decode store",
            where=frames_location.url,
            redactor=lambda text: redact(text, frames_location.storage_options),
        )
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001
        raise StorageError(
            f"the frames the identity pass samples cannot be read ({type(error).__name__}: {error})",
            where=frames_location.url,
            fix="the store is damaged: rewrite it with gmfx decode --overwrite, or copy it again",
        ) from error
    found = model.estimate_identity(images, max_faces=max_faces)
    arrays = _pack_identities(found, backend, picks, max_faces, where=frames_location.url)
    RegionStore(store_location_, STAGE.name).write_block(arrays, offsets={}, region=region_index)
    return len(found)


def _pack_identities(
    found: Sequence[Identity], backend: type[Backend], picks: np.ndarray, max_faces: int, *, where: str
) -> dict[str, np.ndarray]:
    """The identity variables of the store for ``found`` (checked against the backend's declaration)."""

    def broken(what: str) -> ModelError:
        return ModelError(
            f"the model {backend.name!r} broke its identity contract: {what}",
            where=f"identity pass over frames {picks.tolist()} of {where}",
            fix="fix the backend's estimate_identity (see gmfx.models.Backend)",
        )

    if not isinstance(found, Sequence) or len(found) > max_faces:
        raise broken(f"{len(found) if isinstance(found, Sequence) else type(found).__name__} identities with max_faces={max_faces}")
    arrays = {name: np.array(values[1].compute()) for name, values in _identity_template(backend, max_faces).items()}
    for k, identity in enumerate(found):
        if not isinstance(identity, Identity) or set(identity.codes) != set(backend.identity):
            codes = sorted(identity.codes) if isinstance(identity, Identity) else type(identity).__name__
            raise broken(f"identity {k} has codes {codes}, declared {sorted(backend.identity)}")
        for name, size in backend.identity.items():
            value = np.asarray(identity.codes[name], dtype=np.float32)
            if value.shape != (size,) or not np.isfinite(value).all():
                raise broken(f"identity {k}: code {name!r} of shape {value.shape} (declared ({size},)), all finite")
            arrays[f"identity_{name}"][k] = value
        used = np.asarray(identity.frames)
        if used.ndim != 1 or used.dtype.kind not in "iu" or not len(used) or (used < 0).any() or (used >= len(picks)).any():
            raise broken(f"identity {k}: frames {used.tolist()} must be indices 0..{len(picks) - 1} of the frames given")
        arrays["identity_frame"][k, : len(used)] = np.sort(picks[used])
        if backend.identity_signature:
            signature = None if identity.signature is None else np.asarray(identity.signature, dtype=np.float32)
            if signature is None or signature.shape != (backend.identity_signature,):
                raise broken(f"identity {k}: signature {None if signature is None else signature.shape}, declared ({backend.identity_signature},)")
            arrays["identity_signature"][k] = signature
    return arrays


def read_identities(location: Location, backend: type[Backend]) -> list[Identity]:
    """The identities the identity pass wrote into the recon store at ``location`` (their ``frames``
    are the recording's frame numbers); ``[]`` when it saw no face."""
    group = zarr.open_group(**location.zarr_kwargs(), mode="r", zarr_format=3)
    codes = {name: group[f"identity_{name}"][:] for name in backend.identity}
    used = group["identity_frame"][:]
    signatures = group["identity_signature"][:] if backend.identity_signature else None
    first = codes[next(iter(backend.identity))]
    return [
        Identity(
            codes={name: values[k] for name, values in codes.items()},
            frames=used[k][used[k] >= 0],
            signature=None if signatures is None else signatures[k],
        )
        for k in range(len(first))
        if np.isfinite(first[k]).all()
    ]


def _worker_model(backend: type[Backend], device: str, options: Mapping[str, Any]) -> Backend:
    limit_threads()  # the cores of one Dask thread, whatever started the worker (gmfx._threads)
    model = load_backend(backend, device, dict(options))
    limit_threads()  # and for the libraries the model's first load imported
    model.reset()
    return model


def reconstruct_region(
    backend: type[Backend],
    device: str,
    options: Mapping[str, Any],
    frames_location: Location,
    store_location_: Location,
    region: Region,
    max_faces: int,
    batch_size: int,
    store_vertices: bool = True,
    identity_region: int | None = None,
) -> int:
    """Task body: reconstruct ``region`` of the frames and write it; return the frames with a face.

    With ``identity_region`` (models with an identity), the identities are read from the store, where
    that region must be done; a recording without any is written as NaN rows without running the model.
    """
    store = RegionStore(store_location_, STAGE.name)
    identities: list[Identity] | None = None
    if identity_region is not None:
        if identity_region not in store.done_regions():
            raise ModelError(
                f"segment {region.index} of recon needs the identity pass, which is not written",
                where=store_location_.url,
                fix="run recon with run_recon / gmfx recon (it runs the identity pass first)",
            )
        identities = read_identities(store_location_, backend)
    if identities == []:
        faces: list[list[Face]] = [[] for _ in range(len(region))]
    else:
        model = _worker_model(backend, device, options)
        extra = {} if identities is None else {"identities": identities}
        faces = []
        for start, batch in _read_ahead(_frames_array(frames_location), region, batch_size, where=frames_location):
            found = model.reconstruct(batch, max_faces=max_faces, **extra)
            if len(found) != len(batch):
                raise ModelError(
                    f"the model {backend.name!r} returned {len(found)} results for {len(batch)} frames",
                    where=f"frames {start}-{start + len(batch) - 1} of {frames_location.url}",
                    fix="fix the backend's reconstruct: one list of faces per frame",
                )
            faces.extend(found)
    arrays = pack_faces(faces, backend, max_faces=max_faces, first_frame=region.start,
                        n_identities=None if identities is None else len(identities))
    if not store_vertices:
        del arrays["v"]
    store.write_region(region.index, region.slice, arrays)
    return int(arrays["detected"].any(axis=1).sum())


def _read_ahead(frames: FrameReader, region: Region, batch_size: int, *, where: Location) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, frames)`` batches of ``region``; the next batch is read (and decompressed) in a
    background thread while the caller works on the current one. Transient failures (a throttled
    bucket) are retried; a chunk that cannot be decoded (a truncated file) raises a
    :class:`StorageError` naming the store and the chunks."""
    starts = list(range(region.start, region.stop, batch_size))

    def read(start: int) -> np.ndarray:
        stop = min(start + batch_size, region.stop)
        try:
            return retry_transient(
                lambda: frames[start:stop],
                what=f"reading frames {start}-{stop - 1} of the decode store",
                where=where.url,
                redactor=lambda text: redact(text, where.storage_options),
            )
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001
            raise StorageError(
                f"frames {start}-{stop - 1} of the decode store cannot be read ({type(error).__name__}: {error})",
                where=f"{where.url} (chunks {frames.chunk_names(start, stop)})",
                fix="the store is damaged: rewrite it with gmfx decode --overwrite, or copy it again",
            ) from error

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, starts[0]) if starts else None
        for i, start in enumerate(starts):
            batch = pending.result()
            if i + 1 < len(starts):
                pending = reader.submit(read, starts[i + 1])
            yield start, batch


def stitch_store(store: RegionStore, max_faces: int) -> None:
    """Give the independently tracked segments of a finished store one shared face index.

    The permutation of each segment is derived from the store's own contents, so running this again
    leaves a stitched store as it is.
    """
    ds = store.open(require_complete=False)
    plan = json.loads(ds.attrs["gmfx_plan"])
    regions = split_regions(ds.sizes["time"], plan["region_frames"])
    points, axis = (ds["v"], "vertex") if "v" in ds else (ds["landmarks"], "landmark")  # codes-only stores keep landmarks
    xy = points.isel(coord=[0, 1])
    centroid = xy.mean(axis).values
    size = (xy.max(axis) - xy.min(axis)).max("coord").values
    first, last, sizes = segment_ends(ds["detected"].values, centroid, size, regions)
    face_variables = [name for name, var in ds.data_vars.items() if "face" in var.dims and "time" in var.dims]
    for region, perm in zip(regions, stitch_segments(first, last, sizes)):
        if (perm == np.arange(max_faces)).all():
            continue
        order = np.argsort(perm)  # new slot g takes old slot order[g]
        values = {name: ds[name].isel(time=region.slice).values[:, order] for name in face_variables}
        store.write_region(region.index, region.slice, values)


def _provenance(backend: type[Backend], options: Mapping[str, Any]) -> dict[str, Any]:
    """The backend's provenance for ``options``; a bad option is reported before any work starts."""
    try:
        return backend.attrs(**options)
    except (TypeError, ValueError) as error:
        raise ModelError(
            f"the model {backend.name!r} does not accept the options {dict(options)} ({error})",
            where="model options",
            fix=f"see the options of {backend.__module__}.{backend.__qualname__}.load",
        ) from error


def _warn_no_identity(location: Location, n_samples: int) -> None:
    warnings.warn(
        LowDetectionWarning(
            f"the identity pass saw no face in the {n_samples} frames it sampled: every frame is written as "
            "NaN (detected=False)",
            where=location.url,
            fix="check that the video shows a face, or lower the model's detection threshold",
        ),
        stacklevel=3,
    )


def _warn_if_few_faces(store: RegionStore) -> None:
    detected = store.open()["detected"].any("face").values
    fraction = float(detected.mean()) if detected.size else 0.0
    if fraction < LOW_DETECTION_FRACTION:
        warnings.warn(
            LowDetectionWarning(
                f"a face was found in {fraction:.1%} of the {detected.size} frames (their vertices are NaN, "
                "detected=False)",
                where=store.location.url,
                fix="check that the video shows a face, or lower the model's detection threshold "
                "(e.g. min_detection_confidence)",
            ),
            stacklevel=3,
        )


def _open_frames(location: Location) -> xr.Dataset:
    """The complete frames store at ``location``, checked for the variables and version recon needs."""
    frames = open_frames(location)  # RGB frames whatever the store's layout
    problems = [
        f"{name} (missing)" if name not in frames.variables else f"{name} (dims {frames[name].dims}, expected {dims})"
        for name, dims in _FRAMES_VARIABLES.items()
        if name not in frames.variables or frames[name].dims != dims
    ]
    if not problems and frames["frames"].dtype != np.uint8:
        problems.append(f"frames (dtype {frames['frames'].dtype}, expected uint8)")
    if problems:
        raise StorageError(
            f"the frames store lacks what recon needs: {', '.join(problems)}",
            where=location.url,
            fix="rewrite it with this gmfx: gmfx decode --overwrite",
        )
    version = frames.attrs.get("gmfx_version")
    if version is not None and not _compatible(str(version), __version__):
        raise StorageError(
            f"the frames store was written by gmfx {version}, incompatible with this gmfx {__version__}",
            where=location.url,
            fix="rewrite it with this gmfx: gmfx decode --overwrite",
        )
    require_chunks(location, "decode")  # a missing chunk would read as black frames
    return frames


def _compatible(written: str, running: str) -> bool:
    """Stores are compatible within a major version (within a minor version before 1.0)."""
    a, b = written.split(".")[:2], running.split(".")[:2]
    return a[0] == b[0] and (a[0] != "0" or a[1:2] == b[1:2])


def _frames_array(location: Location) -> FrameReader:
    try:
        return FrameReader(location)  # RGB frames, converted here from the stored planes
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001
        raise StorageError(
            f"the frames store cannot be read on the worker ({type(error).__name__})",
            where=location.url,
            fix="check that the workers reach the storage (same URL, credentials, mounts)",
        ) from error
