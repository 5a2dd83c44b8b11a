"""What every codes-only model shares when it derives a recon store's vertices lazily: the check that the
store holds the codes, the codes as Dask arrays, and the ``(time, face, vertex, coord)`` result. Each model
keeps only its own decoding (which codes, one ``map_blocks`` over time chunks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gmfx._errors import ModelError, ParameterError

__all__ = ["as_dask", "check_topology", "require_codes", "vertex_array"]


def require_codes(ds: Any, needed: Iterable[str], *, deriving: str, fix: str) -> None:
    """Raise a :class:`ParameterError` naming the variables of ``needed`` that ``ds`` lacks for ``deriving``
    (e.g. ``"FLAME vertices"``)."""
    missing = [name for name in needed if name not in ds.variables]
    if missing:
        raise ParameterError(
            f"deriving {deriving} needs {', '.join(missing)}",
            where=f"dataset with variables {sorted(map(str, ds.data_vars))}",
            fix=fix,
        )


def check_topology(ds: Any, found: str, *, where: str, files: str) -> None:
    """Raise a :class:`ModelError` when ``ds`` records another topology than the model files hold (``found``)."""
    expected = ds.attrs.get("topology")
    if expected is not None and expected != found:
        raise ModelError(
            f"the store was made with the topology {expected}, the model directory holds {found}",
            where=where,
            fix=f"point --model-dir / GMFX_MODEL_DIR at the {files} the store was made with",
        )


def as_dask(variable: Any) -> Any:
    """The data of ``variable`` as a Dask array (its own chunks, or one chunk when it is in memory)."""
    import dask.array as da

    data = variable.data
    return data if isinstance(data, da.Array) else da.from_array(data, chunks=data.shape)


def vertex_array(data: Any, ds: Any, *, derived: str) -> Any:
    """``data`` ``(time, face, vertex, coord)`` as the world-space ``v`` of ``ds``, saying how it was ``derived``."""
    import xarray as xr

    coords = {k: ds.coords[k] for k in ("time", "face", "coord") if k in ds.coords}
    return xr.DataArray(data, dims=("time", "face", "vertex", "coord"), coords=coords, attrs={"space": "world", "units": "pixels", "derived": derived})
