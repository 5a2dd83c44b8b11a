"""Reconstruction backends: the contract, the registry and the per-process model cache.

Backends are found through the entry-point group ``gmfx.models`` (a lab adds its own model with one
line in its package's metadata) or registered in-process with :func:`register_backend`.
"""

from __future__ import annotations

import json
import threading
from importlib.metadata import entry_points
from typing import Any

from gmfx._errors import ModelError, parameter
from gmfx.models._base import Backend, Face, Identity, Outputs, Topology

__all__ = [
    "Backend",
    "Face",
    "Identity",
    "Outputs",
    "Topology",
    "available_backends",
    "get_backend",
    "load_backend",
    "register_backend",
    "with_vertices",
]

ENTRY_POINT_GROUP = "gmfx.models"

_registered: dict[str, type[Backend]] = {}
_loaded: dict[tuple, Backend] = {}
_load_lock = threading.Lock()


def register_backend(name: str, backend: type[Backend]) -> None:
    """Make ``backend`` available as ``name`` in this process (takes precedence over entry points)."""
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise ModelError(
            f"{backend!r} is not a gmfx.models.Backend subclass",
            where=f"register_backend({name!r}, ...)",
            fix="subclass gmfx.models.Backend and implement topology, load and reconstruct",
        )
    _registered[name] = backend


def available_backends() -> list[str]:
    """Names of the installed and registered backends, sorted."""
    return sorted(set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_backend(model: str | type[Backend]) -> type[Backend]:
    """The backend class registered or installed as ``model`` (a class is returned as it is)."""
    if isinstance(model, type) and issubclass(model, Backend):
        return model
    if model in _registered:
        return _registered[model]
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == model]
    if not found:
        raise ModelError(
            f"unknown reconstruction model {model!r}",
            where=parameter("run_recon", "model"),
            fix=f"choose one of the installed models: {', '.join(available_backends()) or '(none)'}, or "
            f"install the package that provides it (entry point group {ENTRY_POINT_GROUP!r})",
        )
    try:
        backend = found[0].load()
    except Exception as error:  # noqa: BLE001 - any import failure of a plugin is a model error
        raise ModelError(
            f"the model {model!r} cannot be imported ({type(error).__name__}: {error})",
            where=f"entry point {found[0].value}",
            fix="reinstall the package that provides it, with its dependencies",
        ) from error
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise ModelError(
            f"the model {model!r} is not a gmfx.models.Backend subclass",
            where=f"entry point {found[0].value}",
            fix="point the entry point at a Backend subclass",
        )
    return backend


def load_backend(backend: type[Backend], device: str, options: dict[str, Any] | None = None) -> Backend:
    """The loaded model for ``(backend, device, options)`` in this thread, loaded on first use.

    Tasks call this on the worker, so a worker thread loads each model once and a model is never
    shipped inside a task. One per thread: a model keeps per-region state (``reset()``, tracking), and
    two recon tasks sharing one in a threaded worker broke MediaPipe's graph (packet timestamp mismatch).
    """
    options = dict(options or {})
    key = (backend.__module__, backend.__qualname__, device, json.dumps(options, sort_keys=True, default=str), threading.get_ident())
    with _load_lock:
        if key not in _loaded:
            try:
                _loaded[key] = backend.load(device, **options)
            except ModelError:
                raise
            except Exception as error:  # noqa: BLE001 - a failing load is reported with the model's name
                raise ModelError(
                    f"the model {backend.name!r} cannot be loaded on {device} ({type(error).__name__}: {error})",
                    where=f"{backend.__module__}.{backend.__qualname__}",
                    fix="check the model's files and options, or choose another --device",
                ) from error
        return _loaded[key]


def with_vertices(ds):
    """``ds`` with a lazy ``v`` when it is a recon store of a model that derives its vertices from
    codes (``Backend.derives_vertices``) and was written without them; otherwise ``ds`` as it is."""
    if "v" in ds.variables or "model" not in ds.attrs:
        return ds
    backend = get_backend(ds.attrs["model"])
    if not backend.derives_vertices:
        return ds
    return ds.assign(v=backend.vertices(ds))
