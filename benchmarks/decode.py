"""Decode stage against a plain PyAV loop, in one run.

Makes a 1,800-frame 640x360 H.264 video (the real clip tests/data/single_face.mp4 played forwards and
backwards, x264 defaults: keyframe every 250 frames, 3 B-frames) in ``benchmarks/_work/``, then times:

* the plain loop: one ``av.open``, every frame ``to_ndarray("rgb24")`` (PyAV's default threading);
* ``gmfx.stages.decode.decode`` on a local cluster of 1 and of 2 single-threaded worker processes,
  writing the frames store to a local folder (indexing, planning and finalizing included; the
  cluster's start-up is not, and a tiny warm-up run loads the libraries in the workers first).

It prints frames per second, the ratio to the plain loop and the stored bytes per frame against the
source file's. Run: ``python benchmarks/decode.py [--frames N] [--compression-level L] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import time

import av
import dask
from distributed import Client, LocalCluster

from gmfx.dataset import find_recordings
from gmfx.stages.decode import COMPRESSION_LEVEL, run_decode
from gmfx.storage import Location
from gmfx.testing._videos import write_bids_recording, write_video

HERE = pathlib.Path(__file__).parent
WORK = HERE / "_work"
CLIP = HERE.parent / "tests" / "data" / "single_face.mp4"


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


def gmfx_decode(
    client: Client, recordings, out: pathlib.Path, level: int, segment_frames: int | None
) -> tuple[float, float]:
    """Wall seconds of a decode run, and the CPU seconds its workers spent."""
    shutil.rmtree(out, ignore_errors=True)
    cpu = sum(client.run(time.process_time).values())
    start = time.perf_counter()
    run_decode(
        recordings, Location(str(out)), client=client, compression_level=level, segment_frames=segment_frames,
        progress=False,
    )
    return time.perf_counter() - start, sum(client.run(time.process_time).values()) - cpu


def stored_bytes(out: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "/frames/" in p.as_posix())


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
    for workers in args.workers:
        with LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster, Client(cluster) as client:
            gmfx_decode(client, warmup, WORK / "warmup_out", args.compression_level, None)
            out = WORK / f"out_{workers}"
            results[f"gmfx decode, {workers} worker{'s' * (workers > 1)}"] = min(
                gmfx_decode(client, recordings, out, args.compression_level, args.segment_frames)
                for _ in range(args.repeat)
            )
    stored_per_frame = stored_bytes(WORK / f"out_{args.workers[0]}") / n
    for workers in args.workers:
        shutil.rmtree(WORK / f"out_{workers}")  # hundreds of MB each

    baseline = results["plain PyAV loop"][0]
    print(f"video: {n} frames 640x360, {source_per_frame / 1e3:.1f} kB/frame in the source file")
    trim = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_", None)
    print(
        f"zstd level {args.compression_level}, segment frames {args.segment_frames or 'default'}, "
        f"workers' MALLOC_TRIM_THRESHOLD_ {trim}"
    )
    for name, (seconds, cpu) in results.items():
        print(
            f"{name:<26} {n / seconds:8.0f} frames/s   {baseline / seconds:5.2f}x the plain loop   "
            f"CPU {cpu / n * 1e3:.2f} ms/frame"
        )
    raw = 640 * 360 * 3
    print(
        f"stored: {stored_per_frame / 1e3:.1f} kB/frame ({raw / stored_per_frame:.2f}x smaller than raw "
        f"{raw / 1e3:.0f} kB, {stored_per_frame / source_per_frame:.0f}x the source file's)"
    )


if __name__ == "__main__":
    main()
