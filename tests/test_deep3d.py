"""Deep3DFaceRecon on generated official-format files: the network's checkpoint layout (strict keys),
the 5-point alignment and the camera against hand computations of Deep3D's published formulas, the
overlay of the projected keypoints on the input landmarks, and the recon stage end to end (S3, lazy
vertices, resume) on a real clip."""

import os

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gmfx
from gmfx import ModelError
from gmfx.cli import app
from gmfx.dataset import find_recordings
from gmfx.models._bfm import BFM_CODES, BfmLayer, load_bfm
from gmfx.models._files import MODEL_DIR_ENV
from gmfx.models._resnet import load_strict
from gmfx.models.deep3d import (
    Deep3dBackend,
    ReconNet,
    alignment_crop,
    bfm_vertices,
    five_points,
    load_recon_net,
    pos_fit,
    to_image,
    weak_perspective_mat,
)
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, open_dataset
from gmfx.testing._bfm_files import write_deep3d_model_dir
from gmfx.testing._videos import write_bids_recording

#: what the generated network predicts for every image: a face turned a little, with an expression
COEFFICIENTS = np.zeros(257)
COEFFICIENTS[80:84] = [0.5, -0.4, 0.3, 0.2]  # expression
COEFFICIENTS[224:227] = [0.05, -0.1, 0.02]  # angles (rad)
COEFFICIENTS[254:257] = [0.05, -0.03, 0.3]  # translation (dm)
N_FRAMES, SEGMENT = 4, 2


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return write_deep3d_model_dir(tmp_path_factory.mktemp("models"), n_vertices=1200, coefficients=COEFFICIENTS, seed=1)


@pytest.fixture
def model_env(model_root, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    return model_root


class FixedLandmarks:
    """A detector giving the same 68 landmarks (one face) in every frame."""

    def __init__(self, points):
        self.points = points

    def __call__(self, frames, max_faces):
        return [[(self.points, 0.8)] for _ in frames]

    def reset(self):
        pass


# -- network and checkpoint -----------------------------------------------------------------------------
def test_recon_net_has_the_official_key_layout_and_zero_heads():
    network = ReconNet()
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert len(shapes) == 318 + 14  # torchvision ResNet-50 (320 keys) without fc.weight and fc.bias, and 7 heads
    assert shapes["backbone.conv1.weight"] == (64, 3, 7, 7) and shapes["backbone.layer4.2.bn3.running_var"] == (2048,)
    assert [shapes[f"final_layers.{i}.weight"] for i in range(7)] == [(n, 2048, 1, 1) for n in (80, 64, 80, 3, 27, 2, 1)]
    assert not any(key.startswith("backbone.fc") for key in shapes)
    with torch.inference_mode():
        assert torch.equal(network.eval()(torch.rand(2, 3, 224, 224)), torch.zeros(2, 257))  # zero-initialised heads


def test_generated_checkpoint_loads_strictly_and_predicts_its_biases(model_root, tmp_path):
    path = model_root / "Deep3DFaceRecon" / "face_recon_feat0.2_augment" / "epoch_20.pth"
    content = torch.load(path, weights_only=True)
    assert set(content) == {"net_recon", "opt_00", "sched_00"}
    network = load_recon_net(Location(str(model_root))).eval()
    with torch.inference_mode():
        out = network(torch.rand(1, 3, 224, 224))
    np.testing.assert_allclose(out[0].numpy(), COEFFICIENTS, atol=1e-7)
    state = dict(content["net_recon"])
    state["backbone.fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ModelError, match=r"unexpected keys backbone\.fc\.weight"):
        load_strict(ReconNet(), state, where=str(path))
    del state["backbone.fc.weight"], state["final_layers.6.bias"]
    with pytest.raises(ModelError, match=r"missing keys final_layers\.6\.bias"):
        load_strict(ReconNet(), state, where=str(path))
    other = tmp_path / "Deep3DFaceRecon" / "epoch_20.pth"
    other.parent.mkdir(parents=True)
    torch.save({"model": {}}, other)
    with pytest.raises(ModelError, match=r"lacks 'net_recon' \(it holds \['model'\]\)"):
        load_recon_net(Location(str(tmp_path)))


# -- alignment and camera -------------------------------------------------------------------------------
def test_five_points_of_68_and_of_mediapipe():
    points = np.arange(68 * 2, dtype=float).reshape(68, 2)
    expected = [(points[36] + points[39]) / 2, (points[42] + points[45]) / 2, points[30], points[48], points[54]]  # Deep3D's extract_5p
    np.testing.assert_array_equal(five_points(points), expected)
    mesh = np.random.default_rng(0).normal(size=(478, 2))
    np.testing.assert_array_equal(five_points(mesh), [(mesh[33] + mesh[133]) / 2, (mesh[362] + mesh[263]) / 2, mesh[1], mesh[61], mesh[291]])
    with pytest.raises(ModelError, match="gave 5 landmarks"):
        five_points(points[:5])


def test_pos_recovers_a_scaled_orthographic_camera():
    template = np.random.default_rng(1).normal(size=(5, 3))
    rotation = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))[0]
    points = 2.5 * template @ rotation[:2].T + [310.0, 205.0]
    t, s = pos_fit(points, template)
    np.testing.assert_allclose(t, [310.0, 205.0], atol=1e-9)
    assert s == pytest.approx(2.5, abs=1e-9)


