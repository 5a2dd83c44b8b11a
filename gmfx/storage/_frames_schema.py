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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from gmfx._errors import StorageError

__all__ = ["FRAMES_SCHEMA", "frames_layout", "keep_other_schema"]

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
