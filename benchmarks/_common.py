"""What every benchmark script shares: timing a baseline and gmfx in one run, their ratios, and the
figures written as JSON beside the printout (``benchmarks/results/<name>.json``) with the machine they
were measured on, so runs on different machines can be compared (``make benchmarks`` prints them as one
table through ``benchmarks/_table.py``).

A script makes one ``Report``, adds rows as it measures, and calls ``write()`` at the end::

    report = Report("recon", args)
    plain = report.timed(lambda: baseline(...))
    report.add("plain loop", n / plain, "frames/s")
    report.add("gmfx, 2 workers", n / two, "frames/s", ratio=plain / two, baseline="plain loop", target=1.6)
    report.stage_cost("recon", "cpu_s_per_frame", cpu / n)     # read by benchmarks/capacity.py
    report.write()

Stage costs are the per-unit figures ``benchmarks/capacity.py`` projects a study from; each one is
written under ``stage_costs[stage][key]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: the real face clip every benchmark video is made from
CLIP = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "single_face.mp4"
PACKAGES = (
    "gmfx", "numpy", "scipy", "xarray", "zarr", "numcodecs", "dask", "distributed", "fsspec", "s3fs", "av",
    "mediapipe", "opencv-contrib-python", "torch", "numba", "moto",
)  # fmt: skip


def clip_frames() -> Any:
    """Every frame of :data:`CLIP`, RGB ``(n, 360, 640, 3)`` uint8."""
    import av
    import numpy as np

    with av.open(str(CLIP)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


class LoopedFrames:
    """``frames`` repeated to ``n`` frames, without holding ``n`` frames in memory (for ``write_video``)."""

    def __init__(self, frames: Any, n: int) -> None:
        self.frames, self.n = frames, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.frames[i % len(self.frames)]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """Names and memory of the GPUs ``nvidia-smi`` sees (empty without one; CUDA is never initialised here)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def versions() -> dict[str, str]:
    """Installed versions of the packages that set the figures (without importing them)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=pathlib.Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    """Where the figures were measured: host, cores (all and usable by this process), CPU, memory, GPUs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": memory,
        "load_1min_at_start": load, "gpus": gpus(),
    }  # fmt: skip


class Report:
    """The figures of one benchmark run: rows (case, value, unit, ratio to a baseline, target) and the
    stage costs, printed as they come and written to ``benchmarks/results/<name>.json`` by ``write``."""

    def __init__(self, name: str, arguments: argparse.Namespace | dict[str, Any] | None = None) -> None:
        self.name = name
        self.arguments = dict(vars(arguments) if isinstance(arguments, argparse.Namespace) else arguments or {})
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.machine = machine()
        self.rows: list[dict[str, Any]] = []
        self.stage_costs: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []

    @staticmethod
    def timed(function: Callable[[], Any]) -> float:
        """Wall seconds of one call."""
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    def add(
        self, case: str, value: float, unit: str, *, ratio: float | None = None, baseline: str | None = None,
        target: float | None = None, echo: bool = True, **extra: Any,
    ) -> None:  # fmt: skip
        """One measured figure; ``ratio`` is gmfx against ``baseline`` (above 1: gmfx better), ``target``
        the ratio the issue asks for."""
        row = {"case": case, "value": value, "unit": unit, "ratio": ratio, "baseline": baseline, "target": target, **extra}
        self.rows.append(row)
        if echo:
            text = f"{case:42s} {value:12.4g} {unit}"
            if ratio is not None:
                text += f"   {ratio:.2f}x {baseline or 'baseline'}"
                if target is not None:
                    text += f" (target >= {target:g}x{'' if ratio >= target else ', missed'})"
            print(text, flush=True)

    def stage_cost(self, stage: str, key: str, value: float) -> None:
        """A per-unit cost ``benchmarks/capacity.py`` projects from (e.g. ``decode``/``cpu_s_per_frame``)."""
        self.stage_costs.setdefault(stage, {})[key] = float(value)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text, flush=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name, "started": self.started.isoformat(timespec="seconds"),
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - self.started).total_seconds(), 1),
            "command": [pathlib.Path(sys.argv[0]).name, *sys.argv[1:]], "arguments": self.arguments,
            "git_commit": git_commit(), "machine": self.machine, "versions": versions(),
            "rows": self.rows, "stage_costs": self.stage_costs, "notes": self.notes,
        }  # fmt: skip

    def write(self, folder: pathlib.Path | None = None) -> pathlib.Path:
        """Write the JSON (atomically: a run that fails before this leaves the previous file as it was)."""
        folder = folder or RESULTS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.as_dict(), indent=1, default=str) + "\n")
        partial.replace(path)
        print(f"figures written to {path}", flush=True)
        return path


def load_results(folder: pathlib.Path | None = None) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in the results folder, by benchmark name."""
    folder = folder or RESULTS
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