def test_alignment_crop_is_deep3ds_landmark_mapping_and_inverts():
    template = np.array([[-0.3, 0.3, 0.6], [0.3, 0.3, 0.6], [0.0, 0.0, 0.9], [-0.25, -0.4, 0.6], [0.25, -0.4, 0.6]])
    height = 480
    # image points of a face seen frontally: y up in the flipped frame, scale 1.7 px per unit, centre (300, 210)
    flipped = 1.7 * template[:, :2] + [300.0, 210.0]
    image = np.stack([flipped[:, 0], height - 1 - flipped[:, 1]], 1)
    crop = alignment_crop(image, template, height)
    s = 102 / 1.7
    # Deep3D's resize_n_crop_img without its integer truncation: lm' = (lm - t) s + 112, on flipped landmarks
    expected_up = (flipped - [300.0, 210.0]) * s + 112
    crop_points = image @ crop[:2, :2].T + crop[:2, 2]
    np.testing.assert_allclose(crop_points[:, 0], expected_up[:, 0], atol=1e-9)
    np.testing.assert_allclose(crop_points[:, 1], 223 - expected_up[:, 1], atol=1e-9)  # rows point down
    np.testing.assert_allclose(np.linalg.solve(crop, np.c_[crop_points, np.ones(5)].T).T[:, :2], image, atol=1e-9)


def test_world_points_are_the_perspective_projection_through_the_inverse_crop():
    posed = np.array([[[0.1, 0.2, 0.5], [-0.3, -0.1, 0.2], [0.0, 0.0, 0.3]]])
    trans = np.array([[0.0, 0.0, 0.3]])
    crop = np.array([[[2.0, 0.0, -100.0], [0.0, 2.0, -50.0], [0.0, 0.0, 1.0]]])  # crop = 2 image - (100, 50)
    world = to_image(posed, trans, crop)
    for (x, y, z), (wx, wy, wz) in zip(posed[0], world[0]):
        u, v = 1015 * x / (10 - z) + 112, 1015 * y / (10 - z) + 112
        assert wx == pytest.approx((u + 100) / 2) and wy == pytest.approx((223 - v + 50) / 2)
        assert wz == pytest.approx((0.3 - z) * 1015 / 9.7 / 2)  # pixels at the face's depth, away from the camera
    camera = weak_perspective_mat(trans)[0]
    at_depth = camera[:3, :3] @ posed[0, 2] + camera[:3, 3]  # the point at the face's depth: exact
    np.testing.assert_allclose(at_depth, [1015 * 0 / 9.7 + 112, 111.0, 0.0], atol=1e-12)


