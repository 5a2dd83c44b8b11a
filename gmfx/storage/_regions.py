"""Template-then-region writes with a completion record per region.

A stage first writes a *template*: every array's metadata and the coordinates that are known up front
(``Dataset.to_zarr(compute=False)``). Workers then fill *regions* along ``time``, each owning whole
chunks, and each region that finished leaves a marker ``_gmfx/regions/<index>`` inside the store. A
rerun with the same plan redoes only the regions without a marker; a region written twice gives the
same bytes. ``finalize`` checks every marker, sets ``gmfx_complete`` and consolidates the metadata once:
a store is never marked complete before every region is in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
import xarray as xr
import zarr

from gmfx._errors import IncompleteStoreError, StorageError
from gmfx.storage._frames_schema import rgb_view
from gmfx.storage._location import Location, LocationLike, as_location, redact
from gmfx.storage._retry import is_transient, retry_transient
from gmfx.storage._template import portable_strings

__all__ = ["RegionStore", "open_dataset", "open_store", "plan_token"]

_MARKERS = "_gmfx/regions"
#: how long ``prepare`` waits for another run preparing the same store (writing a template takes seconds)
LOCK_WAIT_S = 60.0
#: a lock older than this is left over from a run that died while preparing (preparing never takes this long)
LOCK_STALE_S = 600.0
log = logging.getLogger(__name__)


def _plan_json(plan: Mapping[str, Any]) -> str:
    return json.dumps(plan, sort_keys=True, default=str)


def plan_token(location: Location, plan: Mapping[str, Any]) -> str:
    """A short digest of a store's URL and plan: the deterministic part of its tasks' Dask keys.

    The same store written with the same plan gives the same keys (a resubmitted task is the same
    task); another store or plan gives others (the same video decoded into two stores shares nothing).
    """
    return hashlib.sha1(f"{location.url}|{_plan_json(plan)}".encode()).hexdigest()[:16]


class RegionStore:
    """A Zarr v3 store that one stage writes region by region.

    Parameters
    ----------
    location
        Where the store lives (local path or fsspec URL with storage options).
    stage
        The name of the stage that writes it (used in messages).
    """

    def __init__(self, location: Location, stage: str) -> None:
        self.location = location
        self.stage = stage

    def __repr__(self) -> str:
        return f"RegionStore({self.location.url!r}, stage={self.stage!r})"

    # -- state -------------------------------------------------------------------------------------
    def attrs(self) -> dict[str, Any] | None:
        """The store's root attributes, or ``None`` when no store exists there."""
        fs, path = self.location.filesystem()
        try:
            raw = fs.cat_file(posixpath.join(path, "zarr.json"))
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001
            raise self._error("cannot be read", error) from error
        try:
            return json.loads(raw).get("attributes", {})
        except (ValueError, AttributeError) as error:  # a truncated or foreign zarr.json
            raise StorageError(
                f"the {self.stage} store is damaged: its zarr.json is not valid metadata ({type(error).__name__}: {error})",
                where=posixpath.join(self.location.url, "zarr.json"),
                fix=f"rerun gmfx {self.stage} with --overwrite to replace the store, or restore it from a copy",
            ) from error

    def is_complete(self) -> bool:
        attrs = self.attrs()
        return bool(attrs and attrs.get("gmfx_complete"))

    def done_regions(self) -> set[int]:
        """Indices of the regions that have a completion marker."""
        fs, path = self.location.filesystem()

        def listing() -> list[str]:
            try:
                return fs.ls(posixpath.join(path, _MARKERS), detail=False)
            except FileNotFoundError:
                return []

        try:
            names = retry_transient(
                listing,
                what=f"listing the finished regions of the {self.stage} store",
                where=self.location.url,
                redactor=lambda text: redact(text, self.location.storage_options),
            )
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - e.g. access denied: one clear message
            raise self._error("cannot be listed", error) from error
        return {int(posixpath.basename(n.rstrip("/"))) for n in names if posixpath.basename(n).isdigit()}

    # -- writing -----------------------------------------------------------------------------------
    def prepare(
        self, template: xr.Dataset, *, plan: Mapping[str, Any], overwrite: bool = False, encoding=None
    ) -> set[int]:
        """Write the template unless a store with the same plan exists; return the regions already done.

        ``plan`` describes everything that determines the store's bytes (inputs, parameters, region
        boundaries). A store written with another plan is an error unless ``overwrite`` is true; one whose
        ``plan["inputs"]`` (fingerprints of what the stage reads) differ is stale and is rewritten with a
        warning, so a changed input is never reused. With ``overwrite`` the existing store
        is not read at all (a damaged one is replaced too).
        """
        plan_json = _plan_json(plan)
        attrs = None if overwrite else self.attrs()
        if attrs is not None:
            if attrs.get("gmfx_plan") == plan_json:
                return set(range(attrs["gmfx_regions"])) if attrs.get("gmfx_complete") else self.done_regions()
            if _inputs_changed(attrs.get("gmfx_plan"), plan):
                log.warning("the inputs of the %s store %s changed since it was written: recomputing it", self.stage, self.location.url)
                attrs = None
        if attrs is not None:
            raise StorageError(
                f"a {self.stage} store written with other inputs or parameters already exists",
                where=self.location.url,
                fix="rerun with --overwrite to replace it, or choose another --out",
            )
        with self._lock():
            # another run may have written the template while we waited: resume into it, never delete it
            attrs = None if overwrite else self.attrs()
            if attrs is not None and attrs.get("gmfx_plan") == plan_json:
                return set(range(attrs["gmfx_regions"])) if attrs.get("gmfx_complete") else self.done_regions()
            return self._write_template(template, plan, plan_json, encoding)

    def _write_template(self, template: xr.Dataset, plan: Mapping[str, Any], plan_json: str, encoding) -> set[int]:
        self.delete()
        template = portable_strings(template.copy())
        template.attrs.update(
            gmfx_stage=self.stage, gmfx_plan=plan_json, gmfx_regions=int(plan["regions"]), gmfx_complete=False,
            gmfx_instance=uuid.uuid4().hex,  # this template's identity: kept while regions are resumed into it
        )

        # the template is built in memory and stored as one batch of objects: zarr writing it in place
        # first deletes each array's prefix and checks each object's absence (measured on moto: 5 of the
        # 8 requests per array, ~250 for a recon store), which a store just deleted never needs
        objects: dict[str, Any] = {}
        try:
            template.to_zarr(
                zarr.storage.MemoryStore(objects), mode="w", compute=False, zarr_format=3, consolidated=False,
                encoding=encoding,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a template zarr refuses is a clear StorageError
            raise self._error("cannot be written", error) from error
        fs, root = self.location.filesystem()
        values = {posixpath.join(root, key): value.to_bytes() for key, value in objects.items()}

        def write_template() -> None:  # idempotent: the whole batch is retried
            if self.location.is_local:
                for folder in {posixpath.dirname(path) for path in values}:
                    fs.makedirs(folder, exist_ok=True)
            fs.pipe(values)

        try:
            self._retried(write_template, "writing the template")
        except StorageError:
            raise
        except Exception as error:  # noqa: BLE001 - any backend failure becomes a clear StorageError
            raise self._error("cannot be written", error) from error
        return set()

    def _retried(self, operation: Callable[[], Any], what: str) -> None:
        retry_transient(
            operation,
            what=f"{what} of the {self.stage} store",
            where=self.location.url,
            redactor=lambda text: redact(text, self.location.storage_options),
        )
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold ``<store>.lock`` beside the store (an atomic create) while its template is replaced.

        Two runs on one dataset would otherwise both delete and rewrite the store, each losing the
        other's regions. A second run waits up to :data:`LOCK_WAIT_S` and then resumes into the
        template the first wrote. A lock older than :data:`LOCK_STALE_S`, or left by a process of this
        host that is gone, is stale and removed with a warning."""
        fs, path = self.location.filesystem()
        lock = path.rstrip("/") + ".lock"
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                with fs.open(lock, "xb") as file:
                    file.write(json.dumps(owner).encode())
                break
            except FileExistsError:
                pass
            except FileNotFoundError as error:
                if not isinstance(fs, LocalFileSystem):
                    raise self._error("cannot be written", error) from error  # e.g. no such bucket: never create one
                fs.makedirs(posixpath.dirname(lock), exist_ok=True)  # a local folder that does not exist yet
                continue
            except Exception as error:  # noqa: BLE001 - e.g. no such bucket, access denied: one clear message
                raise self._error("cannot be written", error) from error
            holder = _read_lock(fs, lock)
            if _stale(holder, owner):
                log.warning("removing the stale lock %s of the %s store (%s)", lock, self.stage, holder)
                _remove(fs, lock)
                continue
            if time.monotonic() > deadline:
                raise StorageError(
                    f"another gmfx run (host {holder.get('host')}, pid {holder.get('pid')}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))}) is preparing the {self.stage} store",
                    where=self.location.url,
                    fix=f"wait for that run to finish; if it is no longer running, delete {self.location.url.rstrip('/')}.lock "
                    f"(a lock older than {LOCK_STALE_S / 60:.0f} minutes is removed by itself)",
                )
            time.sleep(0.1)
        try:
            yield
        finally:
            _remove(fs, lock)

    def write_region(self, index: int, time: slice, arrays: Mapping[str, np.ndarray]) -> None:
        """Write ``arrays`` (each starting with the time axis) at ``time`` and mark region ``index`` done.

        Regions must start and end on chunk boundaries of every array they write (the caller's plan
        guarantees it), so concurrent writers never share a chunk.
        """
        self._write(
            arrays,
            lambda name, array, values: (time,) + (slice(None),) * (array.ndim - 1),
            what=f"writing region {index} (time {time.start}:{time.stop}) of the {self.stage} store",
            region=index,
        )

    def write_block(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        offsets: Mapping[str, int],
        region: int | None = None,
        write_empty_chunks: bool = True,
    ) -> None:
        """Write ``arrays`` into the store's arrays of the same names, starting at ``offsets`` along the
        dimensions named there (e.g. ``{"vertex": 128}``) and over the whole extent of the others.

        Transient failures are retried (the write is idempotent); when ``region`` is given, its marker
        is written after every byte of the block is in. Blocks must start and end on chunk boundaries,
        so concurrent writers never share a chunk. ``write_empty_chunks=False`` leaves out the chunks that
        hold only the fill value (they read as it): for sparse results that no stage reads with
        :func:`~gmfx.storage._fingerprint.require_chunks`, where a missing chunk means a damaged store.
        """

        def selection(name: str, array: zarr.Array, values: np.ndarray) -> tuple[slice, ...]:
            dims = tuple(array.metadata.dimension_names or ())
            unknown = sorted(set(offsets) - set(dims))
            if unknown or np.ndim(values) != array.ndim:
                raise StorageError(
                    f"cannot write {name} of shape {np.shape(values)} at {dict(offsets)}: the store's {name} "
                    f"has dimensions {dims}",
                    where=self.location.child(name).url,
                    fix="this is a bug in gmfx: please report it",
                )
            return tuple(
                slice(offsets[dim], offsets[dim] + np.shape(values)[axis]) if dim in offsets else slice(None)
                for axis, dim in enumerate(dims)
            )

        at = ", ".join(f"{dim} {start}" for dim, start in offsets.items())
        self._write(
            arrays,
            selection,
            what=f"writing {', '.join(arrays)} from {at}{'' if region is None else f' (region {region})'} "
            f"of the {self.stage} store",
            region=region,
            write_empty_chunks=write_empty_chunks,
        )

    def _write(
        self, arrays: Mapping[str, np.ndarray], selection, *, what: str, region: int | None, write_empty_chunks: bool = True
    ) -> None:
        """The one writer: open, write every array at ``selection(name, array, values)``, then the marker;
        retried whole on transient failures, with credentials redacted from every message."""

        def write() -> None:
            group = self._group("r+")
            for name, values in arrays.items():
                # by default every chunk is written as it is: zarr's scan for all-fill-value chunks costs
                # more than compressing them (measured ~2 ms per 640x360 frame), and a missing chunk then
                # always means a damaged store
                array = group[name].with_config({"write_empty_chunks": write_empty_chunks})
                where = selection(name, array, values)
                try:
                    array[where] = np.asarray(values, dtype=array.dtype)
                except Exception as error:
                    # an object store's error names no key (S3's "503 SlowDown"): say which chunks were written
                    error.add_note(f"while writing {self._chunks(name, array, where)}")
                    raise
            if region is not None:
                self._mark(region)

        # a region write is idempotent (same bytes each time), so transient failures are retried whole
        retry_transient(
            write, what=what, where=self.location.url, redactor=lambda text: redact(text, self.location.storage_options)
        )

    def _chunks(self, name: str, array: zarr.Array, where: tuple[slice, ...]) -> str:
        """The URL(s) of the chunks (shards, when sharded) of ``array`` that ``where`` covers."""
        grid = array.metadata.chunk_grid.chunk_shape
        bounds = [s.indices(n) for s, n in zip(where, array.shape, strict=True)]
        first = tuple(start // size for (start, _, _), size in zip(bounds, grid, strict=True))
        last = tuple(max(start, stop - 1) // size for (start, stop, _), size in zip(bounds, grid, strict=True))
        url = self.location.child(name).url
        count = int(np.prod([b - a + 1 for a, b in zip(first, last, strict=True)]))
        if count == 1:
            return f"chunk {url}/{array.metadata.encode_chunk_key(first)}"
        return f"{count} chunks {url}/{array.metadata.encode_chunk_key(first)} to {array.metadata.encode_chunk_key(last)}"

    def mark_done(self, index: int) -> None:
        """Record that region ``index`` is written, for a region written in several :meth:`write_block`
        calls (decode writes a segment chunk by chunk). Call it only after every byte of the region is in."""
        retry_transient(
            lambda: self._mark(index),
            what=f"marking region {index} of the {self.stage} store done",
            where=self.location.url,
            redactor=lambda text: redact(text, self.location.storage_options),
        )

    def _mark(self, index: int) -> None:
        fs, path = self.location.filesystem()
        markers = posixpath.join(path, _MARKERS)
        fs.makedirs(markers, exist_ok=True)  # a no-op on object stores
        fs.pipe_file(posixpath.join(markers, f"{index:06d}"), b"done")

    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete and consolidate its metadata, after checking every region is in.

        A store that is complete already is left as it is (not rewritten: it may be read-only)."""
        attrs = self.attrs() or {}
        if attrs.get("gmfx_complete"):
            return
        missing = sorted(set(range(attrs.get("gmfx_regions", 0))) - self.done_regions())
        if missing:
            raise IncompleteStoreError(
                f"{len(missing)} of {attrs['gmfx_regions']} regions of the {self.stage} store are not written "
                f"(first missing: {missing[0]})",
                where=self.location.url,
                fix=f"rerun gmfx {self.stage}: it resumes and writes only the missing regions",
            )
        self._retried(lambda: self._complete(attrs, extra_attrs), "marking complete")

    def _complete(self, attrs: Mapping[str, Any], extra_attrs: Mapping[str, Any] | None) -> None:
        group = self._group("r+")
        # the token of the template the regions went into: readers' plans record it, so a store written anew
        # (--overwrite, even with the same plan) makes the stages that read it recompute, while regions
        # resumed into the same template (deterministic, the same bytes) leave its readers valid
        token = attrs.get("gmfx_instance") or uuid.uuid4().hex
        group.attrs.update({**(extra_attrs or {}), "gmfx_complete": True, "gmfx_completion": token})
        with warnings.catch_warnings():  # our _gmfx/ markers and v3 consolidation are expected
            warnings.filterwarnings("ignore", message=".*(not recognized as a component|Consolidated metadata).*")
            zarr.consolidate_metadata(group.store)

    def delete(self) -> None:
        fs, path = self.location.filesystem()
        if fs.exists(path):
            fs.rm(path, recursive=True)

    # -- reading -----------------------------------------------------------------------------------
    def open(self, *, require_complete: bool = True) -> xr.Dataset:
        """Open the store lazily with xarray."""
        return open_dataset(self.location, stage=self.stage, require_complete=require_complete)

    def _group(self, mode: str) -> zarr.Group:
        try:
            return zarr.open_group(**self.location.zarr_kwargs(), mode=mode, zarr_format=3)
        except Exception as error:  # noqa: BLE001
            if is_transient(error):
                raise  # retried by the caller
            raise self._error("cannot be opened", error) from error

    def _error(self, what: str, error: BaseException) -> StorageError:
        detail = redact(f"{type(error).__name__}: {error}", self.location.storage_options)
        return StorageError(
            f"the {self.stage} store {what} ({detail})",
            where=self.location.url,
            fix="check the URL, that the bucket or folder exists and is writable, and the credentials",
        )


def _read_lock(fs, lock: str) -> dict[str, Any]:
    try:
        holder = json.loads(fs.cat_file(lock))
    except FileNotFoundError:
        return {"time": time.time()}  # released meanwhile: the next attempt takes it
    except ValueError:  # written but not yet filled: it is being taken now
        return {"time": time.time()}
    return holder if isinstance(holder, dict) else {"time": 0.0}


def _stale(holder: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    if me["time"] - float(holder.get("time", 0.0)) > LOCK_STALE_S:
        return True
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)  # no signal sent: only asks whether that process exists
        except ProcessLookupError:
            return True
        except OSError:
            return False
    return False


def _remove(fs, lock: str) -> None:
    try:
        fs.rm_file(lock)
    except FileNotFoundError:
        pass


def _inputs_changed(stored_json: Any, plan: Mapping[str, Any]) -> bool:
    """True when the stored plan and ``plan`` both fingerprint their ``inputs`` and these differ.

    Such a store is stale whatever its parameters (they may follow from the inputs, e.g. the rigid
    vertices an alignment found), so nothing valid is lost by rewriting it."""
    try:
        stored = json.loads(stored_json)
    except (TypeError, ValueError):
        return False
    if not isinstance(stored, dict) or "inputs" not in stored or "inputs" not in plan:
        return False
    return stored["inputs"] != json.loads(_plan_json(plan))["inputs"]


def open_dataset(location: Location, *, stage: str, require_complete: bool = True) -> xr.Dataset:
    """Open a gmfx store lazily; refuse one whose stage has not finished unless told otherwise."""
    store = RegionStore(location, stage)
    attrs = store.attrs()
    if attrs is None:
        raise StorageError(
            f"no {stage} store exists here",
            where=location.url,
            fix=f"run gmfx {stage} first, or check the URL and --out",
        )
    if require_complete and not attrs.get("gmfx_complete"):
        raise IncompleteStoreError(
            f"the {stage} store is incomplete (its stage was interrupted or failed)",
            where=location.url,
            fix=f"rerun gmfx {stage}: it resumes and writes only the missing regions",
        )
    ds = xr.open_zarr(**location.zarr_kwargs(), consolidated=attrs.get("gmfx_complete", False))
    return rgb_view(ds, location.url) if stage == "decode" else ds  # frames read as RGB whatever their layout


def open_store(
    location: LocationLike, *, storage_options: Mapping[str, Any] | None = None, require_complete: bool = True
) -> xr.Dataset:
    """Open any gmfx store lazily (frames, recon, preproc, epochs, ...); its stage is read from its attributes.

    ``location`` is a local path, an fsspec URL (with ``storage_options``) or a :class:`gmfx.Location`.
    An incomplete store is refused unless ``require_complete=False``.
    """
    location = as_location(location, storage_options)
    attrs = RegionStore(location, "gmfx").attrs()
    if attrs is None or "gmfx_stage" not in attrs:
        raise StorageError(
            "no gmfx store exists here" if attrs is None else "this Zarr store was not written by gmfx",
            where=location.url,
            fix="check the URL (a store ends in _frames.zarr, _recon.zarr, _preproc.zarr, _epochs.zarr, ...) and --out",
        )
    return open_dataset(location, stage=attrs["gmfx_stage"], require_complete=require_complete)
