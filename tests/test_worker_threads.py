"""Workers that scale: every worker process sizes its libraries' thread pools to one core (counted, never timed)."""

import subprocess
import sys
import warnings

import pytest

import gmfx
from gmfx._threads import THREAD_VARIABLES, worker_thread_counts
from gmfx.dataset import find_recordings
from gmfx.stages.recon import run_recon
from gmfx.storage import Location
from gmfx.testing._videos import write_bids_recording, write_video


def _import_and_count():
    import cv2  # noqa: F401
    import numba  # noqa: F401

    return worker_thread_counts()


def test_local_cluster_workers_size_every_library_to_one_thread():
    """OpenCV and numba read their pool size at import (torch's intra-op pool follows OMP_NUM_THREADS)."""
    with gmfx.connect(workers=1) as client:
        [worker] = client.run(_import_and_count).values()
    assert worker["environment"] == dict.fromkeys(THREAD_VARIABLES, "1")
    assert (worker["opencv"], worker["numba"]) == (1, 1), worker


def test_gpu_worker_specs_carry_the_thread_environment():
    from gmfx.cluster import gpu_worker_specs

    for index, spec in enumerate(gpu_worker_specs(2).values()):
        assert spec["options"]["env"] == {"CUDA_VISIBLE_DEVICES": str(index), **dict.fromkeys(THREAD_VARIABLES, "1")}


def test_limit_threads_sizes_libraries_imported_before_it():
    """In a fresh process (the setters are process-wide): OpenCV's and torch's pools start at the
    machine's size and end at one thread."""
    script = (
        "import os; [os.environ.pop(v, None) for v in ('OMP_NUM_THREADS', 'OPENCV_FOR_THREADS_NUM')]\n"
        "import cv2, torch\n"
        "from gmfx._threads import limit_threads, worker_thread_counts\n"
        "before = worker_thread_counts()\n"
        "limit_threads(1)\n"
        "after = worker_thread_counts()\n"
        "print(before['opencv'], before['torch_interop'], after['opencv'], after['torch'], after['torch_interop'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    opencv_before, interop_before, *after = (int(x) for x in out)
    import os

    cores = len(os.sched_getaffinity(0))
    assert (opencv_before, interop_before) == (cores, cores)  # what the worker would have run with
    assert after == [1, 1, 1]


def test_recon_tasks_limit_threads_on_a_cluster_gmfx_did_not_start(dask_client, tmp_path):
    """Workers started without gmfx's environment (``dask worker`` by hand, a plain LocalCluster): the
    recon task itself sizes OpenCV (imported by MediaPipe) to one thread."""
    import numpy as np

    images = np.zeros((16, 64, 96, 3), np.uint8)
    video = write_video(tmp_path / "dark.mp4", frames=images)
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="dark", video=str(video))
    recordings = find_recordings(str(tmp_path / "bids"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no face in a dark video: the low-detection warning
        run_recon(recordings, Location(str(tmp_path / "out")), client=dask_client, progress=False)
    counts = dask_client.run(worker_thread_counts)
    ran_mediapipe = [c for c in counts.values() if "opencv" in c]
    assert ran_mediapipe, counts
    assert all(c["opencv"] == 1 for c in ran_mediapipe), counts
    assert all(c.get("torch_interop", 1) == 1 for c in ran_mediapipe), counts


@pytest.mark.parametrize("threads", [0, -1])
def test_thread_environment_refuses_fewer_than_one_thread(threads):
    from gmfx._threads import thread_environment

    with pytest.raises(ValueError, match="at least 1"):
        thread_environment(threads)
