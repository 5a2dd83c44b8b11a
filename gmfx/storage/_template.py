"""Templates of stores written region by region: one builder for the stages that write lazy results, and
Zarr v3's rule for strings applied to every template in one place (:meth:`RegionStore.prepare`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dask
import dask.array as da
import xarray as xr

__all__ = ["lazy_template", "portable_strings"]


def portable_strings(template: xr.Dataset) -> xr.Dataset:
    """``template`` with every fixed-width unicode (``<U``) variable held in memory stored as variable-length
    strings: ``<U`` has no Zarr v3 specification (zarr warns, and other readers may refuse it), while
    variable-length strings read back as the same strings."""
    fixed = {name: var.astype(object) for name, var in template.variables.items() if var.dtype.kind == "U" and not var.chunks}
    if not fixed:
        return template
    return template.assign(**{n: v for n, v in fixed.items() if n in template.data_vars}).assign_coords(
        **{n: v for n, v in fixed.items() if n in template.coords}
    )


def lazy_template(ds: xr.Dataset, *, written: Iterable[str], chunks: Mapping[str, int]) -> xr.Dataset:
    """The template of a store that receives the ``written`` variables of ``ds`` region by region.

    Those become lazy zeros chunked ``chunks[dim]`` along each named dimension (whole along the others):
    ``Dataset.to_zarr(compute=False)`` writes their metadata only, never a chunk. Every other variable is
    computed now, in one pass, and written with the template. Encodings of the source store are dropped
    (the stage gives its own).
    """
    written = [name for name in written if name in ds.variables]
    template = ds.copy()
    for name in template.variables:
        template[name].encoding = {}
    for name in written:
        array = ds[name]
        shape = tuple(chunks.get(dim, -1) for dim in array.dims)
        template[name] = (array.dims, da.zeros(array.shape, dtype=array.dtype, chunks=shape), array.attrs)
    rest = [name for name in template.variables if name not in written]
    # here, not on the cluster: these are small, and a distributed compute would wait behind the
    # workers' tasks (18 such round trips cost 1.1 s of a 2-recording pipeline on 2 busy workers)
    computed = dict(zip(rest, dask.compute(*[template[name] for name in rest], scheduler="sync"), strict=True))
    return template.assign(**{n: c for n, c in computed.items() if n in template.data_vars}).assign_coords(
        **{n: c for n, c in computed.items() if n in template.coords}
    )
