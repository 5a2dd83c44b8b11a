"""Writing a zarr v3 shard from chunks compressed as they come (the decode stage's writer).

zarr-python writes a shard only whole, from the shard's raw values: a decode task would decode a whole
shard first and compress it after, one after the other. :class:`ShardBuilder` instead compresses each
inner chunk as soon as its frames are decoded (zstd releases the GIL, so this overlaps decoding) and
keeps only compressed bytes; :meth:`ShardBuilder.finish` assembles the shard as the zarr v3 sharding
codec lays it out (chunks back to back, then the index of ``(offset, nbytes)`` uint64 little-endian
pairs in C order, ``2**64 - 1`` for a chunk past the array's end, and its crc32c) and stores it in one
write. It is used only for arrays whose codecs are exactly those (:func:`shard_level`); the tests read
every shard it writes back through zarr.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd

__all__ = ["ShardBuilder", "shard_level"]

_EMPTY = np.iinfo(np.uint64).max


def _expected_codecs(chunk_shape: tuple[int, ...], level: int) -> dict[str, Any]:
    return {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": tuple(chunk_shape),
            "codecs": ({"name": "bytes"}, {"name": "zstd", "configuration": {"level": level, "checksum": False}}),
            "index_codecs": ({"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}),
            "index_location": "end",
        },
    }


def shard_level(array: zarr.Array) -> int | None:
    """The zstd level of ``array``'s chunks when :class:`ShardBuilder` can write its shards: uint8, zstd
    chunks in shards whole along every axis but the first, index at the end with crc32c; else ``None``."""
    codecs = array.metadata.codecs
    if array.dtype != np.uint8 or len(codecs) != 1 or array.shards is None:
        return None
    whole = tuple(array.shards[1:]) == tuple(array.chunks[1:]) == tuple(array.shape[1:])
    found = codecs[0].to_dict()
    try:
        level = int(found["configuration"]["codecs"][1]["configuration"]["level"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return level if whole and found == _expected_codecs(array.chunks, level) else None


class ShardBuilder:
    """One shard of ``chunks_per_shard`` inner chunks of ``chunk_shape``, built chunk by chunk.

    ``add(i, values)`` compresses inner chunk ``i`` (``values`` may be shorter along the first axis
    than the chunk at the array's end: it is padded with zeros, the fill value, as zarr does);
    ``finish(chunks)`` gives the shard's bytes. ``add`` may run in several threads at once.
    """

    def __init__(self, chunk_shape: tuple[int, ...], chunks_per_shard: int, level: int) -> None:
        self.chunk_shape = tuple(chunk_shape)
        self._codec = Zstd(level=level, checksum=False)
        self._chunks: list[bytes | None] = [None] * chunks_per_shard

    def add(self, i: int, values: np.ndarray) -> None:
        if values.shape != self.chunk_shape:
            padded = np.zeros(self.chunk_shape, np.uint8)
            padded[: len(values)] = values
            values = padded
        self._chunks[i] = self._codec.encode(np.ascontiguousarray(values, dtype=np.uint8))

    def finish(self, chunks: int) -> bytes:
        """The shard's bytes; its first ``chunks`` chunks must have been added (the rest lie past the array's end)."""
        missing = [i for i in range(chunks) if self._chunks[i] is None]
        if missing:
            raise RuntimeError(f"chunks {missing} of the shard were never compressed")
        index = np.full((len(self._chunks), 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, data in enumerate(self._chunks):
            if data is not None:
                index[i] = offset, len(data)
                offset += len(data)
        index_bytes = index.tobytes()
        checksum = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        return b"".join([*(c for c in self._chunks if c is not None), index_bytes, checksum])
