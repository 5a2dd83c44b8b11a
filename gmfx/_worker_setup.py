"""Preloaded into each worker of gmfx's local clusters (:func:`gmfx.connect`).

* Ctrl-C belongs to the ``gmfx`` command, not its workers: a terminal's Ctrl-C reaches every process of
  the foreground job, and without this each worker process ends with its own ``KeyboardInterrupt``
  traceback while the command is already closing the cluster (which stops the workers) and printing
  its one line.
* Each worker runs on its own cores (:func:`gmfx._threads.place_worker`), told how many workers share
  the machine by ``GMFX_LOCAL_WORKERS``; its name (0..n-1) picks its cores, so a restarted worker gets
  the same ones.
"""

from __future__ import annotations

import os
import signal
import threading

from gmfx._threads import LOCAL_WORKERS_VARIABLE, place_worker


def dask_setup(worker) -> None:
    if threading.current_thread() is threading.main_thread():  # a worker process's loop runs in its main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    workers = os.environ.get(LOCAL_WORKERS_VARIABLE)
    if workers is not None and isinstance(worker.name, int):
        place_worker(worker.name, int(workers), worker.state.nthreads)
