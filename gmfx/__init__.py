"""gmfx: videos of faces -> chunked 4D data (vertices x time) on Zarr and Dask."""

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
from gmfx._version import __version__
from gmfx.dataset import Recording, find_recordings
from gmfx.storage import Location

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
    # data
    "Location",
    "Recording",
    "find_recordings",
]
