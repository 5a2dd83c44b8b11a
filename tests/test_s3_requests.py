"""What gmfx asks of an object store: requests counted on moto's S3 server through a pass-through proxy."""

from collections import Counter

import dask.array
import numpy as np
import xarray as xr

from gmfx.storage import Location, RegionStore
from gmfx.testing import ThrottlingProxy, make_bucket, s3_storage_options


def _counted(proxy: ThrottlingProxy, before: Counter) -> Counter:
    """Requests since ``before``, by method."""
    return Counter(key.split(" ", 1)[0] for key in (Counter(proxy.passed) - before).elements())


def test_a_template_is_one_put_per_object_and_a_whole_object_one_get(s3_endpoint):
    with ThrottlingProxy(s3_endpoint, {".*": 0}) as proxy:  # throttles nothing: counts every request
        options = s3_storage_options(proxy.endpoint)
        location = Location(f"s3://{make_bucket(proxy.endpoint)}/out/store.zarr", options)
        n = 40
        template = xr.Dataset(
            {name: (("time", "vertex"), dask.array.zeros((n, 7), chunks=(10, 7))) for name in "abcdef"},
            coords={"time": np.arange(n) / 30.0, "label": ("vertex", [f"v{i}" for i in range(7)])},
        )
        before = Counter(proxy.passed)
        RegionStore(location, "recon").prepare(template, plan={"regions": 4})
        requests = _counted(proxy, before)
        fs, root = location.filesystem()
        objects = fs.find(root)
        # the group, 6 arrays, 2 coordinates and their chunks; and the lock taken and released around it
        assert requests["PUT"] == len(objects) + 1 and requests["DELETE"] == 1, (requests, objects)
        # what was there before (the deletion's check) and the lock's own checks: no listing or check per array
        assert requests["GET"] + requests["HEAD"] <= 4, requests

        before = Counter(proxy.passed)
        fs.invalidate_cache()
        assert fs.cat_file(f"{root}/zarr.json")
        assert _counted(proxy, before) == Counter({"GET": 1})
