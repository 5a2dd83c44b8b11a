"""Whole stages (decode, recon) against a store whose writes fail transiently (``flaky://``), and against S3
(moto's server on 127.0.0.1) behind a proxy that throttles with 503 SlowDown: within the retry budget the result
equals a clean run and is complete; past it, a StorageError names the store and the chunk and nothing is marked
complete. A threaded cluster, so that the injected failures are counted across workers."""

import re
import uuid

import fsspec
import numpy as np
import pytest
import xarray as xr

import gmfx.testing._flaky  # noqa: F401  (registers flaky://)
from gmfx import Location, find_recordings
from gmfx._errors import StorageError
from gmfx._example import write_example_dataset
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import RegionStore, open_dataset, store_location
from gmfx.testing import FlakyFileSystem, ThrottlingProxy, make_bucket, s3_storage_options

RECON = {"device": "cpu", "segment_frames": 24}


class FlakyChunks(FlakyFileSystem):
    """``flakychunks://``: like ``flaky://``, but only writes of chunks of the region data (planes of decode,
    ``v`` of recon; zarr v3 keys ``.../c/...``) fail, so that a stage gets past its template (which writes the
    coordinates' chunks) and fails on the data itself."""

    protocol = ("flakychunks",)

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("flakychunks://") :] if isinstance(path, str) and path.startswith("flakychunks://") else path
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"flakychunks://{name}"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if not re.search(r"\.zarr/(frames|v|[yuva]_plane)/c/", str(path)):
            self.makedirs(self._parent(path), exist_ok=True)
            return super(FlakyFileSystem, self).pipe_file(path, value, mode=mode, **kwargs)
        return super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("flakychunks", FlakyChunks, clobber=True)


@pytest.fixture(scope="module")
def threaded_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    (found,) = find_recordings(write_example_dataset(tmp_path_factory.mktemp("example") / "study"))
    return found


@pytest.fixture(scope="module")
def clean(recording, threaded_client, tmp_path_factory):
    out = Location(str(tmp_path_factory.mktemp("clean") / "out"))
    run_decode([recording], out, client=threaded_client, chunk_frames=8, progress=False)
    run_recon([recording], out, client=threaded_client, progress=False, **RECON)
    return {stage: open_dataset(store_location(out, recording, stage), stage=stage).load() for stage in ("decode", "recon")}


def _raw_attrs(root: str, recording, stage: str) -> dict:
    """The store's attributes read straight from the local files (no gmfx, no fault injection)."""
    location = store_location(Location(root), recording, stage)
    return dict(xr.open_zarr(location.url, consolidated=False).attrs) if location.exists() else {}


@pytest.mark.slow
def test_decode_and_recon_through_transient_write_failures_equal_a_clean_run(
    clean, recording, threaded_client, tmp_path, monkeypatch
):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "4")
    counter = uuid.uuid4().hex
    out = Location(f"flaky://{tmp_path}/out", {"failures": 3, "counter": counter})
    run_decode([recording], out, client=threaded_client, chunk_frames=8, progress=False)
    assert FlakyFileSystem._failed[counter] == 3  # the faults were really injected (and retried)
    FlakyFileSystem._failed[counter] = 0  # three more for recon
    run_recon([recording], out, client=threaded_client, progress=False, **RECON)
    assert FlakyFileSystem._failed[counter] == 3
    for stage in ("decode", "recon"):
        assert _raw_attrs(f"{tmp_path}/out", recording, stage).get("gmfx_complete") is True, stage
        got = open_dataset(store_location(Location(f"{tmp_path}/out"), recording, stage), stage=stage).load()
        assert sorted(got.data_vars) == sorted(clean[stage].data_vars), stage
        for name in clean[stage].variables:
            np.testing.assert_array_equal(got[name].values, clean[stage][name].values, err_msg=f"{stage}:{name}")


@pytest.mark.parametrize("stage", ["decode", "recon"])
def test_an_exhausted_retry_budget_names_the_store_and_chunk_and_marks_nothing_complete(
    stage, clean, recording, threaded_client, tmp_path, monkeypatch
):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "1")
    root = f"{tmp_path}/out"
    if stage == "recon":  # a clean decode store to read from, then every write of recon fails
        run_decode([recording], Location(root), client=threaded_client, chunk_frames=8, progress=False)
    out = Location(f"flakychunks://{root}", {"failures": 10**6, "counter": uuid.uuid4().hex})
    with pytest.raises(StorageError) as info:
        if stage == "decode":
            run_decode([recording], out, client=threaded_client, chunk_frames=8, progress=False)
        else:
            run_recon([recording], out, client=threaded_client, progress=False, **RECON)
    message = str(info.value)
    store = store_location(Location(root), recording, stage).url
    assert store in message and "failed 2 times in a row" in message, message
    assert re.search(rf"{re.escape(store)}/(frames|v|[yuva]_plane)/c/\d", message), message  # the chunk that could not be written
    assert _raw_attrs(root, recording, stage).get("gmfx_complete") is False  # the template is there, not complete


