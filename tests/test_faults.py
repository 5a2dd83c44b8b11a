"""Transient storage failures: retried within the budget, a clear error when it is spent."""

import numpy as np
import pytest
import xarray as xr

import gmfx.testing._flaky  # noqa: F401  (registers flaky://)
from gmfx import StorageError
from gmfx.storage import Location, RegionStore


def _template(n: int = 8, chunk: int = 4) -> xr.Dataset:
    import dask.array as da

    return xr.Dataset({"v": (("time", "vertex"), da.zeros((n, 2), chunks=(chunk, 2), dtype="float32"))})


def _flaky_store(tmp_path, failures: int, name: str) -> RegionStore:
    location = Location(f"flaky://{tmp_path}/{name}.zarr", {"failures": failures, "counter": str(tmp_path)})
    store = RegionStore(Location(str(tmp_path / f"{name}.zarr")), "recon")
    store.prepare(_template(), plan={"regions": 2})  # template written on a reliable path
    return RegionStore(location, "recon")


def test_flaky_writes_succeed_within_the_retry_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "4")
    store = _flaky_store(tmp_path, failures=3, name="ok")
    values = np.arange(8, dtype="float32").reshape(4, 2)
    store.write_region(0, slice(0, 4), {"v": values})
    store.write_region(1, slice(4, 8), {"v": values + 8})
    fs, _ = store.location.filesystem()
    assert fs.failed == 3
    store.finalize()
    np.testing.assert_array_equal(store.open().v.values, np.arange(16, dtype="float32").reshape(8, 2))


def test_exhausted_retry_budget_names_the_key_and_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "2")
    store = _flaky_store(tmp_path, failures=100, name="broken")
    with pytest.raises(StorageError) as info:
        store.write_region(1, slice(4, 8), {"v": np.zeros((4, 2), "float32")})
    message = str(info.value)
    assert "failed 3 times in a row" in message
    assert "broken.zarr/v/c/1/0" in message  # the chunk key that could not be written
    assert "region 1" in message and store.location.url in message
    assert store.done_regions() == set() and not store.is_complete()


def test_permanent_errors_are_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "50")
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    from gmfx.storage._retry import retry_transient

    with pytest.raises(FileNotFoundError):
        retry_transient(missing, what="reading", where="x")
    assert len(calls) == 1
