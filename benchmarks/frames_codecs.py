"""What a frames store costs per frame: layouts (RGB, YUV 4:2:0 planes), codecs, sharding, codec pipelines.

Decodes real 640x360 frames (tests/data/single_face.mp4, played forwards and backwards up to
``--frames``) once, then for each case writes them to a local Zarr v3 store the way the decode stage
does (one write per ``--write-frames`` block, which is one shard when sharded) and reads them back, and
prints, per frame: the CPU to turn the decoder's frame into what is stored (RGB conversion or a copy of
the planes), the CPU and wall time to write, the stored bytes and objects, the CPU to read everything
back, and the bytes read (through an fsspec-level counter) to fetch one frame, as a QC still does.

Cases: RGB against the decoder's YUV 4:2:0 planes; zstd levels, blosc-lz4 and blosc-zstd; plain
chunks of a write block against zarr v3 shards of 1, 4 or 8-frame chunks; zarr-python's codec pipeline
against the ``zarrs`` Rust pipeline (when installed: ``pip install zarrs``; it runs on zarr's
LocalStore only) and against gmfx's own shard writer (``gmfx.storage._shards.ShardBuilder``, what the
decode stage uses). Every case runs in this one process, so the ratios between cases hold on a loaded machine even where
the absolute times do not. Run: ``python benchmarks/frames_codecs.py [--frames N] [--write-frames W]
[--cases NAME ...]``; ``--cases`` picks cases by name (all by default).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import av
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from _common import CLIP, Report

from gmfx.storage._shards import ShardBuilder



@dataclass(frozen=True)
class Case:
    name: str
    layout: str  # "rgb" or "yuv420p"
    compressor: object
    inner_frames: int | None = None  # frames per inner chunk when sharded (None: plain chunks of a write block)
    pipeline: str = "zarr"  # "zarr" (zarr-python's), "zarrs" (the Rust codec pipeline), "gmfx" (its ShardBuilder)


def cases(write_frames: int) -> list[Case]:
    lz4 = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    lz4_bit = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    bzstd = BloscCodec(cname="zstd", clevel=2, shuffle="noshuffle")
    found = [
        Case("rgb zstd-2", "rgb", ZstdCodec(level=2)),
        Case("rgb blosc-lz4", "rgb", lz4),
        Case("yuv zstd-1", "yuv420p", ZstdCodec(level=1)),
        Case("yuv zstd-2", "yuv420p", ZstdCodec(level=2)),
        Case("yuv zstd-3", "yuv420p", ZstdCodec(level=3)),
        Case("yuv zstd-5", "yuv420p", ZstdCodec(level=5)),
        Case("yuv blosc-lz4", "yuv420p", lz4),
        Case("yuv blosc-lz4 bitshuffle", "yuv420p", lz4_bit),
        Case("yuv blosc-zstd-2", "yuv420p", bzstd),
        Case("yuv zstd-2 shard inner=1", "yuv420p", ZstdCodec(level=2), inner_frames=1),
        Case("yuv zstd-2 shard inner=4", "yuv420p", ZstdCodec(level=2), inner_frames=4),
        Case("yuv zstd-2 shard inner=8", "yuv420p", ZstdCodec(level=2), inner_frames=8),
        Case("yuv zstd-3 shard inner=4", "yuv420p", ZstdCodec(level=3), inner_frames=4),
        Case("yuv zstd-2 shard inner=4 [gmfx ShardBuilder]", "yuv420p", ZstdCodec(level=2), inner_frames=4, pipeline="gmfx"),
    ]
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return found
    return found + [
        Case("yuv zstd-2 [zarrs]", "yuv420p", ZstdCodec(level=2), pipeline="zarrs"),
        Case("yuv zstd-2 shard inner=1 [zarrs]", "yuv420p", ZstdCodec(level=2), inner_frames=1, pipeline="zarrs"),
        Case("yuv zstd-2 shard inner=4 [zarrs]", "yuv420p", ZstdCodec(level=2), inner_frames=4, pipeline="zarrs"),
        Case("yuv zstd-3 shard inner=4 [zarrs]", "yuv420p", ZstdCodec(level=3), inner_frames=4, pipeline="zarrs"),
    ]


def decoded_frames(n: int) -> list[av.VideoFrame]:
    with av.open(str(CLIP)) as container:
        frames = list(container.decode(video=0))
    loop = frames + frames[-2:0:-1]
    return [loop[i % len(loop)] for i in range(n)]


def to_rgb(frames: list[av.VideoFrame], out: np.ndarray) -> None:
    for i, frame in enumerate(frames):
        out[i] = frame.to_ndarray(format="rgb24")


def to_planes(frames: list[av.VideoFrame], out: list[np.ndarray]) -> None:
    for i, frame in enumerate(frames):
        for plane, target in zip(frame.planes, out):
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
            target[i] = rows[:, : target.shape[2]]


class CountingReads:
    """Bytes read through fsspec's local filesystem while active (the files a Zarr read opens)."""

    def __init__(self) -> None:
        self.bytes = 0

    def __enter__(self) -> "CountingReads":
        from fsspec.implementations.local import LocalFileOpener

        self._original = LocalFileOpener.read
        counter = self

        def read(opener, *args, **kwargs):
            data = counter._original(opener, *args, **kwargs)
            counter.bytes += len(data)
            return data

        LocalFileOpener.read = read
        return self

    def __exit__(self, *exc) -> None:
        from fsspec.implementations.local import LocalFileOpener

        LocalFileOpener.read = self._original


