"""The BFM 2009 -> front model conversion (``gmfx models import-bfm``) on generated original files
whose conversion is known: the front model they were scattered from is the oracle."""

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from gmfx import ModelError
from gmfx.cli import app
from gmfx.models._bfm import read_bfm
from gmfx.models._bfm_convert import convert_bfm09, read_exp_pca
from gmfx.storage import Location
from gmfx.testing._bfm_files import write_bfm09_sources, write_bfm_model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bfm09")
    front = write_bfm_model(folder / "expected_front.mat", n_vertices=800, n_faces=None, seed=2)
    write_bfm09_sources(folder / "sources", front, seed=4)
    return folder / "sources", scipy.io.loadmat(str(front))


def test_conversion_gives_back_the_front_model(sources):
    folder, expected = sources
    converted = convert_bfm09(Location(str(folder)))
    for key in ("meanshape", "meantex", "idBase", "exBase", "texBase"):
        assert converted[key].shape == expected[key].shape, key
        np.testing.assert_allclose(converted[key], expected[key], rtol=2e-6, atol=1e-7 * np.abs(expected[key]).max(), err_msg=key)
    assert converted["exBase"].dtype == np.float64 and converted["idBase"].dtype == np.float32  # as transferBFM09's
    for key in ("tri", "point_buf", "keypoints", "skinmask", "tri_mask2", "frontmask2_idx"):
        np.testing.assert_array_equal(converted[key], expected[key])
    assert "frontmask2" not in converted


def test_exp_pca_layout_is_count_mean_then_component_rows():
    mean, rows = np.arange(6, dtype="<f4"), np.arange(100, 112, dtype="<f4")  # 2 components of 2 vertices
    data = np.array([2], "<i4").tobytes() + mean.tobytes() + rows.tobytes()
    got_mean, components = read_exp_pca(data, where="Exp_Pca.bin")
    np.testing.assert_array_equal(got_mean, mean)
    np.testing.assert_array_equal(components[:, 1], rows[6:])  # (3W, k): column j = row j of the file
    with pytest.raises(ModelError, match="do not fit 2 components"):
        read_exp_pca(data[:-4], where="Exp_Pca.bin")


def test_cli_writes_a_front_model_the_loader_reads(sources, tmp_path):
    folder, expected = sources
    result = CliRunner().invoke(app, ["models", "import-bfm", str(folder), "--model-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = tmp_path / "BFM" / "BFM_model_front.mat"
    assert str(written) in result.output and "800 vertices" in result.output
    model = read_bfm(written.read_bytes(), where=str(written))
    np.testing.assert_array_equal(model.triangles, expected["tri"].astype(np.int64) - 1)


def test_a_missing_source_says_where_to_get_it(sources, tmp_path):
    folder, _ = sources
    for name in ("Exp_Pca.bin", "01_MorphableModel.mat", "std_exp.txt", "BFM_front_idx.mat", "BFM_exp_idx.mat", "facemodel_info.mat"):
        if name != "Exp_Pca.bin":
            (tmp_path / name).write_bytes((folder / name).read_bytes())
    result = CliRunner().invoke(app, ["models", "import-bfm", str(tmp_path), "--model-dir", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "Exp_Pca.bin is missing" in result.output and "github.com/Juyong/3DFace" in result.output
    assert not (tmp_path / "m" / "BFM" / "BFM_model_front.mat").exists()
