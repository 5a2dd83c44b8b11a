"""Analysis: the generative model of facial expressions (design from events, lazy GLM, group, generate, components).

Every function returns a lazy ``xarray.Dataset``; :mod:`gmfx.stages.glm` writes them as ``_glm.zarr`` stores.
"""

from gmfx.analysis._api import components, generate, glm, group
from gmfx.analysis._design import Design, build_design

__all__ = ["Design", "build_design", "components", "generate", "glm", "group"]
