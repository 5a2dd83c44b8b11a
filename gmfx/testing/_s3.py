"""A real S3-compatible server on 127.0.0.1 for tests (moto's server; needs the ``test`` extra)."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from typing import Any

__all__ = ["local_s3_server", "s3_storage_options", "make_bucket"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """Run moto's S3 server on a free port of 127.0.0.1; yield its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs options that reach ``endpoint`` with moto's dummy credentials."""
    return {
        "key": "testing-key-id",
        "secret": "testing-secret-value",
        "client_kwargs": {"endpoint_url": endpoint},
        "use_listings_cache": False,
    }


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the server (no region: moto's server rejects us-east-1); return its name."""
    import boto3

    bucket = name or f"gmfx-{uuid.uuid4().hex[:12]}"
    options = s3_storage_options(endpoint)
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return bucket
