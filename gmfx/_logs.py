"""What the command line prints: quiet by default (progress, warnings that matter, summary), everything with ``--verbose``.

Measured on the example (``gmfx example DEST && gmfx run DEST``, 2 workers): 44 lines on stderr besides the
progress bars before (31 Dask INFO lines, 4 MediaPipe/TensorFlow Lite native log lines, 2 protobuf deprecation
lines), none after.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

#: native log lines of the model libraries that say nothing to a user: absl/glog info and warning lines
#: (``I0000 00:00:...`` / ``W0000 ...``; errors ``E`` and ``F`` are kept), TensorFlow Lite's delegate notice and
#: absl's note that its logging is not initialised
NATIVE_NOISE = re.compile(
    rb"^(?:[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\]"
    rb"|INFO: Created TensorFlow Lite"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)
#: (category, module) of deprecations raised inside third-party libraries, not by the user's code
LIBRARY_DEPRECATIONS = (("UserWarning", "google.protobuf.symbol_database"),)


@contextlib.contextmanager
def python_logs(verbose: bool) -> Iterator[None]:
    """Log records and warnings of this process: Dask's INFO lines and library deprecations only when ``verbose``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        yield
        return
    handlers = logging.getLogger().handlers
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(logging.WARNING)  # Dask sets its own loggers to INFO: the cluster's start and stop, ~30 lines
    try:
        with warnings.catch_warnings():
            for category, module in LIBRARY_DEPRECATIONS:
                warnings.filterwarnings("ignore", category=getattr(builtins, category), module=re.escape(module))
            yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


@contextlib.contextmanager
def filtered_child_stderr(verbose: bool) -> Iterator[Callable[[], None]]:
    """Processes started before the yielded ``started()`` is called (the local cluster's workers) write their stderr
    through a filter that drops :data:`NATIVE_NOISE` and ignores :data:`LIBRARY_DEPRECATIONS`; this process is back
    on its own stderr once ``started()`` returns (so progress bars still see the terminal). Everything passes when
    ``verbose``. On leaving, waits (at most 10 s) until the children's last lines are written."""
    if verbose:
        yield lambda: None
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    previous = os.environ.get("PYTHONWARNINGS")
    filters = ",".join(f"ignore::{category}:{module}" for category, module in LIBRARY_DEPRECATIONS)
    os.environ["PYTHONWARNINGS"] = f"{previous},{filters}" if previous else filters
    forwarder = threading.Thread(target=_forward, args=(read_end, terminal), name="gmfx-stderr-filter", daemon=True)
    forwarder.start()
    restored = False

    def started() -> None:
        nonlocal restored
        if not restored:
            sys.stderr.flush()
            os.dup2(terminal, 2)  # the children keep the pipe; this process writes to the terminal again
            if previous is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = previous
            restored = True

    try:
        yield started
    finally:
        started()
        forwarder.join(timeout=10)  # ends when the last child closed the pipe


def _forward(read_end: int, terminal: int) -> None:
    """Copy whole lines from ``read_end`` to ``terminal`` except native noise, until every writer has closed."""
    pending = b""
    try:
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_NOISE.match(line))
            if kept:
                os.write(terminal, kept)
        if pending and not NATIVE_NOISE.match(pending):
            os.write(terminal, pending)
    finally:
        os.close(read_end)
        os.close(terminal)
