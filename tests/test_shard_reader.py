"""gmfx.storage._shards.ShardReader: reads of the frames store's zstd shards without zarr's pipeline.

The oracle is zarr-python reading the same arrays (and the values written). Arrays are written by zarr
itself (its sharding codec, not gmfx's ShardBuilder), or by hand in the tests for layouts neither
writes; damaged shards must raise errors that name the object, and on S3 a read costs at most one index
and one data request per shard per array.
"""

from __future__ import annotations

import shutil

import google_crc32c
import numpy as np
import pytest
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from gmfx import Location, StorageError, find_recordings
from gmfx.stages.decode import FrameReader, run_decode
from gmfx.stages.recon import _read_ahead
from gmfx.storage._retry import retry_transient
from gmfx.storage._shards import DamagedShard, ShardReader, _zstd_content_size, shard_level
from gmfx.testing import ThrottlingProxy, s3_storage_options, write_bids_recording
from gmfx.types import Region

N_FRAMES = 61  # shards of 12 (3 chunks of 4) and of 9 (3 chunks of 3): partial last chunk and shard
GEOMETRY = {"y": ((4, 6, 5), (12, 6, 5)), "u": ((3, 3, 2), (9, 3, 2))}


def _write(root: Location, n_frames: int = N_FRAMES, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of GEOMETRY filled by zarr with random values (zeros here and there); their values."""
    group = zarr.open_group(**root.zarr_kwargs(), mode="w", zarr_format=3)
    rng = np.random.default_rng(seed)
    values = {}
    for name, (chunks, shards) in GEOMETRY.items():
        values[name] = rng.integers(0, 6, (n_frames, *chunks[1:]), dtype=np.uint8)
        array = group.create_array(name, shape=values[name].shape, chunks=chunks, shards=shards, dtype=np.uint8,
                                   compressors=ZstdCodec(level=2))  # fmt: skip
        array[:] = values[name]
    return values


def _arrays(root: Location) -> list[zarr.Array]:
    group = zarr.open_group(**root.zarr_kwargs(), mode="r", zarr_format=3)
    return [group[name] for name in GEOMETRY]


def _ranges(n_frames: int, count: int, seed: int) -> list[tuple[int, int]]:
    """Ranges within one shard, across shard boundaries, at the end, the whole array, empty ones; random ones."""
    fixed = [(0, 4), (1, 3), (13, 23), (8, 16), (10, 40), (57, 61), (60, 61), (48, 61), (0, n_frames), (5, 5), (61, 61)]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_frames, count)
    return fixed + [(int(s), int(rng.integers(s, n_frames + 1))) for s in starts]


def test_reads_equal_zarr_for_every_range(any_root):
    root = any_root.child("store.zarr")
    values = _write(root)
    arrays = _arrays(root)
    assert all(shard_level(array) == 2 for array in arrays)
    reader = ShardReader(arrays, root)  # one reader for all ranges: the cached indexes are used too
    for start, stop in _ranges(N_FRAMES, 25, seed=1):
        got = reader.read(start, stop)
        for array, name, plane in zip(arrays, GEOMETRY, got):
            assert plane.shape == (stop - start, *array.shape[1:]) and plane.dtype == np.uint8
            np.testing.assert_array_equal(plane, array[start:stop], err_msg=f"{name} [{start}:{stop}]")
            np.testing.assert_array_equal(plane, values[name][start:stop], err_msg=f"{name} [{start}:{stop}]")


def test_chunks_and_shards_never_written_read_as_the_fill_value(tmp_path):
    root = Location(str(tmp_path / "sparse.zarr"))
    group = zarr.open_group(root.url, mode="w", zarr_format=3)
    array = group.create_array("y", shape=(61, 6, 5), chunks=(4, 6, 5), shards=(12, 6, 5), dtype=np.uint8,
                               compressors=ZstdCodec(level=2))  # fmt: skip
    rng = np.random.default_rng(2)
    array[4:8] = rng.integers(1, 9, (4, 6, 5), dtype=np.uint8)  # shard 0: only its chunk 1
    array[26:30] = rng.integers(1, 9, (4, 6, 5), dtype=np.uint8)  # shard 2: chunks 6 and 7, partly
    array[60:61] = 7  # the last shard, its padded chunk
    stored = sorted(p.name for p in (tmp_path / "sparse.zarr" / "y" / "c").iterdir())
    assert stored == ["0", "2", "5"]  # shards 1, 3 and 4 were never written
    reader = ShardReader([array], root)
    for start, stop in _ranges(61, 25, seed=3):
        (got,) = reader.read(start, stop)
        np.testing.assert_array_equal(got, array[start:stop], err_msg=f"[{start}:{stop}]")
    assert reader._indexes[0, 1] is None and (reader._indexes[0, 0][[0, 2]] == 2**64 - 1).all()


def _shard_bytes(chunks: list[bytes], order: list[int], gap: bytes) -> bytes:
    """A shard as the zarr v3 spec allows it: chunks stored in ``order`` with ``gap`` bytes between them."""
    body, index = b"", np.zeros((len(chunks), 2), "<u8")
    for i in order:
        index[i] = len(body), len(chunks[i])
        body += chunks[i] + gap
    return body + index.tobytes() + np.uint32(google_crc32c.value(index.tobytes())).astype("<u4").tobytes()


def test_chunks_stored_out_of_order_with_gaps_read_as_zarr_reads_them(tmp_path):
    root = Location(str(tmp_path / "foreign.zarr"))
    array = zarr.open_group(root.url, mode="w", zarr_format=3).create_array(
        "y", shape=(24, 6, 5), chunks=(4, 6, 5), shards=(12, 6, 5), dtype=np.uint8, compressors=ZstdCodec(level=2)
    )
    values = np.random.default_rng(4).integers(0, 255, (24, 6, 5), dtype=np.uint8)
    for shard in range(2):
        chunks = [Zstd(level=2).encode(values[shard * 12 + 4 * i : shard * 12 + 4 * i + 4]) for i in range(3)]
        path = tmp_path / "foreign.zarr" / "y" / "c" / str(shard) / "0" / "0"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_shard_bytes(chunks, [2, 0, 1], b"junk"))
    np.testing.assert_array_equal(array[:], values)  # zarr reads the hand-made shards
    reader = ShardReader([array], root)
    for start, stop in [(0, 24), (1, 11), (4, 8), (5, 19), (20, 24), (8, 13)]:
        np.testing.assert_array_equal(reader.read(start, stop)[0], values[start:stop], err_msg=f"[{start}:{stop}]")


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 65791, 65792, 65793, 921_600])
def test_the_size_a_zstd_frame_declares_is_read_from_its_header(size):
    """Every width of the header's size field (1, 2 with its 256 offset, 4 bytes; RFC 8878 3.1.1.1)."""
    assert _zstd_content_size(memoryview(Zstd(level=1).encode(np.zeros(size, np.uint8)))) == size


def _raw_frame(payload: bytes) -> bytes:
    """A zstd frame that does not declare its size (RFC 8878): magic, descriptor 0, a 128 KiB window,
    one last raw block."""
    return b"\x28\xb5\x2f\xfd\x00\x38" + (1 | len(payload) << 3).to_bytes(3, "little") + payload


def test_chunks_that_do_not_declare_their_size_are_read_and_checked(tmp_path):
    root = Location(str(tmp_path / "raw.zarr"))
    array = zarr.open_group(root.url, mode="w", zarr_format=3).create_array(
        "y", shape=(24, 6, 5), chunks=(4, 6, 5), shards=(12, 6, 5), dtype=np.uint8, compressors=ZstdCodec(level=2)
    )
    values = np.random.default_rng(5).integers(0, 255, (24, 6, 5), dtype=np.uint8)
    for shard, cut in ((0, 0), (1, 1)):  # shard 1's chunk 4 is one byte short
        chunks = [_raw_frame(values[shard * 12 + 4 * i : shard * 12 + 4 * i + 4].tobytes()[: 120 - cut * (i == 1)]) for i in range(3)]
        path = tmp_path / "raw.zarr" / "y" / "c" / str(shard) / "0" / "0"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_shard_bytes(chunks, [0, 1, 2], b""))
    assert _zstd_content_size(memoryview(_raw_frame(b"abc"))) is None
    np.testing.assert_array_equal(array[0:12], values[0:12])  # zarr reads the hand-made frames
    reader = ShardReader([array], root)
    np.testing.assert_array_equal(reader.read(1, 12)[0], values[1:12])
    with pytest.raises(DamagedShard, match=r"chunk 4 in \S+/y/c/1/0/0 holds 119 bytes, not the 120 of a chunk"):
        reader.read(12, 24)


