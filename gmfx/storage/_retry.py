"""Retries for transient storage errors (a flaky network, a throttled bucket)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from gmfx._errors import GmfxError, StorageError

__all__ = ["describe", "retry_transient", "is_transient", "storage_retries"]

T = TypeVar("T")
log = logging.getLogger(__name__)

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def storage_retries() -> int:
    """How many times a storage operation is retried (``GMFX_STORAGE_RETRIES``, default 5)."""
    from gmfx._validate import check_storage_retries

    return check_storage_retries()


#: errors of botocore/aiohttp (not ``OSError`` subclasses) that mean a dropped or refused connection;
#: matched by class name so that gmfx does not import either library
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ProxyConnectionError", "HTTPClientError", "ClientConnectionError", "ServerDisconnectedError",
    "ClientPayloadError", "ResponseStreamingError",
})  # fmt: skip


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: connection, timeout and other I/O errors that are not final,
    including botocore's and aiohttp's connection errors (a dropped S3 connection).

    A :class:`GmfxError` is never transient: gmfx raised it on purpose, and a retry would give it again."""
    if isinstance(error, (GmfxError, *_PERMANENT)):
        return False
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__):
        return True
    return isinstance(error, (OSError, TimeoutError, ConnectionError))


def describe(error: BaseException) -> str:
    """``Type: message`` of ``error`` with its notes (e.g. the chunk a store write was writing)."""
    return "; ".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", ())])


def retry_transient(
    operation: Callable[[], T],
    *,
    what: str,
    where: str,
    retries: int | None = None,
    backoff: float = 0.2,
    redactor: Callable[[str], str] = str,
) -> T:
    """Run ``operation``; retry it on transient errors with exponential back-off.

    Only idempotent operations belong here (gmfx's region writes are). When the retry budget is
    spent, raise a :class:`StorageError` that names what was being done and where.
    """
    budget = storage_retries() if retries is None else retries
    for attempt in range(budget + 1):
        try:
            return operation()
        except Exception as error:
            if isinstance(error, GmfxError):
                raise
            detail = describe(error)
            if not is_transient(error):
                if redactor(detail) == detail:
                    raise
                # a driver that quotes its options (credentials) in its errors: never let them out
                raise StorageError(
                    f"{what} failed: {redactor(detail)}",
                    where=where,
                    fix="check the URL, that the bucket or folder exists and is writable, and the credentials",
                ) from None
            if attempt == budget:
                raise StorageError(
                    f"{what} failed {budget + 1} times in a row; last error: " + redactor(detail),
                    where=where,
                    fix="check the storage service and network; raise GMFX_STORAGE_RETRIES for a flaky "
                    "connection; rerun the same command to resume",
                ) from error
            delay = min(backoff * 2**attempt, 5.0)
            log.warning("%s failed (%s); retry %d of %d in %.1f s", what, type(error).__name__, attempt + 1, budget, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
