"""End-to-end frames/s of the whole pipeline: 1 worker vs 2 workers, local disk vs S3 (moto), in one run.

The dataset is several recordings made from the real clip ``tests/data/single_face.mp4`` (played
forwards and backwards until each has ``--frames`` frames), each with frame times and events. Every
run uses gmfx's local cluster (``gmfx.connect``), as the CLI does.

moto is a Python server: on a small machine it takes CPU from the workers that real S3 never would.
The S3 run therefore counts moto's own CPU seconds, and, on a machine of 2 cores or more, two more
runs hold everything of gmfx (client, scheduler, 1 worker) on the first core: one on local disk, one
on S3 with moto held on the second core. Their ratio is what S3 costs gmfx itself.

    python benchmarks/pipeline.py                      # 4 recordings x 1,800 frames
    python benchmarks/pipeline.py --recordings 2 --frames 300

Figures go to ``benchmarks/results/pipeline.json`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import av
import numpy as np
from _common import Report

REPO = pathlib.Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work" / "pipeline"


def clip_frames() -> list[np.ndarray]:
    with av.open(str(REPO / "tests" / "data" / "single_face.mp4")) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def make_dataset(root: pathlib.Path, recordings: int, frames: int) -> None:
    from gmfx.testing._videos import write_video

    clip = clip_frames()
    ping_pong = clip + clip[-2:0:-1]
    looped = [ping_pong[i % len(ping_pong)] for i in range(frames)]
    times = np.arange(frames) / 30.0
    for index in range(1, recordings + 1):
        folder = root / f"sub-{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"sub-{index:02d}_task-faces"
        write_video(folder / f"{name}_video.mp4", frames=looped, fps=30, width=640, height=360, keyint=60)
        (folder / f"{name}_frametimes.tsv").write_text("t\n" + "".join(f"{t:.6f}\n" for t in times))
        onsets = np.arange(1.0, max(frames / 30.0 - 2.0, 1.5), 4.0)
        (folder / f"{name}_events.tsv").write_text(
            "onset\tduration\ttrial_type\n" + "".join(f"{t:.3f}\t1.0\tcue\n" for t in onsets)
        )


def upload(folder: pathlib.Path, root) -> None:
    fs, base = root.filesystem()
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{base}/{path.relative_to(folder).as_posix()}", path.read_bytes())


@contextlib.contextmanager
def held_on(cores: list[int] | None):
    """Hold every thread of this process (and so every process it starts: the scheduler's threads, the
    workers) on ``cores`` for the block; ``None`` leaves the process as it is."""
    from gmfx._threads import hold_threads

    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    hold_threads(cores)
    try:
        yield
    finally:
        hold_threads(before)


@contextlib.contextmanager
def moto_server_process(cores: list[int] | None = None):
    """moto's S3 server in a process of its own on 127.0.0.1 (in-process, its request threads would
    share the client's GIL with the Dask scheduler, which real S3 never does), held on ``cores`` when
    given; yields its endpoint and its process (for its CPU seconds)."""
    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield endpoint, psutil.Process(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=20)


def timed_run(study, out, workers: int, cores: list[int] | None = None) -> tuple[float, float]:
    """Wall seconds of the pipeline on ``workers`` local workers (all of it held on ``cores`` when
    given), and the seconds its workers spent in tasks (from the task stream): with 1 worker, the rest
    is time the worker waited on the client (planning, templates, finalizing) and the scheduler."""
    from distributed import get_task_stream

    from gmfx import connect, find_recordings, run_pipeline

    recordings = find_recordings(study)
    for module in ("gmfx.stages.decode", "gmfx.stages.recon", "gmfx.stages.preproc", "gmfx.models.mediapipe"):
        importlib.import_module(module)  # the client's imports are not the pipeline's cost
    with held_on(cores), connect(workers=workers) as client:
        start = time.perf_counter()
        with get_task_stream(client) as stream:
            run_pipeline(recordings, out, client=client, recon_options={"device": "cpu"}, progress=False)
        seconds = time.perf_counter() - start
    busy = sum(s["stop"] - s["start"] for record in stream.data for s in record["startstops"] if s["action"] == "compute")
    return seconds, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1800)
    parser.add_argument("--skip-held", action="store_true", help="skip the two runs held on one core")
    args = parser.parse_args()

    from gmfx import Location
    from gmfx.testing import make_bucket, s3_storage_options

    shutil.rmtree(WORK, ignore_errors=True)
    study = WORK / "study"
    make_dataset(study, args.recordings, args.frames)
    total = args.recordings * args.frames
    report = Report("pipeline", args)
    report.note(f"dataset: {args.recordings} recordings x {args.frames} frames (640x360), {total} frames in all")

    results: dict[str, float] = {}
    for workers in (1, 2):
        seconds, busy = timed_run(Location(str(study)), Location(str(WORK / f"out-{workers}")), workers)
        results[f"local, {workers} worker(s)"] = total / seconds
        if workers == 1:
            waiting = seconds - busy
            report.note(f"1 worker: {busy:.1f} s in tasks, {waiting:.1f} s waiting on the client and scheduler "
                        f"({waiting / args.recordings:.2f} s per recording)")  # fmt: skip
            report.stage_cost("pipeline", "client_s_per_recording", waiting / args.recordings)
    with moto_server_process() as (endpoint, moto):
        options = s3_storage_options(endpoint)
        bucket = make_bucket(endpoint)
        s3_study = Location(f"s3://{bucket}/study", options)
        upload(study, s3_study)
        moto_cpu = sum(moto.cpu_times()[:2])
        seconds, _ = timed_run(s3_study, Location(f"s3://{bucket}/derivatives/gmfx", options), 2)
        moto_cpu = sum(moto.cpu_times()[:2]) - moto_cpu
        results["s3 (moto server process), 2 worker(s)"] = total / seconds
    report.note(f"moto's own CPU in the S3 run: {moto_cpu:.1f} s of {seconds:.1f} s wall "
                f"({moto_cpu / (seconds * len(os.sched_getaffinity(0))):.0%} of the machine's cores)")  # fmt: skip
    report.stage_cost("s3_moto", "cpu_s_per_frame", moto_cpu / total)

    two, one, s3 = results["local, 2 worker(s)"], results["local, 1 worker(s)"], results["s3 (moto server process), 2 worker(s)"]
    report.add("local, 1 worker", one, "frames/s")
    report.add("local, 2 workers", two, "frames/s", ratio=two / one, baseline="local, 1 worker", target=1.6)
    report.add("s3 (moto server process), 2 workers", s3, "frames/s", ratio=s3 / two, baseline="local, 2 workers", target=0.7)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2 and not args.skip_held:
        gmfx_cores, moto_cores = cores[:1], cores[1:]
        seconds, _ = timed_run(Location(str(study)), Location(str(WORK / "out-held")), 1, gmfx_cores)
        held_local = total / seconds
        with moto_server_process(moto_cores) as (endpoint, moto):
            options = s3_storage_options(endpoint)
            bucket = make_bucket(endpoint)
            s3_study = Location(f"s3://{bucket}/study", options)
            upload(study, s3_study)
            seconds, _ = timed_run(s3_study, Location(f"s3://{bucket}/derivatives/gmfx", options), 1, gmfx_cores)
        held_s3 = total / seconds
        report.add(f"local, 1 worker, gmfx on core {gmfx_cores}", held_local, "frames/s")
        report.add(f"s3, 1 worker, gmfx on core {gmfx_cores}, moto on {moto_cores}", held_s3, "frames/s",
                   ratio=held_s3 / held_local, baseline="local, 1 worker on the same core", target=0.7)  # fmt: skip
    report.stage_cost("pipeline_mediapipe", "wall_s_per_frame_1_worker", 1 / one)
    report.write()


if __name__ == "__main__":
    main()
