"""Writing and reading zarr v3 shards of the frames store without zarr-python's codec pipeline.

zarr-python writes a shard only whole, from the shard's raw values: a decode task would decode a whole
shard first and compress it after, one after the other. :class:`ShardBuilder` instead compresses each
inner chunk as soon as its frames are decoded (zstd releases the GIL, so this overlaps decoding) and
keeps only compressed bytes; :meth:`ShardBuilder.finish` assembles the shard as the zarr v3 sharding
codec lays it out (chunks back to back, then the index of ``(offset, nbytes)`` uint64 little-endian
pairs in C order, ``2**64 - 1`` for a chunk past the array's end, and its crc32c) and stores it in one
write. It is used only for arrays whose codecs are exactly those (:func:`shard_level`); the tests read
every shard it writes back through zarr.

:class:`ShardReader` reads ``array[start:stop]`` (first axis) of such arrays for recon's frame reads.
zarr-python spends ~0.7 ms CPU a 640x360 frame (16-frame reads, 1.28 ms in all, of which zstd is
~0.55 ms) in its event-loop thread and buffer copies, and on S3 sends one ranged GET per inner chunk per
plane. The reader fetches each shard's index once (a suffix read, checked against its crc32c, cached
for the reader's life), then ONE ranged read per shard per array spanning the needed inner chunks, and
decompresses each chunk with numcodecs' zstd straight into the output (only a chunk cut by the read's
ends goes through a scratch buffer). Measured (``benchmarks/frames_read.py``, 16-frame reads of 640x360
planes, loaded 2-core machine): 0.39 ms CPU a frame instead of zarr's 0.75 locally; on S3 (moto) 0.87
instead of 2.8, and 0.19 GETs a frame instead of 0.94. A shard never written, or a chunk the index marks
empty, reads as the fill value, as zarr does; a damaged shard (short object, bad index checksum, index
pointing past the object, undecodable or wrongly sized chunk) raises :class:`DamagedShard` naming the
object, a ``ValueError`` (not transient: a retry would read the same bytes).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd

from gmfx.storage._location import Location

__all__ = ["DamagedShard", "ShardBuilder", "ShardReader", "object_key", "shard_level"]

_EMPTY = np.iinfo(np.uint64).max


def object_key(array: zarr.Array, i: int) -> str:
    """The key, below the array, of its ``i``-th stored object along the first axis: a shard, or a chunk
    when the array is not sharded (every other axis is whole)."""
    return array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))


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


class DamagedShard(ValueError):
    """A stored shard that is not what its array's codecs promise; the message names the object."""


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame's header declares, or ``None`` when it declares none (RFC 8878,
    3.1.1.1: descriptor byte, optional window byte, dictionary id of 0/1/2/4 bytes, then the size)."""
    if len(frame) < 6 or bytes(frame[:4]) != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    position = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if width == 0 or len(frame) < position + width:
        return None
    size = int.from_bytes(frame[position : position + width], "little")
    return size + 256 if width == 2 else size


class ShardReader:
    """Reads ``array[start:stop]`` along the first axis of ``arrays`` (each with a :func:`shard_level`),
    with one ranged read per shard per array once the shard's index is known (see the module docstring).

    Indexes are cached for the reader's life: make one reader per task, over a store that is complete.
    Where the needed chunks of a shard are not back to back (a writer other than ShardBuilder or zarr's),
    the one read spans from the first needed byte to the last, the bytes between included.
    """

    def __init__(self, arrays: Sequence[zarr.Array], location: Location) -> None:
        foreign = [array.path for array in arrays if shard_level(array) is None]
        if foreign:
            raise ValueError(f"arrays {foreign} of {location.url} are not zstd shards as ShardBuilder writes them")
        self.arrays = list(arrays)
        self._url = location.url
        self._fs, self._root = location.filesystem()
        self._indexes: dict[tuple[int, int], np.ndarray | None] = {}  # (array, shard) -> None: never written
        self._codec = Zstd()

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """``array[start:stop]`` of each array, for ``0 <= start <= stop <= len(array)``."""
        outputs = [np.empty((stop - start, *array.shape[1:]), np.uint8) for array in self.arrays]
        touched = [
            (a, shard)
            for a, array in enumerate(self.arrays)
            for shard in range(start // array.shards[0], -(-stop // array.shards[0]))
        ]
        self._load_indexes([key for key in touched if key not in self._indexes])
        requests = []  # (array, shard, its stored chunks [(chunk, offset, nbytes)], first byte, end byte)
        for a, shard in touched:
            array, index = self.arrays[a], self._indexes[a, shard]
            per_shard = array.shards[0] // array.chunks[0]
            first = max(start // array.chunks[0], shard * per_shard)
            last = min(-(-stop // array.chunks[0]), (shard + 1) * per_shard)
            stored = []
            for chunk in range(first, last):
                offset, nbytes = (_EMPTY, _EMPTY) if index is None else index[chunk - shard * per_shard]
                if offset == _EMPTY:
                    self._rows(outputs[a], array, chunk, start, stop)[0][...] = array.metadata.fill_value
                else:
                    stored.append((chunk, int(offset), int(nbytes)))
            if stored:
                requests.append((a, shard, stored, min(o for _, o, _ in stored), max(o + n for _, o, n in stored)))
        paths = [self._path(a, shard) for a, shard, *_ in requests]
        found = self._fetch(paths, [r[3] for r in requests], [r[4] for r in requests])
        for (a, _, stored, span_start, span_end), path, data in zip(requests, paths, found):
            array = self.arrays[a]
            name = self._name(path)
            if data is None or len(data) != span_end - span_start:
                raise DamagedShard(
                    f"{name} ends before byte {span_end} that its index names ({len(data or b'')} of the "
                    f"{span_end - span_start} bytes from byte {span_start}): the object is truncated"
                )
            view = memoryview(data)
            for chunk, offset, nbytes in stored:
                rows, whole = self._rows(outputs[a], array, chunk, start, stop)
                target = rows if whole else np.empty(array.chunks, np.uint8)
                self._decode(view[offset - span_start : offset - span_start + nbytes], target, f"chunk {chunk} in {name}")
                if not whole:
                    skip = max(start - chunk * array.chunks[0], 0)
                    rows[...] = target[skip : skip + len(rows)]
        return outputs

    @staticmethod
    def _rows(output: np.ndarray, array: zarr.Array, chunk: int, start: int, stop: int) -> tuple[np.ndarray, bool]:
        """The rows of ``output`` (frames ``start:stop``) that inner chunk ``chunk`` holds, and whether
        they are the whole chunk (then it decompresses straight into them)."""
        low, high = chunk * array.chunks[0], (chunk + 1) * array.chunks[0]
        rows = output[max(low, start) - start : min(high, stop) - start]
        return rows, low >= start and high <= stop

    def _path(self, a: int, shard: int) -> str:
        array = self.arrays[a]
        return posixpath.join(self._root, array.path, object_key(array, shard))

    def _name(self, path: str) -> str:
        """``path`` as the store's URL and the object's key, for messages."""
        return f"{self._url.rstrip('/')}/{path[len(self._root) :].lstrip('/')}"

    def _fetch(self, paths: list[str], starts: list[int], ends: list[int | None]) -> list[bytes | None]:
        """The byte ranges, concurrently on object stores (``None`` for an object that does not exist);
        any other error is raised with a note naming the object."""
        if not paths:
            return []
        found = self._fs.cat_ranges(paths, starts, ends, on_error="return")
        for path, result in zip(paths, found):
            if isinstance(result, BaseException) and not isinstance(result, FileNotFoundError):
                result.add_note(f"while reading {self._name(path)}")
                raise result
        return [None if isinstance(result, FileNotFoundError) else result for result in found]

    def _load_indexes(self, keys: list[tuple[int, int]]) -> None:
        sizes = [16 * (self.arrays[a].shards[0] // self.arrays[a].chunks[0]) + 4 for a, _ in keys]
        paths = [self._path(a, shard) for a, shard in keys]
        for key, path, size, data in zip(keys, paths, sizes, self._fetch(paths, [-size for size in sizes], [None] * len(keys))):
            self._indexes[key] = None if data is None else self._parse_index(data, size, self._name(path))

    @staticmethod
    def _parse_index(data: bytes, size: int, name: str) -> np.ndarray:
        if len(data) != size:
            raise DamagedShard(f"{name} is {len(data)} bytes, shorter than its {size}-byte index: the object is truncated")
        stored, computed = int.from_bytes(data[-4:], "little"), google_crc32c.value(data[:-4])
        if stored != computed:
            raise DamagedShard(
                f"the index of {name} does not match its crc32c (stored {stored:#010x}, computed {computed:#010x}): "
                "the object is damaged or truncated"
            )
        return np.frombuffer(data[:-4], "<u8").reshape(-1, 2)

    def _decode(self, frame: memoryview, into: np.ndarray, name: str) -> None:
        """Decompress ``frame`` into the contiguous ``into``, which it must fill exactly."""
        declared = _zstd_content_size(frame)
        if declared is not None and declared != into.nbytes:
            raise DamagedShard(f"{name} declares {declared} bytes, not the {into.nbytes} of a chunk")
        try:
            if declared is not None:
                self._codec.decode(frame, out=into)
                return
            values = np.frombuffer(self._codec.decode(frame), np.uint8)  # a frame that does not say its size
        except (RuntimeError, ValueError) as error:
            raise DamagedShard(f"{name} cannot be decompressed ({error})") from None
        if values.size != into.nbytes:
            raise DamagedShard(f"{name} holds {values.size} bytes, not the {into.nbytes} of a chunk")
        into.reshape(-1)[:] = values