def test_projected_keypoints_land_on_the_input_landmarks(model_env):
    """A face drawn with the coefficients the generated network predicts: its 68 keypoints, projected and
    put into a frame, are the detector's landmarks; the reconstruction's landmarks come back onto them."""
    layer = BfmLayer(load_bfm(Location(str(model_env)))).double()
    codes = {name: torch.from_numpy(part)[None] for name, part in zip(BFM_CODES, np.split(COEFFICIENTS, np.cumsum(list(BFM_CODES.values()))[:-1]))}
    projected = layer(codes)["landmarks"][0].numpy()  # crop (u, v up)
    input_landmarks = np.stack([(projected[:, 0] + 290) / 1.55, (223 - projected[:, 1] + 140) / 1.55], 1)  # crop = 1.55 image - (290, 140)
    backend = Deep3dBackend.load("cpu")
    backend.detector = FixedLandmarks(input_landmarks)
    frames = np.zeros((2, 480, 640, 3), np.uint8)
    [[face], [again]] = backend.reconstruct(frames, max_faces=1)
    np.testing.assert_array_equal(face.vertices, again.vertices)
    np.testing.assert_allclose(face.codes["exp"][:4], COEFFICIENTS[80:84], atol=1e-6)
    assert face.score == pytest.approx(0.8) and face.vertices.dtype == np.float32 and face.landmarks.shape == (68, 3)
    # exactly the inverse of Deep3D's mapping, with its crop fitted here by least squares (POS) on the 5 points
    flipped = np.c_[input_landmarks[:, 0], 479 - input_landmarks[:, 1]]
    template = np.asarray(__import__("scipy.io").io.loadmat(str(model_env / "BFM" / "similarity_Lm3D_all.mat"))["lm"], float)
    five, five3d = five_points(flipped), five_points(template)
    system = np.zeros((10, 8))
    system[0::2, :3], system[0::2, 3], system[1::2, 4:7], system[1::2, 7] = five3d, 1, five3d, 1
    k = np.linalg.lstsq(system, five.reshape(-1), rcond=None)[0]
    s = 102 / ((np.linalg.norm(k[:3]) + np.linalg.norm(k[4:7])) / 2)
    back = np.stack([(projected[:, 0] - 112) / s + k[3], 479 - ((projected[:, 1] - 112) / s + k[7])], 1)
    np.testing.assert_allclose(face.landmarks[:, :2], back, atol=2e-3)
    # ... which is on the input: the alignment's crop is the one the face was drawn in, up to perspective
    width = np.ptp(input_landmarks[:, 0])
    assert np.abs(face.landmarks[:, :2] - input_landmarks).max() < 0.06 * width
    # mat: the weak-perspective camera at the face's depth, close to the perspective vertices
    template_mesh = Deep3dBackend.topology().template
    local = layer.shape(codes["id"], codes["exp"])[0].numpy()
    affine = local @ face.mat[:3, :3].T.astype(float) + face.mat[:3, 3]
    assert np.abs(affine - face.vertices).max() < 0.05 * width and template_mesh.shape == local.shape


def test_frames_without_a_face_give_no_faces(model_env):
    backend = Deep3dBackend.load("cpu")
    backend.detector = lambda frames, max_faces: [[] for _ in frames]
    assert backend.reconstruct(np.zeros((3, 64, 64, 3), np.uint8), max_faces=1) == [[], [], []]


def test_models_lists_the_bfm_files_present_and_missing(model_root, tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))  # `gmfx models --model-dir` sets it: restored after the test
    result = CliRunner().invoke(app, ["models", "--model-dir", str(model_root)])
    assert result.exit_code == 0, result.output
    assert "deep3d (version deep3d-face_recon_feat0.2_augment-bfm09): 1200 vertices" in result.output
    assert f"present  BFM front model (BFM 2009 + expression bases): {model_root}/BFM/BFM_model_front.mat" in result.output
    result = CliRunner().invoke(app, ["models", "--model-dir", str(tmp_path)])
    assert "MISSING  Deep3DFaceRecon network (epoch_20.pth)" in result.output and "gmfx models import-bfm" in result.output


