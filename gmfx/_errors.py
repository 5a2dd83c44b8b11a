"""One error hierarchy for gmfx.

Every error says *what* is wrong, *where* (file, store, frame, chunk) and *how to fix* it. Build them
with keyword arguments so that the three parts always appear, in that order::

    raise VideoError("the file is not a video", where="sub-01/sub-01_task-x_video.mp4",
                     fix="check the file plays in a video player, or remove it from the dataset")
"""

from __future__ import annotations

import re

__all__ = [
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
    "parameter",
    "hide_url_credentials",
]


class GmfxError(Exception):
    """Base class of every error gmfx raises on purpose.

    Parameters
    ----------
    what
        What is wrong, in one sentence.
    where
        The file, store URL, frame or chunk concerned.
    fix
        How the user can fix it.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        # a URL with user:password@ (an endpoint URL in the storage options) is quoted by botocore's and
        # aiohttp's errors: no gmfx error ever shows its credentials
        self.what = hide_url_credentials(what)
        self.where = None if where is None else hide_url_credentials(where)
        self.fix = None if fix is None else hide_url_credentials(fix)
        super().__init__(self.what, self.where, self.fix)

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  how to fix: {self.fix}")
        return "\n".join(parts)

    def __reduce__(self):  # keeps keyword arguments through pickling (errors cross Dask workers)
        return (_rebuild, (type(self), self.what, self.where, self.fix))


def _rebuild(cls: type[GmfxError], what: str, where: str | None, fix: str | None) -> GmfxError:
    return cls(what, where=where, fix=fix)


class DatasetError(GmfxError, ValueError):
    """The input dataset is missing, unreadable, or selects no recording."""


class VideoError(GmfxError, ValueError):
    """A video file cannot be decoded (not a video, empty, truncated, no video stream)."""


class FrameTimesError(GmfxError, ValueError):
    """A ``_frametimes.tsv`` file is malformed or disagrees with its video."""


class EventsError(GmfxError, ValueError):
    """An ``_events.tsv`` file is malformed."""


class StorageError(GmfxError, OSError):
    """A store cannot be read or written, or holds something gmfx cannot use."""


class IncompleteStoreError(StorageError):
    """A store exists but the stage that writes it has not finished."""


class ClusterError(GmfxError, RuntimeError):
    """The Dask cluster cannot run the work (no GPU worker, version mismatch, unreachable)."""


class ModelError(GmfxError, ValueError):
    """A reconstruction model is unknown, cannot be loaded, or broke its contract."""


class ParameterError(GmfxError, ValueError):
    """An option has a value that cannot work (e.g. a cut-off above Nyquist)."""


class GmfxWarning(UserWarning):
    """Base class of every warning gmfx gives on purpose: what happened, where, and what to do about it.

    Filter them all with ``warnings.simplefilter("ignore", gmfx.GmfxWarning)``.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(what)

    def __str__(self) -> str:
        return GmfxError.__str__(self)  # type: ignore[arg-type]


#: ``scheme://user:password@``: the credentials part of a URL
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"'<>]*:[^/\s@\"'<>]*@")


def hide_url_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def parameter(function: str, name: str) -> str:
    """How an error names a parameter of a library function: ``run_recon(max_faces=...)``; the command
    line shows it as its option (``--max-faces``)."""
    return f"{function}({name}=...)"
