"""The BFM layer on a generated official-format ``BFM_model_front.mat``: the loader (0-based ids,
padding, strict errors) and every formula against a hand computation from the raw file (SciPy)."""

import io

import numpy as np
import pytest
import scipy.io
import torch
from scipy.spatial.transform import Rotation

from gmfx import ModelError
from gmfx.models._bfm import BFM_CODES, BfmLayer, euler_rotation, merge_coefficients, read_bfm, split_coefficients
from gmfx.testing._bfm_files import write_bfm_model

N_SMALL = 1500


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return write_bfm_model(tmp_path_factory.mktemp("bfm") / "BFM_model_front.mat", n_vertices=N_SMALL, n_faces=None, seed=3)


@pytest.fixture(scope="module")
def raw(small_file):
    return scipy.io.loadmat(str(small_file))


@pytest.fixture(scope="module")
def layer(small_file):
    return BfmLayer(read_bfm(small_file.read_bytes(), where=str(small_file))).double()


def random_codes(batch, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    codes = {name: scale * torch.randn(batch, size, generator=g, dtype=torch.float64) for name, size in BFM_CODES.items()}
    codes["angle"] = codes["angle"] * 0.3
    codes["trans"] = codes["trans"] * 0.2
    return codes


# -- the generated file has the official layout -------------------------------------------------------
def test_generated_full_size_file_has_the_official_keys_shapes_and_dtypes(tmp_path):
    path = write_bfm_model(tmp_path / "BFM_model_front.mat")
    content = scipy.io.loadmat(str(path))
    expected = {
        "meanshape": ((1, 107127), np.float32), "idBase": ((107127, 80), np.float32), "exBase": ((107127, 64), np.float64),
        "meantex": ((1, 107127), np.float32), "texBase": ((107127, 80), np.float32), "tri": ((70789, 3), np.float32),
        "point_buf": ((35709, 8), np.float32), "keypoints": ((1, 68), np.float32), "skinmask": ((1, 35709), np.float32),
    }  # fmt: skip
    for key, (shape, dtype) in expected.items():
        assert content[key].shape == shape and content[key].dtype == dtype, key
    assert content["tri_mask2"].shape[1] == 3 and content["frontmask2_idx"].shape[1] == 1
    tri = content["tri"].astype(np.int64)
    assert tri.min() == 1 and tri.max() == 35709  # 1-based, every vertex used
    assert content["point_buf"].max() == 70789 + 1  # padding id F + 1
    model = read_bfm(path.read_bytes(), where=str(path))
    assert model.n_vertices == 35709 and model.triangles.shape == (70789, 3)


def test_loader_converts_one_based_ids_and_the_padding(small_file, raw):
    model = read_bfm(small_file.read_bytes(), where=str(small_file))
    n_faces = raw["tri"].shape[0]
    np.testing.assert_array_equal(model.triangles, raw["tri"].astype(np.int64) - 1)
    np.testing.assert_array_equal(model.keypoints, raw["keypoints"].reshape(-1).astype(np.int64) - 1)
    np.testing.assert_array_equal(model.point_buf, raw["point_buf"].astype(np.int64) - 1)
    assert model.point_buf.max() == n_faces  # padding -> F: the appended zero normal
    np.testing.assert_array_equal(model.meanshape, raw["meanshape"].reshape(-1, 3))
    np.testing.assert_array_equal(model.id_base[5, 2], raw["idBase"][3 * 5 + 2])  # rows x0, y0, z0, x1, ...
    assert model.exp_base.dtype == np.float32 and model.sizes == {"id": 80, "exp": 64, "tex": 80}
    assert model.skinmask.dtype == bool and model.skinmask.shape == (N_SMALL,)


def _write(content, tmp_path, name="BFM_model_front.mat"):
    path = tmp_path / name
    scipy.io.savemat(path, content)
    return path.read_bytes(), str(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("exBase"), r"lacks the keys exBase"),
        (lambda c: c.update(idBase=c["idBase"][:-3]), r"'idBase' has shape \(4497, 80\), expected \(4500, K\)"),
        (lambda c: c.update(tri=c["tri"] - 1), r"'tri' holds ids 0\.\.\d+, expected 1-based ids 1\.\.1500"),
        (lambda c: c.update(point_buf=c["point_buf"][:, :] + 1), r"'point_buf' holds ids 2\.\.\d+, expected 1-based"),
        (lambda c: c.update(keypoints=c["keypoints"][:, :60]), r"'keypoints' has shape \(1, 60\)"),
        (lambda c: c.update(tri=c["tri"] + 0.5), r"'tri' holds non-integer ids"),
    ],
)
def test_broken_files_name_the_key_and_the_file(raw, tmp_path, change, message):
    content = {k: v for k, v in raw.items() if not k.startswith("__")}
    change(content)
    data, where = _write(content, tmp_path)
    with pytest.raises(ModelError, match=message) as error:
        read_bfm(data, where=where)
    assert error.value.where == where and "BFM_model_front.mat" in error.value.fix


