"""The model directory: where users put the licensed model files gmfx cannot ship or download.

``GMFX_MODEL_DIR`` (or ``--model-dir``, or the ``model_dir`` option of a backend) names a local folder
or any fsspec URL (``s3://lab/models``); workers read the files from there themselves. Each backend
declares the files it needs as :class:`ModelFile` entries (``model_files``), with the names they have
in the authors' releases and where a user obtains them; ``gmfx models`` lists them as present or missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gmfx._errors import ModelError
from gmfx.storage import Location

__all__ = ["DEFAULT_MODEL_DIR", "MODEL_DIR_ENV", "ModelFile", "find_model_file", "model_dir", "model_file_status", "read_model_file"]

MODEL_DIR_ENV = "GMFX_MODEL_DIR"
DEFAULT_MODEL_DIR = "~/.cache/gmfx/models"


@dataclass(frozen=True)
class ModelFile:
    """One file a backend needs.

    ``paths`` are relative to the model directory and tried in order (a ``*``/``**`` pattern takes the
    file it matches whose name sorts first); ``obtain`` tells the user where to get it.
    """

    name: str
    paths: tuple[str, ...]
    description: str
    obtain: str


def model_dir(path: str | None = None, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The model directory: ``path``, else ``$GMFX_MODEL_DIR``, else ``~/.cache/gmfx/models``."""
    url = path or os.environ.get(MODEL_DIR_ENV) or os.path.expanduser(DEFAULT_MODEL_DIR)
    return Location(url, storage_options or {})


def find_model_file(root: Location, spec: ModelFile) -> Location | None:
    """Where ``spec`` lies under ``root`` (the first of its paths that exists), or ``None``."""
    fs, base = root.filesystem()
    for relative in spec.paths:
        path = f"{base.rstrip('/')}/{relative}"
        if "*" in relative:
            matches = sorted(fs.glob(path))
            if matches:
                protocol = root.url.split("://", 1)[0] + "://" if "://" in root.url else ""
                return Location(protocol + matches[0] if protocol and not matches[0].startswith(protocol) else matches[0], root.storage_options)
        elif fs.exists(path):
            return root.child(relative)
    return None


def read_model_file(root: Location, spec: ModelFile) -> tuple[bytes, str]:
    """The bytes of ``spec`` and its URL; a missing file is a :class:`ModelError` saying where to get it."""
    found = find_model_file(root, spec)
    if found is None:
        raise ModelError(
            f"the {spec.description} is missing (looked for {', '.join(spec.paths)})",
            where=f"model directory {root.url}",
            fix=f"{spec.obtain}; set the model directory with --model-dir or {MODEL_DIR_ENV}; `gmfx models` lists what is missing",
        )
    try:
        with found.open("rb") as handle:
            return handle.read(), found.url
    except OSError as error:
        raise ModelError(
            f"the {spec.description} cannot be read ({type(error).__name__}: {error})",
            where=found.url,
            fix="check the file's permissions and that every worker reaches the model directory",
        ) from error


def model_file_status(backend: type, root: Location) -> list[tuple[ModelFile, Location | None]]:
    """``(file, location or None)`` for each file ``backend`` declares in ``model_files``."""
    return [(spec, find_model_file(root, spec)) for spec in getattr(backend, "model_files", ())]
