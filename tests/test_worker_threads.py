"""Workers that scale: every worker process sizes its libraries' thread pools to its own cores, and a
local cluster's workers each run on their own cores (counted, never timed)."""

import os
import subprocess
import sys
import threading
import warnings

import pytest

import gmfx
from gmfx._threads import CORES_VARIABLE, THREAD_VARIABLES, core_sets, worker_thread_counts
from gmfx.dataset import find_recordings
from gmfx.stages.recon import run_recon
from gmfx.storage import Location
from gmfx.testing._videos import write_bids_recording, write_video


def _import_and_count():
    import cv2  # noqa: F401
    import numba  # noqa: F401

    return worker_thread_counts()


def _cores_of_a_new_thread():
    """The cores of a thread started inside a task (as a decoder or MediaPipe starts its own)."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
    thread.start()
    thread.join()
    return seen[0]


def test_a_lone_local_worker_keeps_every_core_and_sizes_its_libraries_to_them():
    """OpenCV and numba read their pool size at import (torch's intra-op pool follows OMP_NUM_THREADS)."""
    cores = sorted(os.sched_getaffinity(0))
    with gmfx.connect(workers=1) as client:
        [worker] = client.run(_import_and_count).values()
    assert worker["environment"] == dict.fromkeys((*THREAD_VARIABLES, CORES_VARIABLE), str(len(cores)))
    assert (worker["opencv"], worker["numba"]) == (len(cores), len(cores)), worker
    assert worker["cores"] == cores


def test_local_workers_each_run_on_their_own_cores():
    """Two workers on this machine's cores: each holds its half (one core each on a 2-core box), every
    thread it starts later too, and sizes its libraries and gmfx's own threads to it."""
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2
    expected = [cores[:half], cores[half:]] if half else [cores, cores]
    with gmfx.connect(workers=2) as client:
        counts = client.run(_import_and_count)
        new_threads = client.run(_cores_of_a_new_thread)
        names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
    by_name = {names[address]: c for address, c in counts.items()}
    assert [by_name[0]["cores"], by_name[1]["cores"]] == expected, by_name
    assert [new_threads[a] for a in sorted(names, key=names.get)] == expected
    for index in (0, 1):
        threads = str(len(expected[index]))
        assert by_name[index]["environment"] == dict.fromkeys((*THREAD_VARIABLES, CORES_VARIABLE), threads)
        assert by_name[index]["opencv"] == len(expected[index])


@pytest.mark.parametrize("n_cores, workers", [(8, 3), (8, 8), (2, 2), (2, 5), (6, 1), (1, 2), (7, 4)])
def test_core_sets_split_the_cores_into_even_disjoint_runs(n_cores, workers):
    """Against the arithmetic written out here: runs of consecutive cores whose sizes differ by at
    most one and cover every core; with more workers than cores, worker i shares core i mod n."""
    cores = [10 + 2 * c for c in range(n_cores)]  # any core numbers, not 0..n-1
    sets = core_sets(cores, workers)
    assert len(sets) == workers
    if workers >= n_cores:
        assert sets == [[cores[i % n_cores]] for i in range(workers)]
        return
    assert [c for s in sets for c in s] == cores  # in order, disjoint, all of them
    sizes = [len(s) for s in sets]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_gpu_worker_specs_carry_the_thread_environment():
    from gmfx.cluster import gpu_worker_specs

    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for index, spec in enumerate(gpu_worker_specs(2).values()):
        assert spec["options"]["env"] == {
            "CUDA_VISIBLE_DEVICES": str(index), **dict.fromkeys((*THREAD_VARIABLES, CORES_VARIABLE), share)
        }


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
