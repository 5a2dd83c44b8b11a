"""The public API: every name resolves, none collides with a subpackage, internals stay inside."""

import subprocess
import sys

import pytest

import gmfx

INTERNALS = {"Stage", "Region", "Task", "RegionStore", "store_location", "open_dataset", "write_lazy"}


def test_every_public_name_is_listed_once_and_resolves():
    names = [name for name in gmfx.__all__ if name != "__version__"]
    assert len(names) == len(set(names))
    assert set(names) == set(gmfx._LAZY)
    for name in names:
        assert getattr(gmfx, name) is not None


def test_internals_are_not_public():
    assert not INTERNALS & set(gmfx.__all__)
    for name in INTERNALS:
        assert not hasattr(gmfx, name), name


def test_stage_runners_survive_importing_the_subpackages():
    """Importing gmfx.preproc (as gmfx.align does) sets the attribute ``preproc`` on gmfx: no public
    name may be that attribute. Run in a fresh interpreter so the import order is the user's."""
    code = (
        "import gmfx, inspect\n"
        "gmfx.align\n"
        "import gmfx.stages.decode, gmfx.stages.recon, gmfx.stages.preproc, gmfx.preproc, gmfx.models\n"
        "for name in gmfx.__all__[1:]:\n"
        "    value = getattr(gmfx, name)\n"
        "    assert not inspect.ismodule(value), name\n"
        "assert callable(gmfx.run_preproc) and callable(gmfx.run_decode) and callable(gmfx.run_recon)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_location_like_becomes_the_same_location(tmp_path):
    from gmfx.storage import as_location

    expected = gmfx.Location(str(tmp_path / "out"))
    assert as_location(str(tmp_path / "out")) == expected
    assert as_location(tmp_path / "out") == expected
    assert as_location(expected) is expected
    remote = as_location(gmfx.Location("s3://b/out", {"anon": True}), {"key": "k"})
    assert remote.url == "s3://b/out" and dict(remote.storage_options) == {"anon": True, "key": "k"}
    with pytest.raises(gmfx.ParameterError, match="out must be a path"):
        as_location(3, where="out")
    with pytest.raises(gmfx.ParameterError):
        gmfx.open_frames(None)


def test_open_store_knows_the_stage_and_refuses_other_stores(tmp_path):
    import numpy as np
    import xarray as xr

    from gmfx.storage import RegionStore

    ds = xr.Dataset({"v": ("time", np.arange(4.0))})
    store = RegionStore(gmfx.Location(str(tmp_path / "a_epochs.zarr")), "epoch")
    store.prepare(ds.chunk(2), plan={"regions": 1})
    with pytest.raises(gmfx.IncompleteStoreError):
        gmfx.open_store(tmp_path / "a_epochs.zarr")
    store.write_region(0, slice(0, 4), {"v": np.arange(4.0)})
    store.finalize()
    opened = gmfx.open_store(str(tmp_path / "a_epochs.zarr"))
    assert opened.attrs["gmfx_stage"] == "epoch"
    np.testing.assert_array_equal(opened["v"].values, np.arange(4.0))
    ds.to_zarr(tmp_path / "plain.zarr", zarr_format=3)
    with pytest.raises(gmfx.StorageError, match="not written by gmfx"):
        gmfx.open_store(tmp_path / "plain.zarr")
    with pytest.raises(gmfx.StorageError, match="no gmfx store"):
        gmfx.open_store(tmp_path / "missing.zarr")


def test_one_table_of_stages_names_every_store_the_readme_shows():
    import pathlib
    import typer

    from gmfx.cli import app
    from gmfx.types import STAGES

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    commands = set(typer.main.get_command(app).commands)
    for stage in STAGES.values():
        assert f"_{stage.suffix}.zarr" in readme, stage
        assert stage.name in commands, stage  # each stage is a command of the same name
        chain, seen = stage, set()
        while chain.reads is not None:  # every input leads back to the videos
            assert chain.name not in seen
            seen.add(chain.name)
            chain = STAGES[chain.reads]
        assert chain.name == "decode"