# -- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_clip(single_face_frames, tmp_path_factory):
    frames = single_face_frames[:N_FRAMES].copy()
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.slow
def test_deep3d_recon_end_to_end_on_s3_lazy_vertices_and_resume(dask_client, model_root, short_clip, tmp_path, s3_root, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="faces", video=str(short_clip))
    recordings = find_recordings(str(tmp_path / "bids"))
    options = {"model_dir": str(model_root)}  # the workers have no GMFX_MODEL_DIR of their own
    out = s3_root.child("derivatives")
    run_decode(recordings, out, client=dask_client, chunk_frames=SEGMENT, segment_frames=SEGMENT, progress=False)

    def run():
        return run_recon(recordings, out, client=dask_client, model="deep3d", device="cpu", segment_frames=SEGMENT,
                         model_options=options, save_vertices=True, progress=False)  # fmt: skip

    def set_worker_model_dir(value):  # the shared workers may carry another model's folder (DECA adopts its own)
        previous = os.environ.get(MODEL_DIR_ENV)
        os.environ.pop(MODEL_DIR_ENV, None) if value is None else os.environ.__setitem__(MODEL_DIR_ENV, value)
        return previous

    previous = dask_client.run(set_worker_model_dir, str(tmp_path / "elsewhere"))
    try:
        [location] = run()
    finally:
        for worker, value in previous.items():
            dask_client.run(set_worker_model_dir, value, workers=[worker])
    assert location.url.startswith("s3://")
    ds = open_dataset(location, stage="recon")
    assert {f"code_{name}" for name in (*BFM_CODES, "crop")} | {"v", "mat", "landmarks"} <= set(ds.data_vars)
    assert ds["code_id"].shape == (N_FRAMES, 1, 80) and ds["v"].shape == (N_FRAMES, 1, 1200, 3)
    assert ds.attrs["topology"] == "bfm-front-1200" and ds.attrs["model_dir"] == str(model_root)
    assert ds["detected"].values.all()  # MediaPipe finds the real face in every frame
    np.testing.assert_allclose(ds["code_trans"].values[:, 0], np.tile(COEFFICIENTS[254:], (N_FRAMES, 1)), atol=1e-6)
    # upright on the real face: eyes above the nose above the mouth, the image's left eye on the left
    points = ds["landmarks"].values[:, 0, :, :2]
    eyes, nose, mouth = points[:, [36, 39, 42, 45]], points[:, 30], points[:, [48, 54]]
    assert np.all((eyes[..., 1].max(axis=1) < nose[:, 1]) & (nose[:, 1] < mouth[..., 1].min(axis=1)))
    assert np.all((eyes[:, 1, 0] < eyes[:, 2, 0]) & (mouth[:, 0, 0] < nose[:, 0]) & (nose[:, 0] < mouth[:, 1, 0]))
    derived = bfm_vertices(ds)
    assert derived.chunks[0] == (SEGMENT, SEGMENT)  # lazy, one task per stored time chunk
    np.testing.assert_allclose(derived.values, ds["v"].values, atol=2e-3)
    from gmfx.models import with_vertices

    codes_only = gmfx.open_recon(location).drop_vars("v")
    np.testing.assert_allclose(with_vertices(codes_only)["v"].values, ds["v"].values, atol=2e-3)

    first_write = {k: v.values.copy() for k, v in ds.data_vars.items() if "time" in v.dims}
    run()  # resume: every region is done, nothing runs, the store is the same
    again = open_dataset(location, stage="recon")
    for name, values in first_write.items():
        np.testing.assert_array_equal(again[name].values, values)