def _damage(path, kind: str) -> None:
    """Damage the shard at ``path`` (3 chunks a shard: an index of 3 * 16 + 4 bytes)."""
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-52:-4]), "<u8").reshape(3, 2)
    if kind == "short":
        data = data[:10]
    elif kind == "index":
        data[-52 + 8] ^= 0x01  # the nbytes of chunk 0: the crc32c no longer matches
    elif kind == "chunk":
        first = int(index[:, 0].min())
        data[first : first + 4] = b"\0\0\0\0"  # the zstd magic of the first stored chunk
    elif kind == "cut":
        data = data[:20] + data[-52:]  # the index intact, the chunks it names gone
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("short", r"is 10 bytes, shorter than its 52-byte index: the object is truncated"),
        ("index", r"the index of \S+ does not match its crc32c"),
        ("chunk", r"chunk 3 in \S+ cannot be decompressed"),
        ("cut", r"ends before byte \d+ that its index names"),
    ],
)
def test_a_damaged_shard_is_an_error_naming_the_object(tmp_path, kind, message):
    root = Location(str(tmp_path / "store.zarr"))
    _write(root)
    _damage(tmp_path / "store.zarr" / "y" / "c" / "1" / "0" / "0", kind)
    reader = ShardReader(_arrays(root), root)
    np.testing.assert_array_equal(reader.read(0, 12)[0], zarr.open_array(f"{root.url}/y")[0:12])  # shard 0 is fine
    with pytest.raises(DamagedShard, match=message) as info:
        reader.read(10, 24)
    assert f"{root.url}/y/c/1/0/0" in str(info.value)


