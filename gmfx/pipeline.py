"""The whole pipeline over a dataset: decode -> recon -> preproc (align, interpolate, filter) -> epochs.

Each stage runs all selected recordings as one submission to the cluster (recordings in parallel, each
task bounded to one time segment), resumes from completion markers, and finalizes its stores before the
next stage starts reading them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client

from gmfx._checks import check_options
from gmfx._errors import StorageError
from gmfx._execute import one_display
from gmfx.dataset import Recording
from gmfx.types import STAGES
from gmfx.storage import Location, LocationLike, RegionStore, as_location, open_dataset, store_location

__all__ = ["RecordingSummary", "run_pipeline", "run_step"]


@dataclass(frozen=True)
class RecordingSummary:
    """What the pipeline produced for one recording."""

    recording: str
    frames: int
    detected_fraction: float
    outputs: Mapping[str, str] = field(default_factory=dict)


def run_pipeline(
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client,
    decode_options: Mapping[str, Any] | None = None,
    recon_options: Mapping[str, Any] | None = None,
    preproc_options: Mapping[str, Any] | None = None,
    epoch_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[list[RecordingSummary], dict[str, float]]:
    """Run every stage for ``recordings``; return a summary per recording and seconds per stage.

    Epochs are cut for the recordings that have an ``_events.tsv``. ``out`` is a path, URL (with
    ``storage_options``) or :class:`Location`.
    """
    from gmfx import preproc as gmfx_preproc
    from gmfx.preproc import epoch
    from gmfx.stages.decode import run_decode
    from gmfx.stages.preproc import run_epochs, run_preproc
    from gmfx.stages.recon import run_recon

    out = as_location(out, storage_options, where="out")
    for name, options, target in (
        ("decode_options", decode_options, run_decode),
        ("recon_options", recon_options, run_recon),
        ("preproc_options", preproc_options, run_preproc),
        ("epoch_options", epoch_options, epoch),
    ):
        check_options(options, target, function="run_pipeline", name=name)
    for step, value in dict(preproc_options or {}).items():
        if isinstance(value, Mapping):  # the steps' own options, before any stage runs
            check_options(value, getattr(gmfx_preproc, step), function="run_pipeline", name=f"preproc_options[{step!r}]")

    timings: dict[str, float] = {}

    def timed(name: str, function, selected, options) -> None:
        if not selected:
            return
        start = time.perf_counter()
        function(selected, out, client=client, overwrite=overwrite, progress=progress, **dict(options or {}))
        timings[name] = time.perf_counter() - start

    with one_display(enabled=progress):  # one display for the whole run, a row per stage
        timed("decode", run_decode, recordings, decode_options)
        timed("recon", run_recon, recordings, recon_options)
        timed("preproc", run_preproc, recordings, preproc_options)
        timed("epoch", run_epochs, [r for r in recordings if r.events is not None], epoch_options)
    return [_summarize(recording, out) for recording in recordings], timings


def _summarize(recording: Recording, out: Location) -> RecordingSummary:
    outputs = {
        stage: store_location(out, recording, stage).url
        for stage in ("decode", "recon", "preproc", "epoch")
        if stage != "epoch" or recording.events is not None
    }
    recon_store = open_dataset(store_location(out, recording, "recon"), stage="recon")
    detected = np.asarray(recon_store["detected"].any("face").values)
    return RecordingSummary(
        recording=recording.name,
        frames=int(detected.size),
        detected_fraction=float(detected.mean()) if detected.size else 0.0,
        outputs=outputs,
    )


def run_step(
    step: str,
    recordings: Sequence[Recording],
    out: LocationLike,
    *,
    client: Client,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Location]:
    """Run one preprocessing step on its own store, as the original tool's ``gmfx_align``,
    ``gmfx_interpolate`` and ``gmfx_filter`` do: align reads the recon store and writes
    ``<name>_aligned.zarr``, interpolate reads that and writes ``<name>_interpolated.zarr``, filter reads
    that and writes ``<name>_filtered.zarr``. ``gmfx preproc`` runs the same chain in one graph.
    """
    from gmfx.stages.preproc import run_chain

    out = as_location(out, storage_options, where="out")
    source_step = STAGES[step].reads
    sources = [store_location(out, recording, source_step) for recording in recordings]
    for source in sources:
        if RegionStore(source, source_step).attrs() is None:
            raise StorageError(
                f"gmfx {step} reads the output of gmfx {source_step}, which is not there",
                where=source.url,
                fix=f"run gmfx {source_step} first (or gmfx preproc for the whole chain at once)",
            )
    steps: dict[str, Any] = {"align": False, "interpolate": False, "filter": False}
    steps[step] = dict(options or {}) or True
    return run_chain(
        sources,
        [store_location(out, recording, step) for recording in recordings],
        client=client,
        overwrite=overwrite,
        progress=progress,
        labels=[recording.name for recording in recordings],
        **steps,
    )
