"""FLAME files and maths: the restricted unpickler, official-format files, the layer against oracles
written here (SciPy rotations, a per-vertex skinning loop, barycentric sums by hand), crops and cameras."""

import dataclasses
import io
import pickle
import pickletools

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from gmfx import ModelError
from gmfx.models._crops import (
    box_from_detection,
    box_from_landmarks,
    crop_to_image,
    orthographic_camera,
    similarity_from_points,
    square_crop,
    transform_points,
    warp_crops,
)
from gmfx.models._flame import FlameLayer, contour_rows, read_flame, read_landmark_embedding, write_flame_npz
from gmfx.models._pickle import load_pickle, load_torch
from gmfx.storage import Location
from gmfx.testing._model_files import write_flame_masks, write_flame_pkl, write_landmark_embedding

GRID = (16, 17)
N_FACES = 2 * 15 * 16


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flame")
    pkl = write_flame_pkl(folder / "generic_model.pkl", grid=GRID, n_eye=10, n_faces=None)
    npy = write_landmark_embedding(folder / "landmark_embedding.npy", N_FACES)
    return pkl, npy


@pytest.fixture(scope="module")
def model(flame_files):
    return read_flame(flame_files[0].read_bytes(), where="generic_model.pkl")


@pytest.fixture(scope="module")
def embedding(flame_files):
    return read_landmark_embedding(flame_files[1].read_bytes(), where="landmark_embedding.npy", n_faces=N_FACES)


