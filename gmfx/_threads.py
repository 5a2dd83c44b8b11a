"""One core per Dask thread: the thread pools of the numerical libraries inside gmfx's worker processes.

A worker process runs one task per Dask thread, and a local cluster starts one single-threaded worker
per core. Each library below otherwise sizes its own pool to every core of the machine, in every worker
process: on this 2-core box, 2 workers imported OpenCV with 2 threads each, numba's threading layer was
sized to 2, and torch's inter-op pool to 2 (measured with ``worker_thread_counts`` below), and a 64-core
node with 64 workers would hold 64 x 64 threads per library. Dask's nanny already sets the BLAS/OpenMP
variables (``OMP_NUM_THREADS=1``...) before it spawns a worker; gmfx adds the rest:

* before a worker starts (``connect``'s local clusters, GPU worker specs): :func:`thread_environment`
  for the libraries that read their size at import;
* in every task that runs a model (any cluster, also ``dask worker`` started by hand):
  :func:`limit_threads` for the libraries already imported, through their own setters.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["THREAD_VARIABLES", "limit_threads", "thread_environment", "worker_thread_counts"]

#: variables read at import by OpenMP (torch's intra-op pool), MKL, OpenBLAS, Apple's vecLib, numexpr,
#: numba's threading layer and OpenCV's parallel_for pool
THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS", "OPENCV_FOR_THREADS_NUM",
)  # fmt: skip


def thread_environment(threads: int = 1) -> dict[str, str]:
    """Environment variables that size every library's pool to ``threads`` in a process started with them."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    return dict.fromkeys(THREAD_VARIABLES, str(threads))


_limited: set[str] = set()
_lock = threading.Lock()


def limit_threads(threads: int = 1) -> None:
    """Size the pools of the libraries this process has imported to ``threads`` (cheap after the first
    call for each library); libraries imported later read :func:`thread_environment`'s variables.

    numba's pool is left to ``NUMBA_NUM_THREADS``: its setter would start the threading layer that
    gmfx's kernels never use (none is ``parallel=True``)."""
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
    counts["environment"] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    return counts
