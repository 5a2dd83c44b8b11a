"""Errors and warnings in the caller's language: parameters for the library, options for the command line."""

import warnings

import pytest
from typer.testing import CliRunner

import gmfx
from gmfx._errors import StorageError
from gmfx.cli import _in_flags, app
from gmfx.stages.preproc import run_chain
from gmfx.storage._retry import is_transient, retry_transient


def test_a_mistyped_option_is_named_where_it_enters(tmp_path):
    missing = [gmfx.Location(str(tmp_path / "none_recon.zarr"))]
    with pytest.raises(gmfx.ParameterError) as info:  # before any store is opened
        run_chain(missing, missing, filter={"lowpas": 4})
    assert "'lowpas' is not an option of filter" in str(info.value)
    assert "run_preproc(filter=...)" in str(info.value) and "did you mean 'lowpass'" in str(info.value)
    with pytest.raises(gmfx.ParameterError, match=r"run_pipeline\(preproc_options\['align'\]=...\)"):
        gmfx.run_pipeline([], tmp_path, client=None, preproc_options={"align": {"refrence": "mean"}})
    with pytest.raises(gmfx.ParameterError, match=r"run_pipeline\(recon_options=...\)"):
        gmfx.run_pipeline([], tmp_path, client=None, recon_options={"max_face": 2})


def test_choices_are_checked_by_their_literal_type():
    import numpy as np
    import xarray as xr

    ds = xr.Dataset({"v": (("time", "face", "vertex", "coord"), np.zeros((4, 1, 3, 3), np.float32))},
                    coords={"time": np.arange(4.0)})  # fmt: skip
    with pytest.raises(gmfx.ParameterError, match=r"did you mean 'pchip'"):
        gmfx.interpolate(ds, method="pchp")
    with pytest.raises(gmfx.ParameterError, match=r"align\(reference=...\)"):
        gmfx.align(ds, reference="average")


def test_no_gmfx_error_is_retried_as_transient():
    calls = []

    def fails() -> None:
        calls.append(1)
        raise StorageError("the store holds something else", where="memory://x", fix="--overwrite")

    assert not is_transient(StorageError("x")) and is_transient(ConnectionError("reset"))
    with pytest.raises(StorageError):
        retry_transient(fails, what="writing", where="memory://x", retries=3, backoff=0)
    assert len(calls) == 1


def test_the_command_line_names_its_options(tmp_path):
    assert _in_flags("where: run_recon(max_faces=...)") == "where: --max-faces"
    assert _in_flags('or run_recon(device="cpu")') == "or --device cpu"
    assert _in_flags("epoch(baseline_window=...)") == "epoch(baseline_window=...)"  # no such option
    gmfx.write_example_dataset(tmp_path / "ds")
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "ds"), "-p", "0/1"])
    assert result.exit_code == 1
    assert "where: --participant-label" in result.output and "find_recordings" not in result.output


def test_warnings_say_what_where_and_how_to_fix():
    from gmfx.stages.recon import LowDetectionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(LowDetectionWarning("few faces", where="s3://b/x_recon.zarr", fix="check the video"), stacklevel=1)
    (warning,) = caught
    assert issubclass(warning.category, gmfx.GmfxWarning)
    assert str(warning.message) == "few faces\n  where: s3://b/x_recon.zarr\n  how to fix: check the video"
