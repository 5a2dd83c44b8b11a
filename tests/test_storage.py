import numpy as np
import pytest
import xarray as xr

from gmfx import IncompleteStoreError, StorageError
from gmfx.storage import Location, RegionStore, parse_storage_options, redact
from gmfx.types import split_regions


def _template(n: int, chunk: int) -> xr.Dataset:
    import dask.array as da

    return xr.Dataset(
        {"v": (("time", "vertex"), da.zeros((n, 3), chunks=(chunk, 3), dtype="float32"))},
        coords={"time": ("time", da.zeros(n, chunks=chunk))},
    )


def test_region_writes_resume_and_complete(any_root):
    store = RegionStore(any_root.child("rec_recon.zarr"), "recon")
    regions = split_regions(10, 4)
    plan = {"regions": len(regions), "source": "x"}
    assert store.prepare(_template(10, 4), plan=plan) == set()
    expected = np.arange(30, dtype="float32").reshape(10, 3)
    first = regions[0]
    store.write_region(first.index, first.slice, {"v": expected[first.slice], "time": np.arange(10.0)[first.slice]})
    with pytest.raises(IncompleteStoreError, match="2 of 3 regions"):
        store.finalize()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        store.open()
    # a rerun with the same plan sees what is done; another plan is refused without --overwrite
    assert store.prepare(_template(10, 4), plan=plan) == {0}
    with pytest.raises(StorageError, match="--overwrite"):
        store.prepare(_template(10, 4), plan={**plan, "source": "y"})
    for region in regions[1:]:
        store.write_region(region.index, region.slice, {"v": expected[region.slice], "time": np.arange(10.0)[region.slice]})
    store.finalize({"note": "done"})
    ds = store.open()
    np.testing.assert_array_equal(ds.v.values, expected)
    np.testing.assert_array_equal(ds.time.values, np.arange(10.0))
    assert ds.attrs["gmfx_complete"] and ds.attrs["note"] == "done"
    assert store.prepare(_template(10, 4), plan=plan) == {0, 1, 2}
    assert store.prepare(_template(10, 4), plan=plan, overwrite=True) == set()


def test_every_array_has_dimension_names(tmp_path):
    import json

    store = RegionStore(Location(str(tmp_path / "s.zarr")), "recon")
    store.prepare(_template(4, 2), plan={"regions": 2})
    meta = json.loads((tmp_path / "s.zarr" / "v" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["time", "vertex"]


def test_unwritable_output_names_the_store(s3_endpoint):
    from gmfx.testing import s3_storage_options

    location = Location("s3://no-such-bucket/out/rec_frames.zarr", s3_storage_options(s3_endpoint))
    with pytest.raises(StorageError) as info:
        RegionStore(location, "decode").prepare(_template(4, 2), plan={"regions": 2})
    message = str(info.value)
    assert "s3://no-such-bucket/out/rec_frames.zarr" in message
    assert "testing-secret-value" not in message


def test_parse_storage_options_nests_and_converts():
    options = parse_storage_options(["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9", "n=3"])
    assert options == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "n": 3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_redact_removes_secrets_and_location_hides_options():
    options = {"key": "AKIAEXAMPLE", "secret": "s3cr3tvalue", "client_kwargs": {"region_name": "eu"}}
    assert redact("failed with s3cr3tvalue and AKIAEXAMPLE", options) == "failed with *** and ***"
    assert "s3cr3t" not in repr(Location("s3://b/x", options))
