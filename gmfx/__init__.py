"""gmfx: videos of faces -> chunked 4D data (vertices x time) on Zarr and Dask.

The public API, by name::

    recordings = gmfx.find_recordings("/data/study", participant_label="01")
    gmfx.decode(recordings, out, client=client)          # stages over a Dask client ...
    gmfx.recon(recordings, out, client=client)
    ds = gmfx.open_recon(url)                            # ... or lazy xarray operations
    ds = gmfx.filter(gmfx.interpolate(gmfx.align(ds)))
    epochs = gmfx.epoch(ds, "sub-01_task-mini_events.tsv")
"""

from gmfx._errors import (
    ClusterError,
    DatasetError,
    EventsError,
    FrameTimesError,
    GmfxError,
    IncompleteStoreError,
    ModelError,
    ParameterError,
    StorageError,
    VideoError,
)
from gmfx._example import write_example_dataset
from gmfx._version import __version__
from gmfx.cluster import connect
from gmfx.dataset import Recording, find_recordings
from gmfx.models import Backend, Topology, available_backends, get_backend, register_backend
from gmfx.pipeline import RecordingSummary, run_pipeline
from gmfx.preproc import MOTION_PARAMS, align, epoch, filter, interpolate, open_recon
from gmfx.stages.decode import decode, open_frames
from gmfx.stages.preproc import epochs, preproc, write_lazy
from gmfx.stages.recon import recon
from gmfx.storage import Location, RegionStore, open_dataset, store_location
from gmfx.types import Region, Stage, Task

__all__ = [
    "__version__",
    # errors
    "GmfxError",
    "DatasetError",
    "VideoError",
    "FrameTimesError",
    "EventsError",
    "StorageError",
    "IncompleteStoreError",
    "ClusterError",
    "ModelError",
    "ParameterError",
    # datasets and storage
    "Location",
    "Recording",
    "find_recordings",
    "write_example_dataset",
    "RegionStore",
    "open_dataset",
    "store_location",
    # stages over a cluster
    "connect",
    "decode",
    "recon",
    "preproc",
    "epochs",
    "run_pipeline",
    "RecordingSummary",
    "write_lazy",
    # lazy xarray operations
    "open_frames",
    "open_recon",
    "align",
    "interpolate",
    "filter",
    "epoch",
    "MOTION_PARAMS",
    # models
    "Backend",
    "Topology",
    "available_backends",
    "get_backend",
    "register_backend",
    # small typed descriptions
    "Stage",
    "Region",
    "Task",
]
