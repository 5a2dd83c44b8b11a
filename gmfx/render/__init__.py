"""Rendering of mesh stores: rasterizers (CPU numba, CUDA nvdiffrast), views, videos, stills and QC."""

from gmfx.render._api import SEGMENT_FRAMES, open_mesh_store, render_frames, render_still, render_video, video_tasks
from gmfx.render._raster import CpuRasterizer, NvdiffrastRasterizer, Raster, Rasterizer, get_rasterizer, interpolate
from gmfx.render._qc import qc_measures, qc_report
from gmfx.render._shade import interpolate_attributes, shade
from gmfx.render._stage import run_render
from gmfx.render._views import ViewOptions

__all__ = [
    "SEGMENT_FRAMES",
    "CpuRasterizer",
    "NvdiffrastRasterizer",
    "Raster",
    "Rasterizer",
    "ViewOptions",
    "get_rasterizer",
    "interpolate",
    "interpolate_attributes",
    "open_mesh_store",
    "qc_measures",
    "qc_report",
    "render_frames",
    "render_still",
    "render_video",
    "run_render",
    "shade",
    "video_tasks",
]
