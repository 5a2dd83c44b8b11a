"""Preloaded into each local cluster worker: Ctrl-C belongs to the ``gmfx`` command, not its workers.

A terminal's Ctrl-C reaches every process of the foreground job. Without this, each worker process
ends with its own ``KeyboardInterrupt`` traceback while the command is already closing the cluster
(which stops the workers) and printing its one line."""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # noqa: ARG001 - the preload protocol passes the worker
    if threading.current_thread() is threading.main_thread():  # a worker process's loop runs in its main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
