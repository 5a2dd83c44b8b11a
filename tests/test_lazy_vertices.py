"""Codes-only recon stores: each model's lazy vertex derivation refuses a store without its codes, naming them."""

import numpy as np
import pytest
import xarray as xr

from gmfx._errors import ModelError, ParameterError
from gmfx.models._lazy_vertices import check_topology
from gmfx.models.bfm_fit import bfm_fit_vertices
from gmfx.models.deca import flame_vertices
from gmfx.models.deep3d import bfm_vertices
from gmfx.models.emica import detail_displacements, emica_vertices


@pytest.mark.parametrize(
    ("derive", "what", "missing"),
    [
        (flame_vertices, "FLAME vertices", "code_shape"),
        (bfm_vertices, "BFM vertices", "code_id"),
        (bfm_fit_vertices, "BFM vertices", "identity_id"),
        (emica_vertices, "EMICA vertices", "identity_shape"),
        (detail_displacements, "displacement maps", "code_detail"),
    ],
)
def test_a_store_without_the_codes_is_refused_by_name(derive, what, missing):
    ds = xr.Dataset({"code_other": (("time", "face", "other_param"), np.zeros((2, 1, 3), np.float32))})
    with pytest.raises(ParameterError, match=f"deriving {what} needs .*{missing}") as caught:
        derive(ds)
    assert "code_other" in str(caught.value)  # where: the variables the dataset has


def test_a_store_of_another_topology_is_refused():
    ds = xr.Dataset(attrs={"topology": "flame2020-5023"})
    check_topology(ds, "flame2020-5023", where="models/", files="FLAME files")  # the same: accepted
    check_topology(xr.Dataset(), "bfm-35709", where="models/", files="BFM file")  # not recorded: accepted
    with pytest.raises(ModelError, match="made with the topology flame2020-5023, the model directory holds bfm-35709") as caught:
        check_topology(ds, "bfm-35709", where="models/", files="BFM file")
    assert "BFM file" in str(caught.value)