# -- the restricted unpickler ---------------------------------------------------------------------
class _WritesAFile:
    """A pickle payload that would create a file when loaded by pickle.load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_asking_for_code_is_refused_naming_it_and_nothing_runs(tmp_path):
    target = tmp_path / "proof.txt"
    data = pickle.dumps({"v_template": np.zeros((3, 3)), "x": _WritesAFile(target)}, protocol=2)
    with pytest.raises(ModelError, match=r"io\.open") as error:
        load_pickle(data, where="evil.pkl")
    assert "evil.pkl" in str(error.value) and "nothing in it was run" in str(error.value)
    assert not target.exists()
    pickle.loads(data)["x"].close()  # the same bytes through pickle do run it: the payload is real
    assert target.exists()


def test_a_lightning_checkpoint_asking_for_code_is_refused(tmp_path):
    target = tmp_path / "proof.txt"
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _WritesAFile(target)}, buffer)
    with pytest.raises(ModelError, match=r"io\.open"):
        load_torch(buffer.getvalue(), where="x.ckpt", lightning=True)
    with pytest.raises(ModelError):
        load_torch(buffer.getvalue(), where="x.ckpt")  # weights_only refuses it too
    assert not target.exists()


@pytest.mark.slow
def test_the_generated_pkl_has_the_official_structure(tmp_path):
    path = write_flame_pkl(tmp_path / "generic_model.pkl")  # full size, as the released file
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"  # protocol 2
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert {"chumpy.ch Ch", "numpy.core.multiarray _reconstruct", "scipy.sparse.csc csc_matrix"} <= globals_
    assert not any(name.startswith(("numpy._core", "scipy.sparse._csc")) for name in globals_)
    raw = load_pickle(data, where=str(path))
    assert raw["v_template"].shape == (5023, 3) and raw["v_template"].dtype == np.float64
    assert raw["f"].shape == (9976, 3) and raw["f"].dtype == np.uint32
    assert raw["shapedirs"].module == "chumpy.ch" and raw["shapedirs"].state["x"].shape == (5023, 3, 400)
    assert raw["kintree_table"][0, 0] == 2**32 - 1
    model = read_flame(data, where=str(path))
    assert model.shapedirs.shape == (5023, 3, 400) and model.j_regressor.shape == (5, 5023)
    assert model.v_template.dtype == np.float32 and model.parents.tolist() == [-1, 0, 1, 1, 1]
    np.testing.assert_allclose(model.weights.sum(axis=1), 1, atol=1e-6)


def test_truncated_missing_key_and_misshaped_files_are_named_errors(flame_files):
    data = flame_files[0].read_bytes()
    with pytest.raises(ModelError, match="truncated"):
        read_flame(data[: len(data) // 2], where="cut.pkl")
    raw = load_pickle(data, where="x")
    raw["shapedirs"], raw["J_regressor"] = raw["shapedirs"].state["x"], read_flame(data, where="x").j_regressor  # plain arrays
    read_flame(pickle.dumps(raw, protocol=2), where="x")  # dense J_regressor and ndarray shapedirs are read too
    without = {k: v for k, v in raw.items() if k != "weights"}
    with pytest.raises(ModelError, match="lacks the keys weights"):
        read_flame(pickle.dumps(without, protocol=2), where="x")
    raw["posedirs"] = raw["posedirs"][:, :, :30]
    with pytest.raises(ModelError, match=r"'posedirs' has shape \(\d+, 3, 30\)"):
        read_flame(pickle.dumps({**without, "weights": raw["weights"], "posedirs": raw["posedirs"]}, protocol=2), where="x")


def test_imported_npz_gives_the_same_model_without_pickles(model, tmp_path):
    path = tmp_path / "generic_model.npz"
    write_flame_npz(model, path)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(f.name for f in dataclasses.fields(model))
    again = read_flame(path.read_bytes(), where=str(path))
    for field in dataclasses.fields(model):
        np.testing.assert_array_equal(getattr(again, field.name), getattr(model, field.name))


def test_landmark_embedding_reads_torch_tensors_and_checks_triangles(flame_files, embedding):
    assert embedding.dynamic_faces.shape == (79, 17) and embedding.dynamic_bary.dtype == np.float32
    assert embedding.full_faces.shape == (68,)
    with pytest.raises(ModelError, match="names triangle"):
        read_landmark_embedding(flame_files[1].read_bytes(), where="x", n_faces=10)


# -- the layer --------------------------------------------------------------------------------------
def test_zero_codes_give_the_template(model):
    layer = FlameLayer(model)
    vertices, _, _ = layer(torch.zeros(2, 100), torch.zeros(2, 50))
    np.testing.assert_allclose(vertices.numpy(), np.broadcast_to(model.v_template, vertices.shape), atol=1e-7)


def test_blendshapes_are_linear_in_shape_and_expression(model):
    layer = FlameLayer(model).double()
    rng = np.random.default_rng(1)
    a, b = (torch.from_numpy(rng.normal(size=(1, 150))) for _ in range(2))

    def offset(code):
        return layer(code[:, :100], code[:, 100:])[0] - layer.v_template

    torch.testing.assert_close(offset(a + 2 * b), offset(a) + 2 * offset(b))
    expected = np.einsum("vkl,l->vk", model.shapedirs[:, :, :100], a[0, :100].numpy())
    expected += np.einsum("vkl,l->vk", model.shapedirs[:, :, 300:350], a[0, 100:].numpy())
    np.testing.assert_allclose(offset(a)[0].numpy(), expected, atol=1e-6)


def test_a_jaw_rotation_moves_only_jaw_weighted_vertices(model):
    still = dataclasses.replace(model, posedirs=np.zeros_like(model.posedirs))  # no pose blendshapes
    layer = FlameLayer(still)
    jaw = torch.tensor([[0.3, 0.0, 0.0]])
    vertices, _, _ = layer(torch.zeros(1, 100), torch.zeros(1, 50), jaw=jaw)
    moved = np.linalg.norm(vertices[0].numpy() - model.v_template, axis=1) > 1e-6
    np.testing.assert_array_equal(moved, model.weights[:, 2] > 0)


def _reference_flame(model, shape, expression, pose):
    """Per-vertex FLAME written from the equations, with SciPy's rotations (float64, one vertex at a time)."""
    betas = np.concatenate([shape, expression])
    dirs = np.concatenate([model.shapedirs[:, :, :100], model.shapedirs[:, :, 300:350]], axis=2).astype(np.float64)
    shaped = model.v_template + dirs @ betas
    joints = model.j_regressor.astype(np.float64) @ shaped
    rotations = Rotation.from_rotvec(pose.reshape(5, 3)).as_matrix()
    feature = (rotations[1:] - np.eye(3)).reshape(-1)
    posed = shaped + model.posedirs.astype(np.float64) @ feature
    world = []
    for k, parent in enumerate(model.parents):
        local = np.eye(4)
        local[:3, :3] = rotations[k]
        local[:3, 3] = joints[k] - (joints[parent] if parent >= 0 else 0)
        world.append(local if parent < 0 else world[parent] @ local)
    out = np.empty_like(posed)
    for v in range(len(posed)):
        transform = np.zeros((4, 4))
        for k in range(5):
            undo_rest = np.eye(4)
            undo_rest[:3, 3] = -joints[k]
            transform += model.weights[v, k] * world[k] @ undo_rest
        out[v] = (transform @ np.append(posed[v], 1.0))[:3]
    return out


