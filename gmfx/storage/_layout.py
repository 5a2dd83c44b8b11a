"""Where gmfx writes its outputs: the derivatives layout and its ``dataset_description.json``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gmfx._version import __version__
from gmfx.storage._location import Location
from gmfx.types import STAGES

if TYPE_CHECKING:
    from gmfx.dataset import Recording

__all__ = ["default_output", "store_location", "write_dataset_description"]


def default_output(bids_dir: Location) -> Location:
    """``<bids_dir>/derivatives/gmfx``."""
    return bids_dir.child("derivatives", "gmfx")


def store_location(out: Location, recording: Recording, stage: str) -> Location:
    """The store of ``stage`` for ``recording`` below the output root ``out`` (suffixes: :data:`gmfx.types.STAGES`)."""
    return out.child(recording.relative_dir, f"{recording.name}_{STAGES[stage].suffix}.zarr")


def write_dataset_description(out: Location, source: Location) -> None:
    """Write a BIDS derivatives ``dataset_description.json`` in ``out`` (once; kept if present)."""
    target = out.child("dataset_description.json")
    fs, path = target.filesystem()
    if fs.exists(path):
        return
    description = {
        "Name": "gmfx derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "gmfx", "Version": __version__}],
        "SourceDatasets": [{"URL": source.url}],
    }
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(description, indent=2).encode())
