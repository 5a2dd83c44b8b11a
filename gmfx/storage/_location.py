"""URLs and storage options: where a file or a store lives (local path, ``memory://``, ``s3://``, ...)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from gmfx._errors import StorageError, hide_url_credentials

__all__ = ["Location", "LocationLike", "as_location", "join_url", "parse_key_values", "parse_storage_options", "redact"]


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an fsspec URL."""
    if _is_local(base):
        return os.path.join(base.removeprefix("file://"), *parts)
    return posixpath.join(base, *parts)


#: storage options gmfx gives by default, under the caller's own: s3fs reads a whole object with a
#: HEAD for its size first unless ``max_concurrency`` is 1 (default 10), and gmfx's whole-object reads
#: are metadata, markers and chunks of a few MB: one request each instead of two (counted on moto)
_PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


@dataclass(frozen=True)
class Location:
    """A local path or fsspec URL together with the storage options needed to reach it.

    The storage options (credentials, endpoint) never appear in ``repr`` or ``str``, so a location
    can be logged or put into an error message safely.
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        url = os.fspath(self.url)
        if _is_local(url):
            url = os.path.abspath(url.removeprefix("file://"))
        object.__setattr__(self, "url", url.rstrip("/") if len(url) > 1 else url)
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return _is_local(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.replace(os.sep, "/"))

    def child(self, *parts: str) -> Location:
        """The location of ``parts`` below this one, with the same storage options."""
        return Location(join_url(self.url, *parts), self.storage_options)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the path on it."""
        return fsspec.core.url_to_fs(self.url, **self._options())

    def _options(self) -> dict[str, Any]:
        """The storage options with gmfx's defaults for the protocol under the caller's own."""
        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        return {**_PROTOCOL_DEFAULTS.get(protocol, {}), **self.storage_options}

    def exists(self) -> bool:
        fs, path = self.filesystem()
        try:
            return fs.exists(path)
        except Exception as error:  # noqa: BLE001 - e.g. an endpoint that does not answer
            raise self.error("the storage cannot be reached", error) from None

    def error(self, what: str, error: BaseException) -> StorageError:
        """A :class:`~gmfx.StorageError` saying ``what`` happened here because of ``error``, with every
        credential of the storage options (and of URLs) removed. Raise it ``from None``: the original error
        may quote them."""
        return StorageError(
            f"{what} ({redact(f'{type(error).__name__}: {error}', self.storage_options)})",
            where=self.url,
            fix="check the URL, the endpoint (client_kwargs.endpoint_url) and the credentials",
        )

    def open(self, mode: str = "rb"):
        """Open the file at this location (a context manager)."""
        fs, path = self.filesystem()
        return fs.open(path, mode)

    def zarr_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``xarray.open_zarr`` / ``Dataset.to_zarr`` that reach this store."""
        if self.is_local:
            return {"store": self.url}
        return {"store": self.url, "storage_options": self._options()}


#: what every public entry point accepts as a place: a local path (``str`` or ``os.PathLike``), an fsspec
#: URL, or a :class:`Location` (a URL with its storage options)
LocationLike = str | os.PathLike[str] | Location


def as_location(value: LocationLike, storage_options: Mapping[str, Any] | None = None, *, where: str = "location") -> Location:
    """The one place a :data:`LocationLike` becomes a :class:`Location`.

    ``storage_options`` are added to (and override) those of a ``Location``; ``where`` names the
    parameter in messages.
    """
    if isinstance(value, Location):
        return Location(value.url, {**value.storage_options, **(storage_options or {})}) if storage_options else value
    if isinstance(value, (str, os.PathLike)):
        url = os.fspath(value)
        if isinstance(url, str) and url:
            return Location(url, storage_options or {})
    from gmfx._errors import ParameterError

    raise ParameterError(
        f"{where} must be a path, a URL or a gmfx.Location, not {type(value).__name__} {value!r}",
        where=where,
        fix='pass e.g. "derivatives/gmfx", "s3://bucket/derivatives/gmfx" or gmfx.Location(url, storage_options)',
    )


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into storage options (see :func:`parse_key_values`)."""
    return parse_key_values(pairs, where="--storage-option", text_keys=_SECRET_WORDS)


def parse_key_values(pairs: list[str] | None, *, where: str, text_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into a dict of options.

    Dotted keys nest (``client_kwargs.endpoint_url=http://...``); ``true``/``false``/numbers are
    converted, except for keys containing one of ``text_keys`` (an access key of digits stays text).
    """
    from gmfx._errors import ParameterError

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ParameterError(
                f"option {pair.split('=')[0]!r} has no value",
                where=where,
                fix=f"write it as KEY=VALUE, e.g. {where} name=value",
            )
        value: Any = raw
        if any(word in key.rsplit(".", 1)[-1].lower() for word in text_keys):
            pass
        elif raw.lower() in {"true", "false"}:
            value = raw.lower() == "true"
        else:
            for convert in (int, float):
                try:
                    value = convert(raw)
                    break
                except ValueError:
                    pass
        target = options
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


_SECRET_WORDS = ("secret", "key", "token", "password", "passwd", "credential", "session")


def redact(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """Remove every secret-looking storage option value, and the ``user:password@`` of every URL (an
    endpoint URL's credentials), from ``text``."""

    def values(options: Mapping[str, Any]):
        for key, value in options.items():
            if isinstance(value, Mapping):
                yield from values(value)
            elif isinstance(value, str) and len(value) >= 4 and any(w in key.lower() for w in _SECRET_WORDS):
                yield value

    for secret in values(storage_options or {}):
        text = text.replace(secret, "***")
    return hide_url_credentials(text)
