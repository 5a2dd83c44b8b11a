"""Discovery of recordings in a BIDS-like tree, on a local disk or any fsspec URL.

::

    <bids_dir>/sub-01/[ses-1/]sub-01[_ses-1]_task-mini[_run-1]_video.mp4
                              sub-01[_ses-1]_task-mini[_run-1]_frametimes.tsv   (column ``t``)
                              sub-01[_ses-1]_task-mini[_run-1]_events.tsv
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gmfx._errors import DatasetError, parameter
from gmfx.storage._location import Location, LocationLike, as_location

__all__ = ["Recording", "find_recordings", "normalize_participant_label", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = ("mp4", "mov", "mkv", "avi", "webm")

_LABEL = r"[A-Za-z0-9]+"
_FILE = re.compile(
    rf"^sub-(?P<subject>{_LABEL})(?:_ses-(?P<session>{_LABEL}))?_task-(?P<task>{_LABEL})"
    rf"(?:_run-(?P<run>{_LABEL}))?_(?P<suffix>video|frametimes|events)\.(?P<ext>[A-Za-z0-9]+)$"
)


@dataclass(frozen=True)
class Recording:
    """One video of one participant doing one task, with its side files.

    Attributes
    ----------
    root
        The dataset's root (``bids_dir``) with its storage options.
    subject, session, task, run
        BIDS entities (labels without their ``sub-``/``ses-``/... prefix).
    video, frametimes, events
        Locations of the files; ``frametimes`` and ``events`` may be ``None``.
    """

    root: Location
    subject: str
    task: str
    video: Location
    session: str | None = None
    run: str | None = None
    frametimes: Location | None = None
    events: Location | None = None

    @property
    def name(self) -> str:
        """The BIDS prefix shared by the recording's files, e.g. ``sub-01_ses-1_task-mini_run-1``."""
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        if self.run:
            parts.append(f"run-{self.run}")
        return "_".join(parts)

    @property
    def relative_dir(self) -> str:
        """The folder below the dataset root, e.g. ``sub-01/ses-1``."""
        return posixpath.join(f"sub-{self.subject}", *([f"ses-{self.session}"] if self.session else []))

    def __str__(self) -> str:
        return self.name


def normalize_participant_label(label: str) -> str:
    """``"sub-01"`` or ``"01"`` -> ``"01"``; refuses labels that could escape the dataset folder."""
    raw = label.strip()
    if "/" in raw or "\\" in raw or ".." in raw:
        raise DatasetError(
            f"participant label {label!r} contains a path separator or '..'",
            where=parameter("find_recordings", "participant_label"),
            fix="give the label only, e.g. 01 or sub-01",
        )
    value = raw.removeprefix("sub-")
    if not re.fullmatch(_LABEL, value):
        raise DatasetError(
            f"participant label {label!r} is not a BIDS label (letters and digits only)",
            where=parameter("find_recordings", "participant_label"),
            fix="give the label only, e.g. 01",
        )
    return value


def find_recordings(
    bids_dir: LocationLike,
    *,
    participant_label: Iterable[str] | str | None = None,
    task: Iterable[str] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Recording]:
    """List the recordings of a BIDS-like dataset, sorted by name.

    Parameters
    ----------
    bids_dir
        Local path or fsspec URL (``s3://bucket/study``) of the dataset root.
    participant_label
        Keep only these participants (``"01"`` or ``"sub-01"``).
    task
        Keep only these tasks.
    storage_options
        fsspec options for a remote ``bids_dir`` (added to those of a ``Location``).

    Raises
    ------
    DatasetError
        The folder does not exist or cannot be listed, a selected participant or task does not exist,
        or no recording is found.
    """
    root = as_location(bids_dir, storage_options, where="bids_dir")
    subjects = _as_set(participant_label, normalize_participant_label)
    tasks = _as_set(task, lambda t: t.removeprefix("task-"))
    fs, root_path = _filesystem(root)
    try:
        if not fs.isdir(root_path):
            raise DatasetError(
                "the input dataset folder does not exist or is not a folder",
                where=str(root),
                fix="give the path or URL of a BIDS-like folder that holds sub-*/ folders",
            )
        paths = fs.glob(posixpath.join(root_path, "sub-*", "*")) + fs.glob(
            posixpath.join(root_path, "sub-*", "ses-*", "*")
        )
    except DatasetError:
        raise
    except (OSError, PermissionError) as error:
        raise DatasetError(
            f"the input dataset cannot be listed ({type(error).__name__}: {error})",
            where=str(root),
            fix="check the path exists and is readable, and for s3:// the bucket and credentials",
        ) from error

    groups: dict[tuple, dict[str, str]] = {}
    for path in sorted(paths):
        match = _FILE.match(posixpath.basename(path))
        if not match:
            continue
        entities = (match["subject"], match["session"], match["task"], match["run"])
        suffix, ext = match["suffix"], match["ext"].lower()
        if suffix == "video" and ext not in VIDEO_EXTENSIONS:
            continue
        if suffix != "video" and ext != "tsv":
            continue
        group = groups.setdefault(entities, {})
        if suffix in group:
            raise DatasetError(
                f"two {suffix} files for one recording: {posixpath.basename(group[suffix])} and "
                f"{posixpath.basename(path)}",
                where=posixpath.dirname(_url(fs, path, root)),
                fix="keep one video per recording (convert or remove the other)",
            )
        group[suffix] = path

    found = sorted({key[0] for key in groups})
    for label in sorted(subjects or []):
        if label not in found:
            raise DatasetError(
                f"participant sub-{label} has no recording in the dataset",
                where=str(root),
                fix=f"choose among: {', '.join('sub-' + s for s in found) or '(none found)'}",
            )
    found_tasks = sorted({key[2] for key in groups})
    for name in sorted(tasks or []):
        if name not in found_tasks:
            raise DatasetError(
                f"task {name!r} has no recording in the dataset",
                where=str(root),
                fix=f"choose among: {', '.join(found_tasks) or '(none found)'}",
            )

    recordings = []
    for (subject, session, task_name, run), files in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if subjects and subject not in subjects or tasks and task_name not in tasks:
            continue
        if "video" not in files:
            continue
        options = root.storage_options

        def location(suffix: str) -> Location | None:
            return Location(_url(fs, files[suffix], root), options) if suffix in files else None

        recordings.append(
            Recording(
                root=root,
                subject=subject,
                session=session,
                task=task_name,
                run=run,
                video=location("video"),
                frametimes=location("frametimes"),
                events=location("events"),
            )
        )
    if not recordings:
        raise DatasetError(
            "no recording found (no sub-*/[ses-*/]sub-*_task-*_video.<ext> file matches the selection)",
            where=str(root),
            fix=f"check the folder layout (see the README) and the selection; video extensions: "
            f"{', '.join(VIDEO_EXTENSIONS)}",
        )
    return sorted(recordings, key=lambda r: r.name)


def _as_set(values, normalize) -> set[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    result = {normalize(v) for v in values}
    return result or None


def _filesystem(root: Location):
    try:
        return root.filesystem()
    except Exception as error:  # noqa: BLE001 - any fsspec set-up failure is a dataset access error
        raise DatasetError(
            f"cannot open the dataset location ({type(error).__name__}: {error})",
            where=str(root),
            fix="check the URL's protocol and the --storage-option values",
        ) from error


def _url(fs, path: str, root: Location) -> str:
    return path if root.is_local else fs.unstrip_protocol(path)
