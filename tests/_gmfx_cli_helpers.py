"""Helpers for tests that run the ``gmfx`` command in subprocesses: plugins installed the way a lab's
package installs them (entry points of a distribution on the path), small datasets, the task stream."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from gmfx.testing import write_bids_recording, write_video

#: a filesystem whose errors echo its storage options (a careless driver), for redaction tests
_ECHO_MODULE = '''
from gmfx.testing._flaky import LocalFilesUnderProtocol


class EchoFileSystem(LocalFilesUnderProtocol):
    """Local files behind echo:// whose chunk writes fail with an error that quotes the storage options."""

    protocol = ("echo",)

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if "_plane/c/" not in path:  # metadata and coordinates are written; frames (their planes) are not
            return super().pipe_file(path, value, mode=mode, **kwargs)
        raise {error}(f"cannot write {{path}} with options {{self.options!r}}")
'''


def plugin_site(folder: pathlib.Path, *, echo_error: str = "PermissionError") -> dict[str, str]:
    """A folder holding a distribution that declares the test backends (``gmfx.models``) and the
    ``echo://`` filesystem (``fsspec.specs``); return the environment for subprocesses that sees it."""
    folder.mkdir(parents=True, exist_ok=True)
    module = f"gmfx_test_plugins_{echo_error.lower()}"  # one module per error kind: processes cache modules
    (folder / f"{module}.py").write_text(_ECHO_MODULE.format(error=echo_error))
    info = folder / "gmfx_test_plugins-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gmfx-test-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[gmfx.models]\n"
        "bright-square = gmfx.testing:BrightSquareBackend\n"
        "bright-square-gpu = gmfx.testing:GpuBrightSquareBackend\n"
        "[fsspec.specs]\n"
        f"echo = {module}:EchoFileSystem\n"
    )
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def gmfx_command(name: str = "gmfx") -> str:
    """The installed ``gmfx`` (or ``gmfx_<step>`` alias) next to this Python."""
    return str(pathlib.Path(sys.executable).parent / name)


def run(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def square_dataset(root: pathlib.Path, n_frames: int = 80, fps: int = 25) -> pathlib.Path:
    """A BIDS-like dataset of one recording: a bright square moving over black (every 5th frame
    black; one track), with events; the bright-square backends find the square."""
    images = np.zeros((n_frames, 64, 96, 3), np.uint8)
    for i in range(n_frames):
        if i % 5:
            images[i, 10 + i // 4 : 30 + i // 4, 20 + i // 3 : 50 + i // 3] = 220
    video = write_video(root / "square.mp4", frames=images, fps=fps)
    events = pd.DataFrame({"onset": [0.8, 1.6, 2.2], "duration": [0.2, 0.2, 0.2], "trial_type": ["a", "b", "a"]})
    write_bids_recording(root / "study", subject="01", task="square", video=str(video.url), events=events)
    return root / "study"


def task_stream_start(client) -> float:
    """Make the scheduler record its task stream from now on; return the time to read it from."""
    client.get_task_stream(count=1)  # installs the scheduler's task-stream plugin
    time.sleep(0.05)
    return time.time()


def placements(client, start: float, prefix: str) -> dict[str, set[str]]:
    """Worker address -> keys of the tasks starting with ``prefix`` that finished there since ``start``."""
    found: dict[str, set[str]] = {}
    for record in client.get_task_stream(start=start):
        key = str(record["key"])
        if key.startswith(prefix) and record.get("status", "OK") == "OK":
            found.setdefault(record["worker"], set()).add(key)
    return found