@pytest.fixture(scope="module")
def frames_store(tmp_path_factory):
    """A decode store of 16 frames: shards of 8 frames in 2 chunks of 4 (written by gmfx's ShardBuilder)."""
    root = Location(str(tmp_path_factory.mktemp("bids")))
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=16))
    (recording,) = find_recordings(root)
    out = Location(str(tmp_path_factory.mktemp("out")))
    (store,) = run_decode([recording], out, client=None, chunk_frames=4, segment_frames=8, progress=False)
    return store


@pytest.mark.parametrize("kind", ["short", "index", "chunk"])
def test_recon_reads_of_a_damaged_shard_end_as_the_storage_error_naming_store_and_chunks(frames_store, tmp_path, kind):
    store = Location(str(tmp_path / "frames.zarr"))
    shutil.copytree(frames_store.url, store.url)
    shard = tmp_path / "frames.zarr" / "y_plane" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if kind == "short":
        data = data[:10]
    elif kind == "index":
        data[-36 + 3] ^= 0x10  # the offset of chunk 0 (2 chunks: a 36-byte index)
    else:
        data[:4] = b"\0\0\0\0"  # ShardBuilder stores chunk 0 first
    shard.write_bytes(bytes(data))
    reader = FrameReader(store)
    assert reader._shards is not None  # read by ShardReader, not zarr
    batches = _read_ahead(reader, Region(0, 0, 16), 4, where=store)
    assert [start for start, _ in [next(batches), next(batches)]] == [0, 4]
    with pytest.raises(StorageError, match="frames 8-11 of the decode store cannot be read") as info:
        next(batches)
    assert f"{store.url} (chunks y_plane/c/1/0/0, u_plane/c/1/0/0, v_plane/c/1/0/0)" in str(info.value)
    assert isinstance(info.value.__cause__, DamagedShard)


def _counted_reads(proxy: ThrottlingProxy, start: int, stop: int, reader: ShardReader) -> dict[str, int]:
    """The GETs of each shard (its key in the store) that ``reader.read(start, stop)`` sends."""
    before = dict(proxy.passed)
    reader.read(start, stop)
    return {key.split(".zarr/")[1]: n - before.get(key, 0) for key, n in proxy.passed.items() if n > before.get(key, 0)}


def test_a_16_frame_read_on_s3_costs_one_index_and_one_data_request_per_shard_and_array(s3_root, s3_endpoint):
    root = s3_root.child("store.zarr")
    values = _write(root, n_frames=96)  # y: shards of 12 frames (3 chunks), u: of 9 (3 chunks)
    with ThrottlingProxy(s3_endpoint, {r"^GET .*\.zarr/[yu]/c/": 0}) as proxy:  # counts every read of a shard
        through = Location(root.url, s3_storage_options(proxy.endpoint))
        reader = ShardReader(_arrays(through), through)
        # y frames 24-39: shards 2 and 3; u: shards 2, 3 and 4 (frames 18-44); cold: index + data for each
        assert _counted_reads(proxy, 24, 40, reader) == {
            "y/c/2/0/0": 2, "y/c/3/0/0": 2, "u/c/2/0/0": 2, "u/c/3/0/0": 2, "u/c/4/0/0": 2,
        }  # fmt: skip
        # frames 40-55: y shards 3 (index cached) and 4; u shards 4 (cached), 5 and 6
        assert _counted_reads(proxy, 40, 56, reader) == {
            "y/c/3/0/0": 1, "y/c/4/0/0": 2, "u/c/4/0/0": 1, "u/c/5/0/0": 2, "u/c/6/0/0": 2,
        }  # fmt: skip
        # again: every index is cached, one request per shard and array
        assert _counted_reads(proxy, 24, 40, reader) == {
            "y/c/2/0/0": 1, "y/c/3/0/0": 1, "u/c/2/0/0": 1, "u/c/3/0/0": 1, "u/c/4/0/0": 1,
        }  # fmt: skip
    got = ShardReader(_arrays(root), root).read(24, 40)
    np.testing.assert_array_equal(got[0], values["y"][24:40])
    np.testing.assert_array_equal(got[1], values["u"][24:40])


def test_throttled_s3_reads_are_transient_and_a_retry_reads_the_right_frames(s3_root, s3_endpoint, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # one attempt per call in s3fs's own retry loop
    root = s3_root.child("store.zarr")
    values = _write(root)
    # the first request for y's shards 1 and 2 (their index reads) answers 503
    with ThrottlingProxy(s3_endpoint, {r"^GET .*\.zarr/y/c/[12]/": 1}) as proxy:
        options = {**s3_storage_options(proxy.endpoint), "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        through = Location(root.url, options)
        reader = ShardReader(_arrays(through), through)
        got = retry_transient(lambda: reader.read(10, 30), what="reading", where=root.url, backoff=0.01)
    assert sum(proxy.injected.values()) == 2  # both throttled: the first attempt failed, its retry passed
    np.testing.assert_array_equal(got[0], values["y"][10:30])
    np.testing.assert_array_equal(got[1], values["u"][10:30])
