"""The frames store's schema: which layout a store holds, and whether a decode run may reuse it.

* schema 1 (gmfx before the ``frames_schema`` attribute): ``frames`` ``(time, y, x, rgb)`` uint8 in
  64-frame zstd chunks. Still read as it is.
* schema 2: ``frames_layout`` says ``"planes"`` (the decoder's Y, U, V planes as ``y_plane``,
  ``u_plane``, ``v_plane``, with the ``pixels`` attribute that rebuilding RGB needs) or ``"rgb"``
  (``frames`` as in schema 1, for resized frames and pixel formats that are not planar YUV); both in
  zarr v3 shards.

A decode run never resumes into a store of another schema (its regions would mix two layouts): an
incomplete one is refused with how to rewrite it, a complete one with the same inputs and frame size is
kept as it is (it stays readable), and one with other inputs is rewritten like any stale store.

Every reader (``gmfx.open_frames``, ``gmfx.open_store``, the stages) sees a frames store through
:func:`rgb_view`: ``frames`` ``(time, y, x, rgb)`` uint8 whatever the layout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Literal

import dask.array
import numpy as np
import xarray as xr

from gmfx._errors import StorageError
from gmfx._pixels import PixelFormat, PlanesToRgb

__all__ = ["FRAMES_SCHEMA", "converter", "frames_layout", "keep_other_schema", "rgb_view"]

#: the schema this gmfx writes
FRAMES_SCHEMA = 2
_LAYOUTS = ("planes", "rgb")


def _schema(attrs: Mapping[str, Any]) -> int:
    return int(attrs.get("frames_schema", 1))


def frames_layout(attrs: Mapping[str, Any], where: str) -> Literal["planes", "rgb"]:
    """The layout of a frames store from its attributes; a schema newer than this gmfx's is refused.

    Raises
    ------
    StorageError
        The store was written by a newer gmfx, or names an unknown layout.
    """
    schema = _schema(attrs)
    if schema == 1:
        return "rgb"
    if schema > FRAMES_SCHEMA:
        raise StorageError(
            f"the frames store has schema {schema} (written by gmfx {attrs.get('gmfx_version', '?')}); this gmfx "
            f"reads schemas 1 to {FRAMES_SCHEMA}",
            where=where,
            fix="upgrade gmfx, or rewrite the store with this gmfx: gmfx decode --overwrite",
        )
    layout = attrs.get("frames_layout")
    if layout not in _LAYOUTS:
        raise StorageError(
            f"the frames store names an unknown layout {layout!r} (expected one of {', '.join(_LAYOUTS)})",
            where=where,
            fix="the store is damaged: rewrite it with gmfx decode --overwrite",
        )
    return layout


def keep_other_schema(attrs: Mapping[str, Any] | None, plan: Mapping[str, Any], where: str) -> bool:
    """Whether an existing store of another schema is kept as it is (``True``), or is none of this
    function's business (``False``: no store, the same schema, or other inputs, which make it stale).

    Raises
    ------
    StorageError
        The store is of another schema and incomplete (a run never resumes across layouts), or complete
        with other frame sizes: both need ``--overwrite``.
    """
    if attrs is None or "gmfx_plan" not in attrs or _schema(attrs) == FRAMES_SCHEMA:
        return False
    try:
        stored = json.loads(attrs["gmfx_plan"])
    except (TypeError, ValueError):
        stored = {}
    if stored.get("inputs") != json.loads(json.dumps(plan["inputs"])):
        return False
    schema = _schema(attrs)
    if not attrs.get("gmfx_complete"):
        raise StorageError(
            f"an incomplete frames store of schema {schema} (gmfx {attrs.get('gmfx_version', '?')}) is here; this gmfx "
            f"writes schema {FRAMES_SCHEMA} and never resumes into another layout",
            where=where,
            fix="rerun gmfx decode with --overwrite to rewrite it, or finish it with the gmfx that started it",
        )
    if stored.get("max_size") != plan.get("max_size"):
        raise StorageError(
            f"a frames store of schema {schema} with other frame sizes (max_size {stored.get('max_size')}) is here",
            where=where,
            fix="rerun gmfx decode with --overwrite to rewrite it, or choose another --out",
        )
    return True


def rgb_view(ds: xr.Dataset, where: str) -> xr.Dataset:
    """``ds`` (a frames store opened lazily) with ``frames`` ``(time, y, x, rgb)`` uint8 in place of its
    planes, converted chunk by chunk (one Dask task a stored chunk) when read; RGB stores as they are."""
    if frames_layout(ds.attrs, where) == "rgb":
        return ds
    pixels = PixelFormat.from_attrs(ds.attrs["pixels"])
    names = [name for name in pixels.plane_names if name in ds]
    if len(names) != len(pixels.planes):
        raise StorageError(
            f"the frames store lacks planes {sorted(set(pixels.plane_names) - set(names))} its pixel format needs",
            where=where,
            fix="the store is damaged: copy it again, or rewrite it with gmfx decode --overwrite",
        )
    # the luma plane sets the output's y and x; the other planes' own axes (chroma) are whole in every block
    indices = ["tyx"] + [f"t{2 * i}{2 * i + 1}" for i in range(1, len(names))]
    rgb = dask.array.blockwise(
        _rgb_block, "tyxc", *[a for name, index in zip(names, indices) for a in (ds[name].data, tuple(index))],
        new_axes={"c": 3}, concatenate=True, dtype=np.uint8, pixels=pixels, meta=np.empty((0, 0, 0, 0), np.uint8),
    )  # fmt: skip
    frames = xr.DataArray(rgb, dims=("time", "y", "x", "rgb"), coords={"time": ds["time"], "frame": ds["frame"]})
    frames.encoding["chunks"] = (int(ds.attrs["chunk_frames"]), pixels.height, pixels.width, 3)
    return ds.drop_vars(names).assign(frames=frames)


def _rgb_block(*planes: np.ndarray, pixels: PixelFormat) -> np.ndarray:
    return converter(pixels)(*planes)


_converters = threading.local()


def converter(pixels: PixelFormat) -> PlanesToRgb:
    """One converter per pixel format and thread: a worker converts many chunks, and a converter's
    rawvideo decoder must never serve two threads at once (it would hand one thread another's frame)."""
    cache = _converters.__dict__.setdefault("by_format", {})
    if pixels not in cache:
        cache[pixels] = PlanesToRgb(pixels)
    return cache[pixels]
