"""The cores of a worker: the thread pools of the numerical libraries inside gmfx's worker processes,
and which cores a local cluster's workers run on.

A worker process runs one task per Dask thread. Each library below otherwise sizes its own pool to
every core of the machine, in every worker process: on this 2-core box, 2 workers imported OpenCV with
2 threads each, numba's threading layer was sized to 2, and torch's inter-op pool to 2 (measured with
``worker_thread_counts`` below), and a 64-core node with 64 workers would hold 64 x 64 threads per
library. Dask's nanny already sets the BLAS/OpenMP variables (``OMP_NUM_THREADS=1``...) before it
spawns a worker; gmfx sizes every pool to the cores of one Dask thread, ``GMFX_CORES_PER_THREAD``
(:func:`task_threads`; 1 on workers gmfx did not start):

* before a worker starts (``connect``'s local clusters, GPU worker specs): :func:`thread_environment`
  for the libraries that read their size at import;
* when a local cluster's worker starts (the preload :mod:`gmfx._worker_setup`): :func:`place_worker`
  gives it its own cores (:func:`core_sets`) and sizes ``GMFX_CORES_PER_THREAD`` to them;
* in every task that runs a model or decodes (any cluster, also ``dask worker`` started by hand):
  :func:`limit_threads` for the libraries already imported, through their own setters.

Measured on this 2-core box (``benchmarks/recon.py``): MediaPipe's face mesh costs 3.8 ms of CPU a frame
in a process held on one core and 4.9 ms in one free to move (its graph's threads hand frames to each
other across cores); 2 recon workers went from 195 to 255 frames/s once each held its own core. A lone
worker keeps every core: decode then compresses on 2 threads while it decodes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CORES_VARIABLE", "LOCAL_WORKERS_VARIABLE", "THREAD_VARIABLES", "core_sets", "hold_threads", "limit_threads",
    "place_worker", "task_threads", "thread_environment", "usable_cores", "worker_thread_counts",
]  # fmt: skip

#: variables read at import by OpenMP (torch's intra-op pool), MKL, OpenBLAS, Apple's vecLib, numexpr,
#: numba's threading layer and OpenCV's parallel_for pool
THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS", "OPENCV_FOR_THREADS_NUM",
)  # fmt: skip
#: the cores one Dask thread of this worker may keep busy (decoder and compression threads, model pools)
CORES_VARIABLE = "GMFX_CORES_PER_THREAD"
#: set by :func:`gmfx.connect` on its local workers: how many share the machine (:func:`place_worker`)
LOCAL_WORKERS_VARIABLE = "GMFX_LOCAL_WORKERS"


def thread_environment(threads: int = 1) -> dict[str, str]:
    """Environment variables that size every library's pool, and gmfx's own, to ``threads`` in a process
    started with them."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    return dict.fromkeys((*THREAD_VARIABLES, CORES_VARIABLE), str(threads))


def task_threads() -> int:
    """Threads a task may keep busy: ``GMFX_CORES_PER_THREAD``, 1 where it is unset or not a positive number."""
    try:
        return max(1, int(os.environ.get(CORES_VARIABLE, "1")))
    except ValueError:
        return 1


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_sets(cores: list[int], workers: int) -> list[list[int]]:
    """The cores of each of ``workers`` local workers: disjoint runs of ``cores`` as even as they split
    (one worker keeps them all); with more workers than cores, worker ``i`` shares core ``i mod n``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    bounds = [len(cores) * i // workers for i in range(workers + 1)]
    return [cores[bounds[i] : bounds[i + 1]] for i in range(workers)]


def hold_threads(cores: Iterable[int]) -> None:
    """Hold every thread of this process on ``cores`` (and so every thread they start later; Linux:
    ``os.sched_setaffinity`` of one thread applies to that thread only)."""
    cores = set(cores)
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except OSError:  # a thread that ended meanwhile
            pass


def place_worker(index: int, workers: int, threads_per_worker: int = 1) -> list[int]:
    """Hold this process (all its threads, and so every thread they start) on local worker ``index``'s
    cores out of :func:`core_sets`, and size ``GMFX_CORES_PER_THREAD`` and the libraries' variables to
    them; return the cores. Where the OS cannot pin threads (macOS), only the sizes are set."""
    cores = core_sets(usable_cores(), workers)[index % workers]
    if hasattr(os, "sched_setaffinity") and workers > 1:
        hold_threads(cores)
    os.environ.update(thread_environment(max(1, len(cores) // threads_per_worker)))
    return cores


_limited: set[str] = set()
_lock = threading.Lock()


def limit_threads(threads: int | None = None) -> None:
    """Size the pools of the libraries this process has imported to ``threads`` (default
    :func:`task_threads`; cheap after the first call for each library); libraries imported later read
    :func:`thread_environment`'s variables.

    numba's pool is left to ``NUMBA_NUM_THREADS``: its setter would start the threading layer that
    gmfx's kernels never use (none is ``parallel=True``)."""
    threads = task_threads() if threads is None else threads
    with _lock:
        for name, value in thread_environment(threads).items():
            os.environ.setdefault(name, value)
        modules = sys.modules
        if "cv2" in modules and "cv2" not in _limited:
            modules["cv2"].setNumThreads(threads)
            _limited.add("cv2")
        torch = modules.get("torch")
        if torch is not None and hasattr(torch, "set_num_threads"):
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if "torch-interop" not in _limited:
                try:  # allowed once per process, before any inter-op work
                    torch.set_num_interop_threads(threads)
                except RuntimeError:
                    pass
                _limited.add("torch-interop")


def worker_thread_counts() -> dict[str, Any]:
    """The pool sizes of the libraries this process has imported, and its OS thread count (for tests
    and benchmarks: run it on every worker with ``client.run``)."""
    import psutil

    counts: dict[str, Any] = {"os_threads": psutil.Process().num_threads()}
    modules = sys.modules
    if "cv2" in modules:
        counts["opencv"] = modules["cv2"].getNumThreads()
    if "torch" in modules and hasattr(modules["torch"], "get_num_threads"):
        counts["torch"] = modules["torch"].get_num_threads()
        counts["torch_interop"] = modules["torch"].get_num_interop_threads()
    if "numba" in modules:
        counts["numba"] = modules["numba"].config.NUMBA_NUM_THREADS
    counts["environment"] = {name: os.environ.get(name) for name in (*THREAD_VARIABLES, CORES_VARIABLE)}
    counts["cores"] = usable_cores()
    return counts
