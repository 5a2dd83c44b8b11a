"""Decode stage against a plain PyAV loop, in one run.

Makes a 1,800-frame 640x360 H.264 video (the real clip tests/data/single_face.mp4 played forwards and
backwards, x264 defaults: keyframe every 250 frames, 3 B-frames) in ``benchmarks/_work/``, then times:

* the plain loop: one ``av.open``, every frame ``to_ndarray("rgb24")`` (PyAV's default threading);
* the floor of any lossless planes store: decode on one thread, zstd every 4 frames' planes on every
  core, write nothing (what gmfx's store cannot beat on this machine);
* ``gmfx.stages.decode.run_decode`` on gmfx's local cluster (``gmfx.connect``, as the CLI runs it) of 1
  and of 2 single-threaded worker processes (2 workers hold a core each; 1 keeps both),
  writing the frames store (the decoder's YUV planes, sharded) to a local folder (indexing, planning
  and finalizing included; the cluster's start-up is not, and a tiny warm-up run loads the libraries
  in the workers first); and, with 1 worker, the RGB layout of gmfx before frames store schema 2.

It prints frames per second, the ratio to the plain loop (targets: >= 0.7 with 1 worker, >= 1.3 with
2) and the stored bytes per frame (target: <= 106 kB, half of the RGB layout's 212 kB), and writes
them with the workers' CPU per frame and the objects an hour of such video makes to
``benchmarks/results/decode.json``. Run: ``python benchmarks/decode.py [--frames N]
[--compression-level L] [--repeat R] [--workers 1 2]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import time

import av
import dask
import zarr
from distributed import Client

from _common import CLIP, Report

from gmfx._pixels import copy_planes
from gmfx.cluster import connect
from gmfx.dataset import find_recordings
from gmfx.stages.decode import COMPRESSION_LEVEL, run_decode
from gmfx.storage import Location
from gmfx.testing._videos import write_bids_recording, write_video

HERE = pathlib.Path(__file__).parent
WORK = HERE / "_work"


def make_video(path: pathlib.Path, n_frames: int) -> pathlib.Path:
    """The real clip played forwards and backwards until ``n_frames`` (cached)."""
    if path.exists():
        return path
    with av.open(str(CLIP)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    loop = frames + frames[-2:0:-1]
    write_video(path, frames=[loop[i % len(loop)] for i in range(n_frames)], fps=30, crf=23)
    return path


def plain_loop(video: pathlib.Path) -> tuple[float, float]:
    """Wall and CPU seconds to decode every frame to an RGB numpy array with PyAV."""
    start, cpu = time.perf_counter(), time.process_time()
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
    return time.perf_counter() - start, time.process_time() - cpu


def floor_loop(video: pathlib.Path, level: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds of the least any planes store costs: PyAV decodes on one thread, every 4
    frames' planes are zstd-compressed on ``threads`` threads, nothing is written (gmfx's floor)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from numcodecs import Zstd

    codec, chunk = Zstd(level=level), 4
    start, cpu = time.perf_counter(), time.process_time()
    with av.open(str(video)) as container, ThreadPoolExecutor(threads) as pool:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", 1
        buffers, filled, jobs = [], 0, []
        for frame in container.decode(stream):
            if filled == 0:  # fresh buffers: the previous ones may still be compressing
                buffers = [np.empty((chunk, p.height, p.width), np.uint8) for p in frame.planes]
            copy_planes(frame, [b[filled] for b in buffers])
            filled += 1
            if filled == chunk:
                jobs += [pool.submit(codec.encode, b) for b in buffers]
                filled = 0
        for job in jobs:
            job.result()
    return time.perf_counter() - start, time.process_time() - cpu


def gmfx_decode(
    client: Client, recordings, out: pathlib.Path, level: int, segment_frames: int | None, layout: str = "auto"
) -> tuple[float, float]:
    """Wall seconds of a decode run, and the CPU seconds its workers spent."""
    shutil.rmtree(out, ignore_errors=True)
    cpu = sum(client.run(time.process_time).values())
    start = time.perf_counter()
    run_decode(
        recordings, Location(str(out)), client=client, compression_level=level, segment_frames=segment_frames,
        frames_layout=layout, progress=False,
    )
    return time.perf_counter() - start, sum(client.run(time.process_time).values()) - cpu


def stored_bytes(out: pathlib.Path) -> int:
    """Bytes of the stored pixels (planes or RGB frames), without metadata, coordinates and markers."""
    return sum(
        p.stat().st_size for p in out.rglob("*")
        if p.is_file() and any(f"/{name}/c/" in p.as_posix() for name in ("frames", "y_plane", "u_plane", "v_plane"))
    )  # fmt: skip


def objects_per_hour(store: pathlib.Path, fps: float = 30.0) -> float:
    """Objects an hour of this video makes at ``fps``: a shard a stored variable and a marker a shard."""
    group = zarr.open_group(str(store), mode="r")
    arrays = [a for name, a in group.arrays() if name not in ("time", "frame")]
    shards = 3600 * fps / arrays[0].shards[0]
    return shards * (len(arrays) + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1800)
    parser.add_argument("--compression-level", type=int, default=COMPRESSION_LEVEL)
    parser.add_argument("--segment-frames", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2, help="best of R runs of each")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--malloc-trim-threshold",
        type=int,
        default=None,
        help="MALLOC_TRIM_THRESHOLD_ of the worker processes (Dask sets 65536, which also fixes glibc's mmap "
        "threshold at 128 kB, so every frame-sized allocation maps fresh pages)",
    )
    args = parser.parse_args()
    report = Report("decode", args)

    WORK.mkdir(exist_ok=True)
    video = make_video(WORK / f"loop_{args.frames}.mp4", args.frames)
    bids = WORK / "bids"
    shutil.rmtree(bids, ignore_errors=True)
    write_bids_recording(bids, subject="01", task="bench", video=video)
    write_bids_recording(bids, subject="02", task="warmup", video=dict(n_frames=8))
    recordings = find_recordings(str(bids), task="bench")
    warmup = find_recordings(str(bids), task="warmup")
    with av.open(str(video)) as container:
        n = sum(1 for _ in container.demux(video=0)) - 1
    source_per_frame = video.stat().st_size / n

    if args.malloc_trim_threshold is not None:
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": args.malloc_trim_threshold})
    results = {"plain PyAV loop": min(plain_loop(video) for _ in range(args.repeat))}
    cores = len(os.sched_getaffinity(0))
    floor_name = f"floor: decode 1 thread + zstd {args.compression_level} on {cores}, no writes"
    results[floor_name] = min(floor_loop(video, args.compression_level, cores) for _ in range(args.repeat))
    stored = {}
    for workers in args.workers:
        with connect(workers=workers) as client:  # as the CLI runs it
            gmfx_decode(client, warmup, WORK / "warmup_out", args.compression_level, None)
            layouts = ["auto", "rgb"] if workers == args.workers[0] else ["auto"]
            for layout in layouts:
                out = WORK / f"out_{workers}_{layout}"
                name = f"gmfx decode, {workers} worker{'s' * (workers > 1)}" + (", RGB layout" if layout == "rgb" else "")
                results[name] = min(
                    gmfx_decode(client, recordings, out, args.compression_level, args.segment_frames, layout)
                    for _ in range(args.repeat if layout == "auto" else 1)
                )
                stored[layout] = stored_bytes(out) / n
                store = next(out.rglob("*_frames.zarr"))
                stored[f"{layout} objects"] = objects_per_hour(store)
                shutil.rmtree(out)  # hundreds of MB

    baseline = results["plain PyAV loop"][0]
    trim = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", None)
    report.note(f"video: {n} frames 640x360, {source_per_frame / 1e3:.1f} kB/frame in the source file; zstd level "
                f"{args.compression_level}, segment frames {args.segment_frames or 'default'}, workers' "
                f"MALLOC_TRIM_THRESHOLD_ {trim}")  # fmt: skip
    targets = {1: 0.7, 2: 1.3}
    for name, (seconds, cpu) in results.items():
        workers = int(name.split(", ")[1].split()[0]) if name.startswith("gmfx") else None
        target = targets.get(workers) if "RGB" not in name else None
        if name == floor_name:
            report.add(name, n / seconds, "frames/s", ratio=baseline / seconds, baseline="plain PyAV loop",
                       cpu_ms_per_frame=cpu / n * 1e3)  # fmt: skip
        elif workers is None:
            report.add(name, n / seconds, "frames/s", cpu_ms_per_frame=cpu / n * 1e3)
        else:
            report.add(name, n / seconds, "frames/s", ratio=baseline / seconds, baseline="plain PyAV loop",
                       target=target, cpu_ms_per_frame=cpu / n * 1e3)  # fmt: skip
        print(f"{'':42s} CPU {cpu / n * 1e3:.2f} ms/frame")
    raw = 640 * 360 * 3
    report.add("stored bytes per frame (planes)", stored["auto"], "B", ratio=212_000 / stored["auto"],
               baseline="212 kB (RGB layout measured in the issue)", target=2.0)  # fmt: skip
    if "rgb" in stored:
        report.add("stored bytes per frame (RGB layout)", stored["rgb"], "B", ratio=raw / stored["rgb"], baseline="raw RGB")
    report.add("objects per hour of 30 fps video", stored["auto objects"], "objects", target=None)
    one = results.get(f"gmfx decode, {args.workers[0]} worker{'s' * (args.workers[0] > 1)}")
    report.stage_cost("decode", "cpu_s_per_frame", one[1] / n)
    report.stage_cost("decode", "wall_s_per_frame_one_worker", one[0] / n)
    report.stage_cost("decode", "stored_bytes_per_frame", stored["auto"])
    report.stage_cost("decode", "objects_per_hour_30fps", stored["auto objects"])
    report.stage_cost("decode", "source_bytes_per_frame", source_per_frame)
    report.write()


if __name__ == "__main__":
    main()
