"""Lazy preprocessing of 4D face data: rigid alignment, resampling, filtering and epoching.

Every function takes and returns an ``xarray.Dataset`` backed by Dask arrays and computes nothing;
see :mod:`gmfx.stages.preproc` for writing the results to stores.
"""

from gmfx.preproc._api import DEFAULT_MAX_GAP, FrameRecipe, align, align_with_frames, epoch, filter, interpolate, open_recon, reference_shape
from gmfx.preproc._evoked import evoked, to_mne
from gmfx.preproc._rigid import MOTION_PARAMS

__all__ = ["DEFAULT_MAX_GAP", "FrameRecipe", "MOTION_PARAMS", "align", "align_with_frames", "epoch", "evoked", "filter", "interpolate", "open_recon", "reference_shape", "to_mne"]
