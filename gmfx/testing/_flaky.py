"""fsspec filesystems of local files behind a protocol of their own, for tests: one that fails the first N
writes (fault injection for storage retries), and their base."""

from __future__ import annotations

import threading
from typing import ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["FlakyFileSystem", "LocalFilesUnderProtocol"]


class LocalFilesUnderProtocol(LocalFileSystem):
    """Local files behind a URL protocol of their own (the first of the subclass's ``protocol``), whose
    writes create their folders as object stores do: the base of test filesystems that change one
    operation (fail writes, count reads)."""

    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        prefix = f"{cls.protocol[0]}://"
        path = path[len(prefix) :] if isinstance(path, str) and path.startswith(prefix) else path
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{self.protocol[0]}://{name}"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self.makedirs(self._parent(path), exist_ok=True)
        return super().pipe_file(path, value, mode=mode, **kwargs)


class FlakyFileSystem(LocalFilesUnderProtocol):
    """Local files behind a ``flaky://`` URL whose first ``failures`` writes raise ``ConnectionError``.

    Parameters
    ----------
    failures
        How many writes fail before writes start to work.
    counter
        Name of the failure counter: every instance with the same name (zarr and gmfx each make their
        own) shares it, so ``failures`` counts all writes through that name.

    Examples
    --------
    >>> from gmfx.storage import Location
    >>> location = Location("flaky:///tmp/out/store.zarr", {"failures": 3, "counter": "run-1"})  # doctest: +SKIP
    """

    protocol: ClassVar = ("flaky",)
    _failed: ClassVar[dict[str, int]] = {}
    _lock: ClassVar = threading.Lock()

    def __init__(self, failures: int = 0, counter: str = "default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.counter = counter

    @property
    def failed(self) -> int:
        """How many writes have failed so far under this counter."""
        return self._failed.get(self.counter, 0)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        with self._lock:
            failed = self._failed.get(self.counter, 0)
            if failed < self.failures:
                self._failed[self.counter] = failed + 1
                raise ConnectionError(f"injected failure {failed + 1} of {self.failures} writing {path}")
        return super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
