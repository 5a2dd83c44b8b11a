"""Small typed descriptions shared by planning and execution."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["STAGES", "Stage", "Region", "Task", "split_regions"]


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: the store it writes per recording, what it reads, and where it runs.

    Attributes
    ----------
    name
        ``decode``, ``recon``, ... (the command's name)
    suffix
        Its store per recording: ``<out>/sub-XX/[ses-YY/]<recording>_<suffix>.zarr``.
    reads
        The stage whose store it reads (``None``: the videos).
    gpu
        ``"model"``: its tasks need a worker offering the ``GPU`` resource when the reconstruction model
        runs on a GPU; ``"never"``: any worker.
    """

    name: str
    suffix: str
    reads: str | None
    gpu: Literal["never", "model"] = "never"


#: every stage, by name: the one table of store suffixes, inputs and GPU needs
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("decode", "frames", reads=None),
        Stage("recon", "recon", reads="decode", gpu="model"),
        Stage("preproc", "preproc", reads="recon"),  # align -> interpolate -> filter in one graph
        Stage("epoch", "epochs", reads="preproc"),  # and the recording's _events.tsv
        # the single steps, as in the original tool (gmfx_align -> gmfx_interpolate -> gmfx_filter)
        Stage("align", "aligned", reads="recon"),
        Stage("interpolate", "interpolated", reads="align"),
        Stage("filter", "filtered", reads="interpolate"),
    )
}


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
