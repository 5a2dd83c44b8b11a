"""gmfx: videos of faces -> chunked 4D data (vertices x time) on Zarr and Dask.

The public API, by name::

    recordings = gmfx.find_recordings("/data/study", participant_label="01")
    gmfx.run_decode(recordings, out, client=client)      # stages over a Dask client ...
    gmfx.run_recon(recordings, out, client=client)
    ds = gmfx.open_recon(url)                            # ... or lazy xarray operations
    ds = gmfx.filter(gmfx.interpolate(gmfx.align(ds)))
    epochs = gmfx.epoch(ds, "sub-01_task-mini_events.tsv")
    fit = gmfx.glm(ds, "sub-01_task-mini_events.tsv", window=(0, 2))   # lazy, per vertex block
    movie = gmfx.generate(fit, "smile", shape="template")
"""

import importlib
from typing import TYPE_CHECKING, Any

from gmfx._version import __version__

if TYPE_CHECKING:  # the same names, imported for type checkers and IDEs
    from gmfx._errors import (
        ClusterError,
        DatasetError,
        EventsError,
        FrameTimesError,
        GmfxError,
        GmfxWarning,
        IncompleteStoreError,
        ModelError,
        ParameterError,
        StorageError,
        VideoError,
    )
    from gmfx._example import write_example_dataset
    from gmfx._study import IncompleteStudyWarning, open_study
    from gmfx.analysis import Design, build_design, components, generate, glm, group
    from gmfx.cluster import connect
    from gmfx.dataset import Recording, find_recordings
    from gmfx.models import Backend, Topology, available_backends, get_backend, register_backend
    from gmfx.models.deca import flame_vertices
    from gmfx.models import Identity
    from gmfx.models.emica import detail_displacements, emica_vertices
    from gmfx.models.deep3d import bfm_vertices
    from gmfx.pipeline import RecordingSummary, run_pipeline
    from gmfx.preproc import MOTION_PARAMS, align, epoch, filter, interpolate, open_recon
    from gmfx.preproc import evoked, to_mne
    from gmfx.stages.decode import open_frames, run_decode
    from gmfx.stages.preproc import run_epochs, run_preproc
    from gmfx.stages.recon import run_recon
    from gmfx.storage import Location, LocationLike, open_store
    from gmfx.render import Raster, ViewOptions, get_rasterizer, qc_report, render_frames, render_still, render_video, run_render

#: public name -> module that defines it; each is imported on first use, so ``import gmfx`` (and the
#: ``gmfx`` command's start-up) stays fast
_LAZY = {
    "ClusterError": "gmfx._errors",
    "DatasetError": "gmfx._errors",
    "EventsError": "gmfx._errors",
    "FrameTimesError": "gmfx._errors",
    "GmfxError": "gmfx._errors",
    "GmfxWarning": "gmfx._errors",
    "IncompleteStoreError": "gmfx._errors",
    "ModelError": "gmfx._errors",
    "ParameterError": "gmfx._errors",
    "StorageError": "gmfx._errors",
    "VideoError": "gmfx._errors",
    "write_example_dataset": "gmfx._example",
    "IncompleteStudyWarning": "gmfx._study",
    "open_study": "gmfx._study",
    "connect": "gmfx.cluster",
    "Recording": "gmfx.dataset",
    "find_recordings": "gmfx.dataset",
    "Backend": "gmfx.models",
    "Topology": "gmfx.models",
    "available_backends": "gmfx.models",
    "get_backend": "gmfx.models",
    "register_backend": "gmfx.models",
    "flame_vertices": "gmfx.models.deca",
    "Identity": "gmfx.models",
    "emica_vertices": "gmfx.models.emica",
    "detail_displacements": "gmfx.models.emica",
    "bfm_vertices": "gmfx.models.deep3d",
    "RecordingSummary": "gmfx.pipeline",
    "run_pipeline": "gmfx.pipeline",
    "MOTION_PARAMS": "gmfx.preproc",
    "align": "gmfx.preproc",
    "epoch": "gmfx.preproc",
    "filter": "gmfx.preproc",
    "interpolate": "gmfx.preproc",
    "open_recon": "gmfx.preproc",
    "evoked": "gmfx.preproc",
    "to_mne": "gmfx.preproc",
    "reference_shape": "gmfx.preproc",
    "open_frames": "gmfx.stages.decode",
    "run_decode": "gmfx.stages.decode",
    "run_epochs": "gmfx.stages.preproc",
    "run_preproc": "gmfx.stages.preproc",
    "run_recon": "gmfx.stages.recon",
    "Location": "gmfx.storage",
    "LocationLike": "gmfx.storage",
    "open_store": "gmfx.storage",
    # analysis: the generative model of facial expressions
    "Design": "gmfx.analysis",
    "build_design": "gmfx.analysis",
    "glm": "gmfx.analysis",
    "group": "gmfx.analysis",
    "generate": "gmfx.analysis",
    "components": "gmfx.analysis",
    "Raster": "gmfx.render",
    "ViewOptions": "gmfx.render",
    "get_rasterizer": "gmfx.render",
    "qc_report": "gmfx.render",
    "render_frames": "gmfx.render",
    "render_still": "gmfx.render",
    "render_video": "gmfx.render",
    "run_render": "gmfx.render",
}

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
    "GmfxWarning",
    # datasets and storage
    "Location",
    "LocationLike",
    "Recording",
    "find_recordings",
    "write_example_dataset",
    # stages over a cluster
    "connect",
    "run_decode",
    "run_recon",
    "run_preproc",
    "run_epochs",
    "run_pipeline",
    "RecordingSummary",
    # lazy xarray operations
    "open_store",
    "open_study",
    "IncompleteStudyWarning",
    "open_frames",
    "open_recon",
    "align",
    "interpolate",
    "filter",
    "epoch",
    "evoked",
    "to_mne",
    "reference_shape",
    "MOTION_PARAMS",
    # models
    "Backend",
    "Topology",
    "available_backends",
    "get_backend",
    "register_backend",
    "flame_vertices",
    "Identity",
    "emica_vertices",
    "detail_displacements",
    "bfm_vertices",
    # analysis (lazy): design from events, mass-univariate GLM, group level, generated movements, components
    "Design",
    "build_design",
    "glm",
    "group",
    "generate",
    "components",
    # rendering and quality control
    "ViewOptions",
    "run_render",
    "render_video",
    "render_still",
    "render_frames",
    "qc_report",
    "get_rasterizer",
    "Raster",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gmfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
