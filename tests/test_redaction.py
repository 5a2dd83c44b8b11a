"""Credentials stay out of errors, logs and stores even when the storage driver's own errors quote them
(``echo://``: a filesystem whose chunk writes fail with a message that includes its storage options)."""

import importlib
import pathlib
import sys

import pytest

from _gmfx_cli_helpers import gmfx_command, plugin_site, run, square_dataset
from gmfx import GmfxError
from gmfx.dataset import find_recordings
from gmfx.stages.decode import run_decode as decode
from gmfx.storage import Location

SECRET, TOKEN = "TopSecret-4242", "Token-XYZ-9999"


@pytest.fixture(params=["PermissionError", "ConnectionError"])  # a permanent error, and a retry that runs out
def echo(request, tmp_path, monkeypatch):
    import fsspec

    env = plugin_site(tmp_path / "plugins", echo_error=request.param)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    module = importlib.import_module(f"gmfx_test_plugins_{request.param.lower()}")
    fsspec.register_implementation("echo", module.EchoFileSystem, clobber=True)
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "1")
    return {**env, "GMFX_STORAGE_RETRIES": "1"}, request.param


def _install_echo(folder: str, module: str) -> None:
    """On a worker: the plugin folder on the path and echo:// registered, as an installed package would be."""
    import fsspec

    sys.path.insert(0, folder)
    fsspec.register_implementation("echo", importlib.import_module(module).EchoFileSystem, clobber=True)


def _no_secrets(*texts):
    for text in texts:
        assert SECRET not in text and TOKEN not in text


def _stored_text(folder: pathlib.Path) -> list[str]:
    return [path.read_bytes().decode("latin-1") for path in folder.rglob("*") if path.is_file()]


@pytest.mark.slow
def test_secrets_quoted_by_the_driver_reach_no_error_log_or_store(echo, tmp_path, dask_client):
    env, error = echo
    study = square_dataset(tmp_path)
    options = {"secret": SECRET, "token": TOKEN}
    out = Location(f"echo://{tmp_path}/out", options)
    dask_client.run(_install_echo, str(tmp_path / "plugins"), f"gmfx_test_plugins_{error.lower()}")
    # the library on a real cluster: the raised error and every worker's log
    with pytest.raises(GmfxError) as info:
        decode(find_recordings(str(study)), out, client=dask_client, progress=False)
    assert error in str(info.value) and "_plane/c/" in str(info.value) and "***" in str(info.value)
    logs = dask_client.get_worker_logs()
    _no_secrets(str(info.value), repr(info.value.args), *(line for worker in logs.values() for _, line in worker))
    # the command line with --verbose (the local cluster's workers log to the same stderr)
    result = run([gmfx_command(), "decode", str(study), "--out", f"echo://{tmp_path}/cli", "-s", f"secret={SECRET}",
                  "-s", f"token={TOKEN}", "--workers", "1", "--verbose", "--no-progress"], env)  # fmt: skip
    assert result.returncode == 1 and "_plane/c/" in result.stderr
    _no_secrets(result.stdout, result.stderr, *_stored_text(tmp_path / "out"), *_stored_text(tmp_path / "cli"))


def test_an_endpoint_url_with_credentials_that_answers_nothing_is_one_clear_error_without_them(tmp_path):
    """``-s client_kwargs.endpoint_url=http://user:password@host`` where nothing listens: botocore quotes the URL
    (credentials included) in its errors; the command line shows one clear error without them, no traceback."""
    import socket

    from typer.testing import CliRunner

    from gmfx._example import write_example_dataset
    from gmfx.cli import app
    from gmfx.render import run_render

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://lab-user:{SECRET}@127.0.0.1:{port}"
    options = ["-s", f"client_kwargs.endpoint_url={endpoint}", "-s", "anon=true", "-s", "config_kwargs.retries.total_max_attempts=1"]
    example = str(write_example_dataset(tmp_path / "study"))
    runner = CliRunner()
    for args, store in (
        (["decode", "s3://bucket/study", *options], "s3://bucket/study"),  # reading the dataset
        (["render", example, "--frame", "0", "--out", "s3://bucket/out", *options], "s3://bucket/out/sub-01/sub-01_task-faces_recon.zarr"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert SECRET not in result.output and "Traceback" not in result.output, result.output
        assert result.output.startswith("error: ") and f"where: {store}" in result.output, result.output
        assert "EndpointConnectionError" in result.output and f"http://***@127.0.0.1:{port}" in result.output, result.output
    # the library raises the same StorageError (rendering a video first asks whether it exists already)
    (recording,) = find_recordings(example)
    out = Location("s3://bucket/out", {"client_kwargs": {"endpoint_url": endpoint}, "anon": True,
                                       "config_kwargs": {"retries": {"total_max_attempts": 1}}})  # fmt: skip
    with pytest.raises(GmfxError, match="the storage cannot be reached") as info:
        run_render([recording], out, client=None, progress=False)
    assert SECRET not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__
    assert "where: s3://bucket/out/sub-01/sub-01_task-faces_recon_" in str(info.value), str(info.value)  # the video
