"""Small typed descriptions shared by planning and execution."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Stage", "Region", "Task", "split_regions"]


@dataclass(frozen=True)
class Stage:
    """What a stage reads and writes, and where it must run.

    Attributes
    ----------
    name
        ``decode``, ``recon``, ...
    reads, writes
        Store kinds (``frames``, ``recon``, ...) read and written per recording.
    requires_gpu
        Tasks must run on a worker that offers the ``GPU`` resource.
    """

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    requires_gpu: bool = False


@dataclass(frozen=True)
class Region:
    """A half-open slice ``[start, stop)`` of the time axis that one task writes."""

    index: int
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Task:
    """One unit of work for the cluster: ``function(*args)`` under a deterministic ``key``."""

    key: str
    function: Callable[..., Any]
    args: tuple = ()
    resources: Mapping[str, float] | None = field(default=None)
    weight: int = 1  # e.g. frames, for progress display


def split_regions(length: int, chunk: int, chunks_per_region: int = 1) -> list[Region]:
    """Cut ``range(length)`` into regions made of whole chunks of size ``chunk``."""
    if length < 0 or chunk < 1 or chunks_per_region < 1:
        raise ValueError(f"bad split: length={length}, chunk={chunk}, chunks_per_region={chunks_per_region}")
    step = chunk * chunks_per_region
    return [Region(i, start, min(start + step, length)) for i, start in enumerate(range(0, length, step))]