def test_skinning_equals_a_per_vertex_reference(model):
    rng = np.random.default_rng(2)
    shape, expression = rng.normal(size=100), rng.normal(size=50)
    pose = rng.normal(scale=0.3, size=15)
    layer = FlameLayer(model).double()
    t = lambda x: torch.from_numpy(x)[None]  # noqa: E731
    vertices, _, _ = layer(t(shape), t(expression), global_pose=t(pose[:3]), neck=t(pose[3:6]), jaw=t(pose[6:9]), eyes=t(pose[9:]))
    np.testing.assert_allclose(vertices[0].numpy(), _reference_flame(model, shape, expression, pose), atol=1e-6)


def test_landmarks_are_barycentric_sums_with_the_contour_row_of_the_yaw(model, embedding):
    layer = FlameLayer(model, embedding=embedding).double()
    rng = np.random.default_rng(3)
    vertices = torch.from_numpy(rng.normal(size=(4, model.n_vertices, 3)))
    yaws = [20.0, -20.0, 50.0, -50.0]
    rotations = torch.eye(3, dtype=torch.float64).repeat(4, 5, 1, 1)
    rotations[:, 0] = torch.from_numpy(Rotation.from_euler("y", np.array(yaws)[:, None], degrees=True).as_matrix())
    rows = [20, 59, 39, 78]  # 0..39 as is; -1..-39 -> 40..78; below -39 -> 78; above 39 -> 39
    assert contour_rows(rotations).tolist() == rows
    landmarks = layer.landmarks(vertices, rotations).numpy()
    faces = model.faces
    for b, row in enumerate(rows):
        ids = np.concatenate([embedding.dynamic_faces[row], embedding.static_faces])
        bary = np.concatenate([embedding.dynamic_bary[row], embedding.static_bary])
        for i, (face, weights) in enumerate(zip(ids, bary)):
            by_hand = sum(weights[c] * vertices[b, faces[face, c]].numpy() for c in range(3))
            np.testing.assert_allclose(landmarks[b, i], by_hand, atol=1e-6)
    full = layer.landmarks3d(vertices).numpy()
    k = 7
    by_hand = sum(embedding.full_bary[k, c] * vertices[0, faces[embedding.full_faces[k], c]].numpy() for c in range(3))
    np.testing.assert_allclose(full[0, k], by_hand, atol=1e-6)


# -- crops and cameras ---------------------------------------------------------------------------
def test_deca_crop_maps_hand_computed_points_and_back():
    landmarks = np.array([[250.0, 150.0], [350.0, 150.0], [300.0, 250.0]])
    centre, size = box_from_landmarks(landmarks)
    np.testing.assert_allclose(centre, [300, 200])
    assert size == pytest.approx((100 + 100) / 2 * 1.1)
    matrix = square_crop(centre, size)  # side int(110 * 1.25) = 137, corner (231.5, 131.5), scale 223/137
    k = 223 / 137
    np.testing.assert_allclose(transform_points(matrix, np.array([[231.5, 131.5], [231.5 + 137, 131.5 + 137]])), [[0, 0], [223, 223]], atol=1e-9)
    np.testing.assert_allclose(transform_points(matrix, np.array([[300.0, 200.0]])), [[68.5 * k, 68.5 * k]])
    back = crop_to_image(matrix)
    np.testing.assert_allclose((back @ np.array([111.5, 111.5, 5.0, 1.0]))[:3], [300.0, 200.0, 5.0 / k])
    detected_centre, detected_size = box_from_detection(np.array([100.0, 100.0, 200.0, 300.0]))
    assert detected_size == 150 and detected_centre.tolist() == [150.0, 200.0 + 0.12 * 150]


