"""Writes along any dimension go through the storage layer: a preproc vertex block is retried on
transient failures, and a persistent failure names the store, the block and the chunk."""

import re
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import gmfx.testing._flaky  # noqa: F401  (registers flaky://)
from gmfx import StorageError
from gmfx.stages import preproc as preproc_module
from gmfx.storage import Location, RegionStore

#: (time, face, vertex, coord), chunked (4, 1, 3, 3): vertex block 1 is vertices 3:6
SHAPE = (8, 1, 9, 3)
EXPECTED = np.arange(np.prod(SHAPE), dtype="float32").reshape(SHAPE)


def _flaky_store(tmp_path, failures: int, name: str) -> Location:
    template = xr.Dataset(
        {"v": (("time", "face", "vertex", "coord"), da.zeros(SHAPE, chunks=(4, 1, 3, 3), dtype="float32"))}
    )
    RegionStore(Location(str(tmp_path / f"{name}.zarr")), "preproc").prepare(template, plan={"regions": 3})
    return Location(f"flaky://{tmp_path}/{name}.zarr", {"failures": failures, "counter": f"{tmp_path}-{name}"})


def _write_block(location: Location, index: int) -> int:
    start, stop = 3 * index, 3 * index + 3
    graph = preproc_module._pickled(da.from_array(EXPECTED, chunks=(4, 1, 3, 3))[:, :, start:stop])
    return preproc_module._write_vertex_block(location, "preproc", index, start, stop, graph)


def test_a_vertex_block_write_is_retried_after_transient_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "4")
    location = _flaky_store(tmp_path, failures=3, name="ok")
    for index in range(3):
        assert _write_block(location, index) == 3
    store = RegionStore(location, "preproc")
    assert store.location.filesystem()[0].failed == 3  # the failures did happen, and were absorbed
    assert store.done_regions() == {0, 1, 2}
    store.finalize()
    np.testing.assert_array_equal(store.open().v.values, EXPECTED)


def test_a_persistent_vertex_block_failure_names_the_store_and_the_chunk(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "2")
    location = _flaky_store(tmp_path, failures=100, name="broken")
    with pytest.raises(StorageError) as info:
        _write_block(location, 1)
    message = str(info.value)
    assert "failed 3 times in a row" in message
    assert location.url in message and "region 1" in message and "vertex 3" in message
    assert re.search(r"broken\.zarr/v/c/[01]/0/1/0", message), message  # a chunk key of vertex block 1
    store = RegionStore(location, "preproc")
    assert store.done_regions() == set() and not store.is_complete()  # no marker without its data


# -- glm: vertex blocks of analysis results, through the same writer ---------------------------------------------
#: a lazy analysis result (regressor, face, vertex) in vertex blocks of 4; block 1 (vertices 4:8) holds no data
BETA = np.random.default_rng(0).normal(size=(3, 1, 12)).astype("float32")
BETA[:, :, 4:8] = np.nan


def _glm_result() -> xr.Dataset:
    return xr.Dataset(
        {"beta": (("regressor", "face", "vertex"), da.from_array(BETA, chunks=(3, 1, 4))),
         "template": (("vertex", "coord"), np.zeros((12, 3), "float32"))},
        coords={"regressor": ["smile", "frown", "drift"], "coord": ["x", "y", "z"]},
    )  # fmt: skip


def _glm_tasks(tmp_path, failures: int, name: str):
    """The template written on local disk, and the block tasks aimed at the same store behind flaky://."""
    from gmfx.stages import glm

    plan = glm.plan_result(_glm_result(), Location(str(tmp_path / f"{name}.zarr")), stage="glm", source="test")
    flaky = Location(f"flaky://{tmp_path}/{name}.zarr", {"failures": failures, "counter": f"{tmp_path}-{name}"})
    return plan, flaky, [(task.function, (flaky, *task.args[1:])) for task in plan.tasks]


def test_glm_vertex_blocks_are_retried_and_leave_no_chunk_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "4")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(specification|UTF32).*")  # strings written the Zarr v3 way
        plan, flaky, tasks = _glm_tasks(tmp_path, failures=3, name="fit")
        for function, args in tasks:
            function(*args)
    assert flaky.filesystem()[0].failed == 3  # the failures did happen, and were retried
    plan.store.finalize(plan.attrs)
    written = plan.store.open()
    np.testing.assert_array_equal(written["beta"].values, BETA)
    assert list(written["regressor"].values) == ["smile", "frown", "drift"]
    chunks = sorted(p.relative_to(tmp_path / "fit.zarr" / "beta").as_posix() for p in (tmp_path / "fit.zarr" / "beta").rglob("c/*/*/*"))
    assert chunks == ["c/0/0/0", "c/0/0/2"]  # the all-NaN block 1 is read as the fill value, not stored


def test_a_persistent_glm_block_failure_names_the_store_and_chunk_and_leaves_no_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "1")
    plan, flaky, tasks = _glm_tasks(tmp_path, failures=100, name="broken")
    function, args = tasks[2]  # vertices 8:12
    with pytest.raises(StorageError) as info:
        function(*args)
    message = str(info.value)
    assert "failed 2 times in a row" in message and flaky.url in message and "region 2" in message, message
    assert f"chunk {flaky.url}/beta/c/0/0/2" in message, message
    assert plan.store.done_regions() == set() and not plan.store.is_complete()
