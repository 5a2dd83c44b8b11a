"""What recon's frame reads cost: zarr-python against gmfx's ShardReader, local disk and S3 (moto), one run.

Decodes ``--frames`` frames of the 640x360 clip (tests/data/single_face.mp4 looped) into a frames store
with ``gmfx.stages.decode.run_decode`` (YUV 4:2:0 planes, zstd shards), then reads it all back in
``--batch``-frame reads, as recon's tasks do (``FrameReader``), the planes only (the RGB conversion is the
same either way):

* zarr: ``[plane[start:stop] for plane in reader.arrays]`` (zarr-python's sharding codec);
* gmfx: ``ShardReader(reader.arrays, store).read(start, stop)``, a fresh reader per pass (a task's).

For each: process CPU ms per frame (every thread, zarr's and s3fs's event loops included) and wall ms
per frame, best of ``--repeats`` passes, and on S3 the GETs per frame (counted in a separate pass through
``gmfx.testing.ThrottlingProxy``, so that the proxy's threads do not load the timed passes). moto's server
runs in a process of its own. Run: ``python benchmarks/frames_read.py [--frames N] [--batch B]
[--repeats R] [--no-s3]``; the defaults take about a minute.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
from collections.abc import Callable

import numpy as np
from _common import LoopedFrames, Report, clip_frames
from pipeline import moto_server_process, upload

from gmfx import Location, find_recordings
from gmfx.stages.decode import FrameReader, run_decode
from gmfx.storage import store_location
from gmfx.storage._shards import ShardReader
from gmfx.testing import ThrottlingProxy, make_bucket, s3_storage_options
from gmfx.testing._videos import write_bids_recording, write_video


def readers(store: Location) -> dict[str, Callable[[], Callable[[int, int], list[np.ndarray]]]]:
    """Per case, a factory of one pass's read function (``(start, stop) -> planes``)."""

    def zarr_pass() -> Callable[[int, int], list[np.ndarray]]:
        arrays = FrameReader(store).arrays
        return lambda start, stop: [array[start:stop] for array in arrays]

    def gmfx_pass() -> Callable[[int, int], list[np.ndarray]]:
        return ShardReader(FrameReader(store).arrays, store).read

    return {"zarr": zarr_pass, "gmfx ShardReader": gmfx_pass}


def one_pass(read: Callable[[int, int], list[np.ndarray]], n: int, batch: int) -> tuple[float, float]:
    """CPU and wall seconds to read frames ``[0, n)`` in ``batch``-frame reads."""
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, n, batch):
        read(start, min(start + batch, n))
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(report: Report, where: str, store: Location, n: int, batch: int, repeats: int) -> None:
    """Best-of-``repeats`` CPU and wall ms per frame of each case, both checked against each other first."""
    cases = readers(store)
    first, second = (factory()(0, min(batch, n)) for factory in cases.values())
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), "the readers disagree"
    baseline: tuple[float, float] | None = None
    for case, factory in cases.items():
        passes = [one_pass(factory(), n, batch) for _ in range(repeats)]
        cpu, wall = min(p[0] for p in passes), min(p[1] for p in passes)
        ratios = {} if baseline is None else {"cpu": baseline[0] / cpu, "wall": baseline[1] / wall}
        for kind, seconds, unit in (("cpu", cpu, "CPU ms/frame"), ("wall", wall, "wall ms/frame")):
            extra = {"ratio": ratios[kind], "baseline": f"zarr, {where}"} if ratios else {}
            report.add(f"{case}, {where}" + (", wall" if kind == "wall" else ""), 1000 * seconds / n, unit, **extra)
        baseline = baseline or (cpu, wall)


def count_gets(report: Report, endpoint: str, store_url: str, n: int, batch: int) -> None:
    """GETs of shards per frame of each case, through a counting proxy (one pass each)."""
    counts = {}
    for case in readers(Location(store_url)):
        with ThrottlingProxy(endpoint, {r"^GET .*_frames\.zarr/[yuv]_plane/c/": 0}) as proxy:
            store = Location(store_url, s3_storage_options(proxy.endpoint))
            one_pass(readers(store)[case](), n, batch)
        counts[case] = sum(proxy.passed.values())
        extra = {} if case == "zarr" else {"ratio": counts["zarr"] / counts[case], "baseline": "zarr, s3"}
        report.add(f"{case}, s3 requests", counts[case] / n, "GETs/frame", **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=480, help="frames in the store (640x360)")
    parser.add_argument("--batch", type=int, default=16, help="frames per read (recon's batch)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per case (the best is kept)")
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    args = parser.parse_args()
    report = Report("frames_read", args)
    report.note(f"{args.frames} frames 640x360 (YUV 4:2:0 planes, zstd shards), {args.batch}-frame reads")
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        video = write_video(root / "looped.mp4", frames=LoopedFrames(clip_frames(), args.frames))
        write_bids_recording(str(root / "bids"), subject="01", task="bench", video=str(video))
        (recording,) = find_recordings(str(root / "bids"))
        out = Location(str(root / "out"))
        run_decode([recording], out, client=None, progress=False)
        store = store_location(out, recording, "decode")
        measure(report, "local", store, args.frames, args.batch, args.repeats)
        if not args.no_s3:
            with moto_server_process() as (endpoint, _):
                s3_out = Location(f"s3://{make_bucket(endpoint)}/out", s3_storage_options(endpoint))
                upload(root / "out", s3_out)
                s3_store = store_location(s3_out, recording, "decode")
                measure(report, "s3", s3_store, args.frames, args.batch, args.repeats)
                count_gets(report, endpoint, s3_store.url, args.frames, args.batch)
    report.write()


if __name__ == "__main__":
    main()