def test_similarity_from_points_matches_skimage():
    from skimage.transform import estimate_transform

    rng = np.random.default_rng(4)
    source = rng.uniform(0, 100, size=(5, 2))
    target = rng.uniform(0, 112, size=(5, 2))
    np.testing.assert_allclose(similarity_from_points(source, target), estimate_transform("similarity", source, target).params, atol=1e-9)


def test_warp_crops_equals_skimage_warp():
    from skimage.transform import SimilarityTransform, warp

    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    transform = SimilarityTransform(scale=1.7, rotation=0.2, translation=(-30.0, 10.0))
    crops = warp_crops(torch.from_numpy(frame[None]), torch.from_numpy(transform.params)[None], torch.tensor([0]), out=64)
    expected = warp(frame / 255.0, transform.inverse, output_shape=(64, 64), order=1)
    np.testing.assert_allclose(crops[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_orthographic_camera_is_decas_projection():
    rng = np.random.default_rng(6)
    points = rng.normal(scale=0.1, size=(10, 3))
    s, tx, ty = 7.5, 0.01, -0.02
    projected = s * (points[:, :2] + [tx, ty])
    projected[:, 1] *= -1  # DECA flips y (and z) after projecting
    by_hand = projected * 112 + 112
    matrix = orthographic_camera(np.array([s, tx, ty]))
    lifted = np.c_[points, np.ones(10)] @ matrix.T
    np.testing.assert_allclose(lifted[:, :2], by_hand)
    np.testing.assert_allclose(lifted[:, 2], -s * points[:, 2] * 112)
    assert np.linalg.det(matrix[:3, :3]) > 0  # a proper similarity: the mesh is not mirrored


# -- model directory and rigid vertices -------------------------------------------------------------
def test_rigid_vertices_come_from_the_masks_or_avoid_jaw_eyes_and_expression(flame_files, model, tmp_path):
    from gmfx.models._pickle import load_pickle as read
    from gmfx.models.deca import flame_topology

    (tmp_path / "FLAME2020").mkdir()
    (tmp_path / "FLAME2020" / "generic_model.pkl").write_bytes(flame_files[0].read_bytes())
    default = flame_topology(Location(str(tmp_path))).rigid
    assert not default[model.weights[:, 2:].sum(axis=1) > 0].any()  # nothing skinned to jaw or eyes
    motion = np.linalg.norm(model.shapedirs[:, :, 300:], axis=(1, 2))
    assert motion[default].max() <= np.median(motion[model.weights[:, 2:].sum(axis=1) == 0]) + 1e-9
    (tmp_path / "with_masks" / "FLAME2020").mkdir(parents=True)
    (tmp_path / "with_masks" / "FLAME2020" / "generic_model.pkl").write_bytes(flame_files[0].read_bytes())
    masks_path = write_flame_masks(tmp_path / "with_masks" / "FLAME2020" / "FLAME_masks.pkl", model.n_vertices)
    masks = read(masks_path.read_bytes(), where="masks")
    expected = np.zeros(model.n_vertices, bool)
    expected[np.concatenate([masks["scalp"], masks["forehead"], masks["nose"]])] = True
    with_masks = flame_topology(Location(str(tmp_path / "with_masks"))).rigid
    np.testing.assert_array_equal(with_masks, expected)


def test_a_model_directory_on_s3_is_read_through_fsspec(flame_files, s3_root):
    from gmfx.models._files import find_model_file
    from gmfx.models.deca import FLAME_FILE, flame_topology
    from gmfx.models.emoca import emoca_files

    fs, base = s3_root.filesystem()
    fs.pipe(f"{base}/models/FLAME2020/generic_model.pkl", flame_files[0].read_bytes())
    fs.pipe(f"{base}/models/EMOCA/EMOCA/detail/checkpoints/deca-epoch=01-val_loss=0.5.ckpt", b"x")
    root = s3_root.child("models")
    assert find_model_file(root, FLAME_FILE).url == root.child("FLAME2020", "generic_model.pkl").url
    found = find_model_file(root, emoca_files("EMOCA")[1])
    assert found.url.startswith("s3://") and found.url.endswith("val_loss=0.5.ckpt") and found.exists()
    assert flame_topology(root).n_vertices == GRID[0] * GRID[1] + 10
