"""What a stage's plan records about its inputs: content, not absolute paths; and checks of upstream chunks.

A plan names its inputs by their path relative to the dataset root (or the store's own name) together
with a digest of their content: an events file's bytes, an upstream store's plan (which in turn records
its own inputs). A moved, copied or remounted dataset therefore keeps its plans, while an edited input
changes them and the stage recomputes instead of reusing a stale store.

Before a stage reads an upstream store, :func:`require_chunks` lists the store once and checks that every
chunk of the arrays gmfx writes region by region is there: Zarr reads a missing chunk as its fill value
(zeros, NaN), so a store damaged by a partial copy or a lifecycle rule would otherwise pass silently.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath

import zarr

from gmfx._errors import IncompleteStoreError, StorageError
from gmfx.storage._location import Location

__all__ = ["file_digest", "relative_name", "require_chunks", "store_fingerprint"]

#: bytes read at a time when digesting a file
_BLOCK = 8 * 2**20


def file_digest(location: Location) -> str:
    """The SHA-256 of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    try:
        with location.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    except OSError as error:
        raise StorageError(
            f"the file cannot be read ({type(error).__name__}: {error})",
            where=location.url,
            fix="check that the file exists and is readable",
        ) from error
    return digest.hexdigest()


def relative_name(location: Location, root: Location) -> str:
    """``location``'s path below ``root`` (``sub-01/sub-01_task-x_video.mp4``), or its bare name when it
    lies elsewhere: never an absolute path, so a moved dataset keeps its plans."""
    base = root.url.rstrip("/").replace(os.sep, "/")
    url = location.url.replace(os.sep, "/")
    if url.startswith(base + "/"):
        return url[len(base) + 1 :]
    return location.name


def store_fingerprint(location: Location, stage: str) -> dict[str, str]:
    """The store's name, a digest of its plan and its completion token, for the plan of a stage that reads it.

    The store must be complete. Its plan determines its bytes; the token (new each time the store is
    completed) also tells apart a store redone with ``--overwrite`` by a non-deterministic model.
    """
    from gmfx.storage._regions import RegionStore

    attrs = RegionStore(location, stage).attrs()
    if attrs is None or not attrs.get("gmfx_complete"):
        raise IncompleteStoreError(
            f"the {stage} store is {'missing' if attrs is None else 'incomplete'}",
            where=location.url,
            fix=f"run gmfx {stage} first (a rerun resumes and writes only the missing regions)",
        )
    plan = str(attrs.get("gmfx_plan", ""))
    return {
        "store": location.name,
        "plan": hashlib.sha256(plan.encode()).hexdigest()[:32],
        "completion": str(attrs.get("gmfx_completion", "")),
    }


def _chunk_keys(array: zarr.Array) -> list[str]:
    # the stored objects: the grid of shards for a sharded array (its chunks live inside them)
    grid = tuple(-(-size // step) for size, step in zip(array.shape, array.metadata.chunk_grid.chunk_shape))
    return [array.metadata.encode_chunk_key(coords) for coords in itertools.product(*(range(n) for n in grid))]


def require_chunks(location: Location, stage: str, *, dim: str = "time") -> None:
    """Fail unless every chunk of the store's arrays along ``dim`` (those gmfx writes region by region,
    always writing every chunk) exists. One recursive listing of the store.

    Raises
    ------
    StorageError
        Naming the store, how many chunks are missing and the first of them.
    """
    fs, path = location.filesystem()
    try:
        group = zarr.open_group(**location.zarr_kwargs(), mode="r", zarr_format=3)
        arrays = [
            (name, array)
            for name, array in group.arrays()
            if (array.metadata.dimension_names or (None,))[0] == dim and array.size
        ]
        present = {posixpath.relpath(p, path.rstrip("/")) for p in fs.find(path)} if arrays else set()
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - any backend failure becomes a clear StorageError
        raise StorageError(
            f"the {stage} store cannot be listed ({type(error).__name__}: {error})",
            where=location.url,
            fix="check the URL, the network and the credentials",
        ) from error
    missing = [f"{name}/{key}" for name, array in arrays for key in _chunk_keys(array) if f"{name}/{key}" not in present]
    if missing:
        raise StorageError(
            f"{len(missing)} chunks of the {stage} store are missing (first: {missing[0]}); "
            "Zarr would read them as zeros or NaN",
            where=f"{location.url} ({json.dumps(missing[:5])[1:-1]}{', ...' if len(missing) > 5 else ''})",
            fix=f"copy the store again completely, or rewrite it with gmfx {stage} --overwrite",
        )
