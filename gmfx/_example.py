"""The example dataset that ships with gmfx (see ``gmfx/data/example/NOTICE``)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from gmfx._errors import DatasetError

__all__ = ["example_dataset_path", "write_example_dataset"]


def example_dataset_path() -> Path:
    """The folder of the bundled example dataset inside the installed package (read-only)."""
    return Path(str(resources.files("gmfx") / "data" / "example"))


def write_example_dataset(dest: str | Path) -> Path:
    """Copy the example dataset (one participant, one real clip with frame times and events) to ``dest``."""
    target = Path(dest)
    if target.exists() and not target.is_dir():
        raise DatasetError(
            "the destination of the example dataset is a file, not a folder",
            where=str(target),
            fix="give the path of a new or empty folder",
        )
    if target.exists() and any(target.iterdir()):
        if (target / "sub-01").exists():
            return target.resolve()
        raise DatasetError(
            "the folder for the example dataset exists and holds other files",
            where=str(target),
            fix="choose an empty or new folder",
        )
    shutil.copytree(example_dataset_path(), target, dirs_exist_ok=True)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target.resolve()