def run_case(case: Case, frames: list[av.VideoFrame], folder: pathlib.Path, write_frames: int) -> dict:
    n, height, width = len(frames), frames[0].height, frames[0].width
    shapes = {"frames": (height, width, 3)} if case.layout == "rgb" else {
        "y": (height, width), "u": ((height + 1) // 2, (width + 1) // 2), "v": ((height + 1) // 2, (width + 1) // 2)
    }
    path = folder / case.name.replace(" ", "_").replace("[", "").replace("]", "")
    shutil.rmtree(path, ignore_errors=True)
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline" if case.pipeline == "zarrs"
                          else "zarr.core.codec_pipeline.BatchedCodecPipeline", "codec_pipeline.strict": True}):  # fmt: skip
        # zarrs runs only on zarr's LocalStore (it falls back to zarr's own pipeline behind fsspec), where the
        # fsspec counter of one frame's read sees nothing
        store = (zarr.storage.LocalStore(str(path)) if case.pipeline == "zarrs"
                 else zarr.storage.FsspecStore.from_url(f"file://{path}", storage_options={"auto_mkdir": True}))  # fmt: skip
        group = zarr.open_group(store, mode="w", zarr_format=3)
        arrays = {}
        for name, shape in shapes.items():
            if case.inner_frames is None:
                arrays[name] = group.create_array(name, shape=(n, *shape), chunks=(write_frames, *shape),
                                                  dtype="uint8", compressors=[case.compressor])  # fmt: skip
            else:
                arrays[name] = group.create_array(name, shape=(n, *shape), chunks=(case.inner_frames, *shape),
                                                  shards=(write_frames, *shape), dtype="uint8",
                                                  compressors=[case.compressor])  # fmt: skip
        buffers = {name: np.empty((write_frames, *shape), np.uint8) for name, shape in shapes.items()}
        convert_cpu = write_cpu = write_wall = 0.0
        for start in range(0, n, write_frames):
            block = frames[start : start + write_frames]
            cpu = time.process_time()
            if case.layout == "rgb":
                to_rgb(block, buffers["frames"])
            else:
                to_planes(block, [buffers[k] for k in ("y", "u", "v")])
            convert_cpu += time.process_time() - cpu
            cpu, wall = time.process_time(), time.perf_counter()
            for name, array in arrays.items():
                if case.pipeline == "gmfx":  # what the decode stage does: chunks compressed, the shard in one write
                    builder = ShardBuilder(array.chunks, -(-write_frames // case.inner_frames), case.compressor.level)
                    for i in range(0, len(block), case.inner_frames):
                        builder.add(i // case.inner_frames, buffers[name][i : min(i + case.inner_frames, len(block))])
                    target = path / name / array.metadata.encode_chunk_key((start // write_frames, 0, 0))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(builder.finish(-(-len(block) // case.inner_frames)))
                    continue
                array.with_config({"write_empty_chunks": True})[start : start + len(block)] = buffers[name][: len(block)]
            write_cpu += time.process_time() - cpu
            write_wall += time.perf_counter() - wall
        files = [p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"]
        stored = sum(p.stat().st_size for p in files)
        reopened = zarr.open_group(store, mode="r", zarr_format=3)
        cpu = time.process_time()
        for name in shapes:
            for start in range(0, n, write_frames):
                reopened[name][start : start + write_frames]
        read_cpu = time.process_time() - cpu
        with CountingReads() as counter:
            for name in shapes:
                zarr.open_group(store, mode="r", zarr_format=3)[name][n // 2]
    shutil.rmtree(path)
    return {
        "convert_ms": convert_cpu / n * 1e3, "write_ms": write_cpu / n * 1e3, "write_wall_ms": write_wall / n * 1e3,
        "read_ms": read_cpu / n * 1e3, "kb_per_frame": stored / n / 1e3, "objects": len(files),
        "one_frame_read_kb": counter.bytes / 1e3,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=256, help="frames per case (640x360)")
    parser.add_argument("--write-frames", type=int, default=64, help="frames per write (a chunk, or a shard)")
    parser.add_argument("--cases", nargs="*", default=None, help="names of the cases to run (default: all)")
    args = parser.parse_args()
    report = Report("frames_codecs", args)
    frames = decoded_frames(args.frames)
    selected = [c for c in cases(args.write_frames) if args.cases is None or c.name in args.cases]
    report.note(f"{args.frames} frames 640x360 from {CLIP.name}, {args.write_frames} frames a write; CPU ms per frame")
    print(f"{'case':44s} {'to store':>8s} {'write':>7s} {'wall':>7s} {'total':>7s} {'read':>7s} "
          f"{'kB/frame':>9s} {'objects':>8s} {'1-frame read kB':>16s}")  # fmt: skip
    baseline = None
    with tempfile.TemporaryDirectory(prefix="gmfx-codecs-") as folder:
        for case in selected:
            r = run_case(case, frames, pathlib.Path(folder), args.write_frames)
            total = r["convert_ms"] + r["write_ms"]
            baseline = baseline or total
            print(f"{case.name:44s} {r['convert_ms']:8.2f} {r['write_ms']:7.2f} {r['write_wall_ms']:7.2f} {total:7.2f} "
                  f"{r['read_ms']:7.2f} {r['kb_per_frame']:9.1f} {r['objects']:8d} {r['one_frame_read_kb']:16.1f}")  # fmt: skip
            report.add(case.name, total, "CPU ms/frame to store", ratio=baseline / total, baseline=selected[0].name,
                       echo=False, **r)  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
