"""A whole study at once: every complete store of one stage, lazily, as one xarray DataTree."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import xarray as xr

from gmfx._checks import check_choice
from gmfx._errors import GmfxWarning
from gmfx.dataset import Recording, find_recordings
from gmfx.storage import LocationLike, RegionStore, as_location, default_output, open_dataset, store_location
from gmfx.types import STAGES

__all__ = ["IncompleteStudyWarning", "open_study"]


class IncompleteStudyWarning(GmfxWarning):
    """Some recordings of a study have no complete store of the stage asked for; they were left out."""


def open_study(
    bids_dir: LocationLike,
    *,
    stage: str = "preproc",
    out: LocationLike | None = None,
    participant_label: Iterable[str] | str | None = None,
    task: Iterable[str] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.DataTree:
    """Every complete ``stage`` store of a study's recordings, opened lazily, as one DataTree.

    The tree has a node per recording (named like its files, ``sub-01_ses-1_task-faces``) holding its
    store, with ``participant``, ``session``, ``task`` and ``run`` as scalar coordinates, and a child
    ``events`` (dimension ``event``) with the recording's ``_events.tsv`` when it has one. Recordings
    whose store is missing or incomplete are left out with one :class:`IncompleteStudyWarning` naming
    them. Nothing is read but the stores' metadata and the events tables.

    Parameters
    ----------
    bids_dir
        The study (a path, URL with ``storage_options``, or :class:`gmfx.Location`).
    stage
        Whose stores to open: ``decode``, ``recon``, ``preproc``, ``epoch``, ``align``, ...
    out
        The output root (default ``<bids_dir>/derivatives/gmfx``), with the same storage options.
    participant_label, task
        Keep only these participants and tasks.
    """
    from gmfx.preproc._epochs import read_events

    check_choice(stage, _stage_names(), function="open_study", name="stage")
    root = as_location(bids_dir, storage_options, where="bids_dir")
    out_root = default_output(root) if out is None else as_location(out, root.storage_options, where="out")
    recordings = find_recordings(root, participant_label=participant_label, task=task)
    nodes: dict[str, xr.Dataset] = {}
    left_out: list[str] = []
    for recording in recordings:
        location = store_location(out_root, recording, stage)
        if not RegionStore(location, stage).is_complete():
            left_out.append(location.url)
            continue
        nodes[recording.name] = open_dataset(location, stage=stage).assign_coords(_entities(recording))
        if recording.events is not None:
            events = read_events(recording.events).reset_index(drop=True).rename_axis("event")
            nodes[f"{recording.name}/events"] = xr.Dataset.from_dataframe(events)
    if left_out:
        warnings.warn(
            IncompleteStudyWarning(
                f"{len(left_out)} of {len(recordings)} recordings have no complete {stage} store and are left out: "
                + ", ".join(left_out),
                where=out_root.url,
                fix=f"run gmfx {stage} on the study (it resumes unfinished stores), or select other recordings",
            ),
            stacklevel=2,
        )
    tree = xr.DataTree.from_dict(nodes)
    tree.attrs.update(gmfx_stage=stage, gmfx_study=root.url, gmfx_out=out_root.url)
    return tree


def _entities(recording: Recording) -> dict[str, str]:
    return {
        "participant": recording.subject,
        "session": recording.session or "",
        "task": recording.task,
        "run": recording.run or "",
    }


def _stage_names():
    from typing import Literal

    return Literal[tuple(STAGES)]  # type: ignore[valid-type]

