"""Helpers for testing gmfx and code built on it: synthetic data, local S3, backend conformance."""

from gmfx.testing._flaky import FlakyFileSystem
from gmfx.testing._s3 import local_s3_server, make_bucket, s3_storage_options

__all__ = ["FlakyFileSystem", "local_s3_server", "make_bucket", "s3_storage_options"]