# -- S3 (moto on 127.0.0.1) behind a proxy that throttles with 503 SlowDown / ServiceUnavailable ---------------------
#: s3fs's and botocore's own retries off, so that every injected 503 reaches gmfx's retry (the layer tested here)
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
SECRET = s3_storage_options("http://unused")["secret"]


@pytest.fixture
def s3_out(s3_endpoint, monkeypatch):
    """An output root in a fresh bucket: its URL, the direct location (no proxy) and a factory of proxied ones."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # one attempt per call in s3fs's own retry loop
    url = f"s3://{make_bucket(s3_endpoint)}/out"
    direct = Location(url, s3_storage_options(s3_endpoint))
    return url, direct, lambda proxy: Location(url, {**s3_storage_options(proxy.endpoint), **NO_CLIENT_RETRIES})


def _markers(store: Location) -> list[str]:
    fs, path = store.filesystem()
    return fs.find(f"{path}/_gmfx/regions")


@pytest.mark.slow
def test_decode_and_recon_on_s3_through_throttling_equal_a_clean_run(clean, recording, threaded_client, s3_out, monkeypatch):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "3")
    url, direct, through = s3_out
    # shards 1 and 2 of the frames' Y plane and chunk 1 of v: their first writes answer 503 (SlowDown, then
    # ServiceUnavailable, ...); the reads of the frames fail once more than Dask's task retries (2) absorb
    schedule = {r"^PUT .*_frames\.zarr/y_plane/c/[12]/": 2, r"^GET .*_frames\.zarr/y_plane/c/[12]/": 3, r"^PUT .*_recon\.zarr/v/c/1/": 2}
    with ThrottlingProxy(direct.storage_options["client_kwargs"]["endpoint_url"], schedule) as proxy:
        run_decode([recording], through(proxy), client=threaded_client, chunk_frames=8, segment_frames=8, progress=False)
        run_recon([recording], through(proxy), client=threaded_client, progress=False, **RECON)
    for kind, (keys, failures) in {"PUT y_plane": (2, 2), "GET y_plane": (2, 3), "PUT v": (1, 2)}.items():
        method, name = kind.split()
        throttled = [key for key in proxy.injected if key.startswith(method) and f"/{name}/c/" in key]
        assert len(throttled) == keys, (kind, sorted(proxy.injected))  # every scheduled chunk was throttled ...
        assert all(proxy.injected[key] == failures and proxy.passed[key] >= 1 for key in throttled), kind  # ... then got through
    for stage in ("decode", "recon"):
        store = store_location(direct, recording, stage)
        assert RegionStore(store, stage).attrs()["gmfx_complete"] is True, stage
        got = open_dataset(store, stage=stage).load()
        assert sorted(got.data_vars) == sorted(clean[stage].data_vars), stage
        for name in clean[stage].variables:
            np.testing.assert_array_equal(got[name].values, clean[stage][name].values, err_msg=f"{stage}:{name}")


@pytest.mark.parametrize("stage", ["decode", "recon"])
def test_s3_throttling_past_the_retry_budget_names_the_store_and_chunk_and_marks_nothing_complete(
    stage, recording, threaded_client, s3_out, monkeypatch
):
    monkeypatch.setenv("GMFX_STORAGE_RETRIES", "1")
    url, direct, through = s3_out
    if stage == "recon":  # a clean decode store to read from
        run_decode([recording], direct, client=threaded_client, chunk_frames=8, progress=False)
    data = {"decode": r"_frames\.zarr/[yuv]_plane/c/", "recon": r"_recon\.zarr/v/c/"}[stage]
    endpoint = direct.storage_options["client_kwargs"]["endpoint_url"]
    with ThrottlingProxy(endpoint, {rf"^PUT .*{data}": 10**6}) as proxy, pytest.raises(StorageError) as info:
        if stage == "decode":
            run_decode([recording], through(proxy), client=threaded_client, chunk_frames=8, progress=False)
        else:
            run_recon([recording], through(proxy), client=threaded_client, progress=False, **RECON)
    message = str(info.value)
    store = store_location(direct, recording, stage)
    assert store.url in message and "failed 2 times in a row" in message, message
    assert re.search(rf"chunk {re.escape(store.url)}/([yuv]_plane/c/\d+/0/0|v/c/\d+/0/0/0)\b", message), message  # which chunk
    assert "request" in message, message  # the server's reason (SlowDown / ServiceUnavailable) is kept
    assert max(proxy.injected.values()) == 2  # each chunk was tried exactly 1 + GMFX_STORAGE_RETRIES times
    assert SECRET not in message and SECRET not in repr(info.value.__cause__)
    # nothing is marked complete: not the store, and no region of it
    assert RegionStore(store, stage).attrs()["gmfx_complete"] is False
    assert _markers(store) == []
    fs, path = store.filesystem()
    assert SECRET.encode() not in fs.cat_file(f"{path}/zarr.json")