def test_a_file_that_is_not_matlab_5_is_a_model_error():
    with pytest.raises(ModelError, match="cannot be read as a MATLAB 5 file") as error:
        read_bfm(b"\x89HDF\r\n\x1a\n" + bytes(600), where="BFM/BFM_model_front.mat")
    assert error.value.where == "BFM/BFM_model_front.mat"


# -- the layer against hand computations ---------------------------------------------------------------
def test_shape_is_the_recentred_mean_plus_the_bases(layer, raw):
    codes = random_codes(2)
    mean = raw["meanshape"].reshape(-1, 3).astype(np.float64)
    for b in range(2):
        expected = (mean - mean.mean(axis=0)
                    + (raw["idBase"].astype(np.float64) @ codes["id"][b].numpy()).reshape(-1, 3)
                    + (raw["exBase"] @ codes["exp"][b].numpy()).reshape(-1, 3))  # fmt: skip
        np.testing.assert_allclose(layer.shape(codes["id"], codes["exp"])[b].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_albedo_is_mean_plus_texture_basis_over_255(layer, raw):
    codes = random_codes(1)
    expected = (raw["meantex"].reshape(-1, 3) + (raw["texBase"].astype(np.float64) @ codes["tex"][0].numpy()).reshape(-1, 3)) / 255
    np.testing.assert_allclose(layer.albedo(codes["tex"])[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_rotation_is_extrinsic_xyz_euler():
    angles = torch.tensor([[0.3, -0.5, 1.1], [-1.2, 0.2, 0.05]], dtype=torch.float64)
    expected = Rotation.from_euler("xyz", angles.numpy()).as_matrix()  # about fixed x, then y, then z: Rz Ry Rx
    np.testing.assert_allclose(euler_rotation(angles).numpy(), expected, atol=1e-12)


def test_pose_and_pinhole_projection_by_hand(layer):
    codes = random_codes(1, seed=4)
    out = layer(codes)
    rotation = Rotation.from_euler("xyz", codes["angle"][0].numpy()).as_matrix()
    posed = out["local"][0].numpy() @ rotation.T + codes["trans"][0].numpy()
    np.testing.assert_allclose(out["posed"][0].numpy(), posed, atol=1e-10)
    x, y, z = posed.T
    expected = np.stack([1015 * x / (10 - z) + 112, 1015 * y / (10 - z) + 112], 1)
    np.testing.assert_allclose(out["projected"][0].numpy(), expected, atol=1e-8)
    keypoints = np.asarray(layer.keypoints)
    np.testing.assert_allclose(out["landmarks"][0].numpy(), expected[keypoints], atol=1e-8)


def test_vertex_normals_sum_the_unit_normals_of_the_listed_triangles(layer, raw):
    codes = random_codes(1, seed=5)
    vertices = layer.shape(codes["id"], codes["exp"])[0].numpy()
    normals = layer.normals(layer.shape(codes["id"], codes["exp"]))[0].numpy()
    tri = raw["tri"].astype(np.int64) - 1
    for vertex in (0, 17, 400, N_SMALL - 1):
        total = np.zeros(3)
        for face in raw["point_buf"][vertex].astype(np.int64):
            if face == len(tri) + 1:  # the padding id adds nothing
                continue
            v0, v1, v2 = vertices[tri[face - 1]]
            n = np.cross(v0 - v1, v1 - v2)
            total += n / np.linalg.norm(n)
        np.testing.assert_allclose(normals[vertex], total / np.linalg.norm(total), atol=1e-8)
    assert (normals[:, 2] > 0).mean() > 0.95  # the generated mesh faces the camera (+z)


def test_colour_under_lighting_by_hand(layer):
    codes = random_codes(1, seed=6, scale=0.1)
    codes["gamma"] = torch.zeros(1, 27, dtype=torch.float64)
    out = layer(codes, colours=True)
    band0 = np.pi / np.sqrt(4 * np.pi)  # a_0 c_0
    np.testing.assert_allclose(out["colour"].numpy(), out["albedo"].numpy() * 0.8 * band0, rtol=1e-10)
    # one coefficient per colour: red on band 2 (y), green on band 3 (z), blue on band 7 (x z)
    gamma = torch.zeros(1, 3, 9, dtype=torch.float64)
    gamma[0, 0, 1], gamma[0, 1, 2], gamma[0, 2, 7] = 0.5, -0.3, 0.7
    normal = torch.tensor([[[0.36, 0.48, 0.8]]], dtype=torch.float64)
    a1c1 = 2 * np.pi / np.sqrt(3) * np.sqrt(3) / np.sqrt(4 * np.pi)
    a2c2 = 2 * np.pi / np.sqrt(8) * 3 * np.sqrt(5) / np.sqrt(12 * np.pi)
    expected = [0.8 * band0 - 0.5 * a1c1 * 0.48, 0.8 * band0 - 0.3 * a1c1 * 0.8, 0.8 * band0 - 0.7 * a2c2 * 0.36 * 0.8]
    np.testing.assert_allclose(layer.shading(normal, gamma.reshape(1, 27))[0, 0].numpy(), expected, rtol=1e-12)


def test_coefficients_split_in_the_published_order():
    coefficients = torch.arange(257.0)[None]
    parts = split_coefficients(coefficients)
    assert [p.shape[1] for p in parts.values()] == [80, 64, 80, 3, 27, 3]
    assert parts["exp"][0, 0] == 80 and parts["angle"][0, 0] == 224 and parts["gamma"][0, 0] == 227 and parts["trans"][0, 0] == 254
    torch.testing.assert_close(merge_coefficients(parts), coefficients)
    with pytest.raises(ModelError, match="have 256 values, expected 257"):
        split_coefficients(coefficients[:, :256])


def test_layer_is_differentiable_in_every_code(layer):
    codes = {k: v.clone().requires_grad_(True) for k, v in random_codes(2, seed=7, scale=0.1).items()}
    out = layer(codes, colours=True)
    (out["landmarks"].sum() + out["colour"].sum()).backward()
    assert all(torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0 for v in codes.values())


def test_model_directory_takes_either_name(tmp_path, small_file):
    from gmfx.models._bfm import load_bfm
    from gmfx.storage import Location

    (tmp_path / "BFM").mkdir()
    (tmp_path / "BFM" / "BFM09_model_info.mat").write_bytes(small_file.read_bytes())  # 3DMM-Fitting's name
    assert load_bfm(Location(str(tmp_path))).n_vertices == N_SMALL
    with pytest.raises(ModelError, match=r"BFM front model .* is missing") as error:
        load_bfm(Location(str(tmp_path / "elsewhere")))
    assert "import-bfm" in error.value.fix
