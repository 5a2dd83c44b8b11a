import os
import pathlib
import uuid

import pytest

from gmfx.storage import Location
from gmfx.testing import local_s3_server, make_bucket, s3_storage_options

DATA = pathlib.Path(__file__).parent / "data"

# Keep the suite offline, quiet and single-threaded per worker process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def single_face_frames(data_dir):
    """Every frame of ``single_face.mp4`` (72, 360x640 RGB), decoded once a session; tests take copies."""
    import av
    import numpy as np

    with av.open(str(data_dir / "single_face.mp4")) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, shared by the whole session."""
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_root(s3_endpoint) -> Location:
    """A fresh bucket on the local S3 server."""
    bucket = make_bucket(s3_endpoint)
    return Location(f"s3://{bucket}", s3_storage_options(s3_endpoint))


@pytest.fixture(params=["local", "memory", "s3"])
def any_root(request, tmp_path) -> Location:
    """A fresh output root on each kind of storage (conformance tests run on all three)."""
    if request.param == "local":
        return Location(str(tmp_path / "out"))
    if request.param == "memory":
        return Location(f"memory://gmfx-{uuid.uuid4().hex[:12]}")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def dask_client():
    """A real local distributed cluster with two single-threaded worker processes.

    It is not made the default scheduler: lazy reads in tests (e.g. of per-process ``memory://``
    stores) keep running in the test process unless a test passes this client explicitly.
    """
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


@pytest.fixture(scope="session")
def cli_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes started from the command line on 127.0.0.1;
    the first worker offers the resource GPU=1. Yields the scheduler address."""
    import json
    import subprocess
    import sys
    import time

    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--host", "127.0.0.1", "--no-dashboard"]
    processes = [
        subprocess.Popen([*dask, "--scheduler-file", str(scheduler_file), "--port", "0", *common], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for extra in (["--resources", "GPU=1", "--name", "gpu-worker"], ["--name", "cpu-worker"]):
            processes.append(
                subprocess.Popen([*worker, address, "--nworkers", "1", "--nthreads", "1", *common, *extra],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def astronaut_recon(tmp_path_factory, dask_client):
    """A real face with known head motion: ``astronaut_recon(n_frames, max_angle, max_shift)`` writes the
    astronaut photo turning up to ``max_angle`` degrees and moving up to ``max_shift`` pixels as a video,
    decodes and reconstructs it with MediaPipe through gmfx on ``dask_client``, and returns
    ``(recordings, out, motion)`` (once per set of arguments). Tests may write beside the stores, never over them."""
    pytest.importorskip("skimage")
    import gmfx
    from gmfx.testing import astronaut_motion, write_bids_recording, write_video

    made: dict[tuple, tuple] = {}

    def make(n_frames: int, max_angle: float, max_shift: float) -> tuple:
        key = (n_frames, max_angle, max_shift)
        if key not in made:
            root = tmp_path_factory.mktemp("astronaut")
            motion = astronaut_motion(n_frames, max_angle=max_angle, max_shift=max_shift)
            video = write_video(root / "astronaut.mp4", frames=motion.frames, crf=12)
            write_bids_recording(str(root / "bids"), subject="01", task="faces", video=str(video))
            recordings = gmfx.find_recordings(str(root / "bids"))
            out = Location(str(root / "out"))
            gmfx.run_recon(recordings, out, client=dask_client, device="cpu", progress=False)
            made[key] = (recordings, out, motion)
        return made[key]

    return make
