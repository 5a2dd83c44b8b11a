"""The whole pipeline over a dataset: decode -> recon -> preproc (align, interpolate, filter) -> epochs.

Each recording goes through its stages on its own (a chain of stage calls in a client-side thread),
several recordings at once: the client plans and finalizes one recording's stores while the workers
compute another's, and one recording's recon runs while another still decodes. Tasks are submitted
with a Dask priority: a later stage before an earlier one, then the recordings in their order, so a
recording ready for recon does not queue behind the decode of the others, and recordings finish in
order. Every stage resumes from completion markers and finalizes its store before the recording's
next stage reads it.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
from distributed import Client

from gmfx._checks import check_options
from gmfx._errors import GmfxError, ParameterError, StorageError, parameter
from gmfx._execute import cancellation, one_display, submission_priority
from gmfx._validate import check_pipeline
from gmfx.dataset import Recording
from gmfx.types import STAGES
from gmfx.storage import Location, LocationLike, RegionStore, as_location, open_dataset, store_location

__all__ = ["RecordingSummary", "run_pipeline", "run_step", "PARALLEL_RECORDINGS"]

#: recordings whose stage chains run at once. benchmarks/pipeline.py (4 recordings x 600 frames, shared
#: 2-core machine, noisy), frames/s with 1 worker / 2 workers / 2 workers on S3 (moto): stage by stage
#: (the previous barriers) 95 / 138 / 76, the single worker idle 5.2 s waiting on the client; 2 chains
#: 108 / 152 / 83; 4 chains 99 / 139 / 82, idle 1.9 s. Before templates were computed off the cluster
#: (d0696d9), 4 led clearly (98 / 116 / 40 against 89 / 90 / 25 for 2): more chains hide more latency.
PARALLEL_RECORDINGS = 4


@dataclass(frozen=True)
class RecordingSummary:
    """What the pipeline produced for one recording."""

    recording: str
    frames: int
    detected_fraction: float
    outputs: Mapping[str, str] = field(default_factory=dict)
    #: the stage that failed for this recording and its message (the other recordings went on)
    failed_stage: str | None = None
    error: str | None = None


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
    parallel_recordings: int = PARALLEL_RECORDINGS,
) -> tuple[list[RecordingSummary], dict[str, float]]:
    """Run every stage for ``recordings``; return a summary per recording and seconds per stage.

    Each recording runs decode -> recon -> preproc -> epochs on its own, ``parallel_recordings`` of
    them at once (see :data:`PARALLEL_RECORDINGS`); epochs are cut for the recordings that have an
    ``_events.tsv``. ``out`` is a path, URL (with ``storage_options``) or :class:`Location`. Options,
    events and frame times are checked before decode starts. One recording failing does not stop the
    others: it skips its later stages, and its summary carries the stage and the message. Anything
    else (a bug, Ctrl-C) cancels the work in flight and is raised; a rerun resumes from the finished
    regions. A stage's seconds run from the first recording starting it to the last one finishing it:
    stages of different recordings overlap, so they add up to more than the run's wall time.
    """
    from gmfx import preproc as gmfx_preproc
    from gmfx.preproc import epoch
    from gmfx.stages.decode import run_decode
    from gmfx.stages.preproc import run_epochs, run_preproc
    from gmfx.stages.recon import run_recon

    out = as_location(out, storage_options, where="out")
    if parallel_recordings < 1:
        raise ParameterError(
            f"parallel_recordings={parallel_recordings} runs no recording",
            where=parameter("run_pipeline", "parallel_recordings"),
            fix=f"give 1 or more (default {PARALLEL_RECORDINGS})",
        )
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

    check_pipeline(recordings, preproc_options=dict(preproc_options or {}), epoch_options=dict(epoch_options or {}))
    stages = (
        ("decode", run_decode, decode_options),
        ("recon", run_recon, recon_options),
        ("preproc", run_preproc, preproc_options),
        ("epoch", run_epochs, epoch_options),
    )
    failed: dict[str, tuple[str, str]] = {}  # recording -> (stage, message)
    spans: dict[str, list[tuple[float, float]]] = {}  # stage -> (start, end) of each recording's call
    lock = threading.Lock()
    stop = threading.Event()  # set when the run is abandoned: no chain starts another stage

    def run_chain(position: int, recording: Recording) -> None:
        for depth, (name, function, options) in enumerate(stages):
            if stop.is_set() or (name == "epoch" and recording.events is None):
                return
            start = time.perf_counter()
            try:  # a later stage's tasks go before queued earlier ones, then earlier recordings first
                with submission_priority(depth * len(recordings) + len(recordings) - 1 - position):
                    function([recording], out, client=client, overwrite=overwrite, progress=progress, **dict(options or {}))
            except GmfxError as error:
                with lock:
                    failed[recording.name] = (name, str(error))
                return
            finally:
                with lock:
                    spans.setdefault(name, []).append((start, time.perf_counter()))

    with (
        one_display(enabled=progress),  # one display for the whole run, a row per stage
        # the client's own small reads (coordinates, masks) run where they are asked for: on the
        # cluster they would queue behind the other recordings' tasks and stall this one's chain
        dask.config.set(scheduler="sync"),
        cancellation() as scope,
        concurrent.futures.ThreadPoolExecutor(parallel_recordings, thread_name_prefix="gmfx-recording") as pool,
    ):
        # each chain sees this context: the display, the cancellation scope
        chains = [
            pool.submit(contextvars.copy_context().run, run_chain, position, recording)
            for position, recording in enumerate(recordings)
        ]
        try:
            for chain in concurrent.futures.as_completed(chains):
                chain.result()
        except BaseException:  # a bug or Ctrl-C: no chain goes on, the cluster drops their tasks
            stop.set()
            for chain in chains:
                chain.cancel()
            scope.cancel()
            raise
    timings = {
        name: max(end for _, end in spans[name]) - min(start for start, _ in spans[name])
        for name, _, _ in stages
        if name in spans
    }
    summaries = [
        _summarize(recording, out)
        if recording.name not in failed
        else RecordingSummary(recording.name, 0, float("nan"), {}, *failed[recording.name])
        for recording in recordings
    ]
    return summaries, timings


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
