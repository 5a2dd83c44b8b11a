"""DECA and EMOCA on generated official-format files: loaders, the network, the camera chain against
DECA's projection by hand (SciPy/skimage as oracles), and the recon stage end to end on a real clip."""

import io

import av
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from skimage.transform import estimate_transform
from typer.testing import CliRunner

import gmfx
from gmfx import ModelError
from gmfx.cli import app
from gmfx.dataset import find_recordings
from gmfx.models._files import MODEL_DIR_ENV, read_model_file
from gmfx.models._crops import box_from_landmarks, square_crop, warp_crops
from gmfx.models._flame import FlameLayer
from gmfx.models._pickle import load_torch
from gmfx.models._resnet import ResNetEncoder, load_strict
from gmfx.models.deca import FLAME_FILE, DecaBackend, flame_vertices
from gmfx.models.emoca import EmocaBackend, best_checkpoint
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, open_dataset
from gmfx.testing._model_files import write_emoca_model, write_model_dir
from gmfx.testing._videos import write_bids_recording

N_FRAMES = 4
SEGMENT = 2


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("models"), detail=False)  # gmfx never reads DECA's detail networks
    write_emoca_model(root / "EMOCA" / "EMOCA_v2_lr_mse_20", n_expression_outputs=53, detail=False)
    return root


@pytest.fixture
def model_env(model_root, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    return model_root


@pytest.fixture(scope="module")
def frames(single_face_frames):
    return single_face_frames[:N_FRAMES].copy()


class FixedLandmarks:
    """A detector giving the same landmarks (one face) in every frame."""

    points = np.array([[250.0, 110.0], [370.0, 130.0], [310.0, 260.0], [260.0, 240.0]])

    def __call__(self, frames, max_faces):
        return [[(self.points, 0.9)] for _ in frames]

    def reset(self):
        pass


# -- network and files ------------------------------------------------------------------------------
def test_resnet_encoder_has_decas_key_layout():
    state = ResNetEncoder(236).state_dict()
    assert len(state) == 322
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["encoder.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["encoder.layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["encoder.layer4.2.bn3.running_var"] == (2048,)
    assert shapes["layers.0.weight"] == (1024, 2048) and shapes["layers.2.weight"] == (236, 1024)
    assert not any(key.startswith("encoder.fc") for key in state)


def test_checkpoint_keys_are_checked_strictly_and_named():
    good = ResNetEncoder(236).state_dict()
    with pytest.raises(ModelError, match=r"missing keys encoder\.bn1\.bias"):
        load_strict(ResNetEncoder(236), {k: v for k, v in good.items() if k != "encoder.bn1.bias"}, where="x")
    with pytest.raises(ModelError, match=r"unexpected keys encoder\.fc\.weight"):
        load_strict(ResNetEncoder(236), {**good, "encoder.fc.weight": torch.zeros(1)}, where="x")
    with pytest.raises(ModelError, match=r"mis-shaped keys layers\.2\.weight \(50, 1024\) \(expected \(236, 1024\)\)"):
        load_strict(ResNetEncoder(236), {**good, "layers.2.weight": torch.zeros(50, 1024)}, where="x")
    buffer = io.BytesIO()
    torch.save({"E_flame": good}, buffer)
    with pytest.raises(ModelError, match="truncated"):
        load_torch(buffer.getvalue()[:-5000], where="deca_model.tar")


def test_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(ModelError, match="FLAME 2020 model is missing") as error:
        read_model_file(Location(str(tmp_path)), FLAME_FILE)
    assert "flame.is.tue.mpg.de" in str(error.value) and str(tmp_path) in str(error.value)


def test_a_deca_file_without_its_encoder_is_refused(model_root, tmp_path):
    (tmp_path / "DECA").mkdir()
    torch.save({"E_detail": {}}, tmp_path / "DECA" / "deca_model.tar")
    with pytest.raises(ModelError, match="lacks 'E_flame'"):
        DecaBackend._load_encoder(Location(str(tmp_path)))


def test_fan_detector_without_weights_says_what_to_download(model_env, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"FAN weights.*2DFAN4-11f355bf06\.pth\.tar") as error:
        DecaBackend.load("cpu", detector="fan")
    assert "--detector mediapipe" in str(error.value)


# -- the camera chain --------------------------------------------------------------------------------
def _deca_by_hand(layer, codes, points):
    """DECA's decode and projection into the original image, written from its description."""
    box_low, box_high = points.min(0), points.max(0)
    size = int((box_high - box_low).sum() / 2 * 1.1 * 1.25)
    centre = (box_low + box_high) / 2
    corners = np.array([centre - size / 2, [centre[0] - size / 2, centre[1] + size / 2], [centre[0] + size / 2, centre[1] - size / 2]])
    tform = estimate_transform("similarity", corners, np.array([[0, 0], [0, 223], [223, 0]]))
    t = {k: torch.from_numpy(v[None]).double() for k, v in codes.items()}
    posed, _, _ = layer(t["shape"], t["exp"], global_pose=t["pose"][:, :3], jaw=t["pose"][:, 3:])
    s, tx, ty = codes["cam"].astype(np.float64)
    proj = s * (posed[0].numpy()[:, :2] + [tx, ty])
    proj[:, 1] = -proj[:, 1]
    return tform.inverse(proj * 112 + 112), -s * posed[0].numpy()[:, 2] * 112 / tform.scale


def test_deca_meshes_are_decas_projection_into_the_frame(model_env, frames):
    backend = DecaBackend.load("cpu")
    backend.detector = FixedLandmarks()
    first = backend.reconstruct(frames[:2], max_faces=1)
    again = backend.reconstruct(frames[:2], max_faces=1)
    face = first[0][0]
    np.testing.assert_array_equal(face.vertices, again[0][0].vertices)  # deterministic
    assert face.vertices.dtype == np.float32 and face.mat.dtype == np.float32 and face.score == 0.9
    assert {k: v.shape for k, v in face.codes.items()} == {"shape": (100,), "tex": (50,), "exp": (50,), "pose": (6,), "cam": (3,), "light": (27,)}
    layer = FlameLayer(_model(model_env)).double()
    xy, z = _deca_by_hand(layer, face.codes, FixedLandmarks.points)
    np.testing.assert_allclose(face.vertices[:, :2], xy, atol=2e-3)
    np.testing.assert_allclose(face.vertices[:, 2], z, atol=2e-3)


def _model(root):
    from gmfx.models.deca import load_flame_model

    return load_flame_model(Location(str(root)))


def test_emoca_takes_expression_and_jaw_from_its_expression_encoder(model_env, frames):
    backend = EmocaBackend.load("cpu")
    backend.detector = FixedLandmarks()
    face = backend.reconstruct(frames[:1], max_faces=1)[0][0]
    assert backend.jaw_from_expression and not backend.global_from_expression
    centre, size = box_from_landmarks(FixedLandmarks.points)
    crop = warp_crops(torch.from_numpy(frames[:1]), torch.from_numpy(square_crop(centre, size)[None]), torch.tensor([0]))
    with torch.inference_mode():
        deca_code, expression = backend.encoder(crop)[0].numpy(), backend.expression_encoder(crop)[0].numpy()
    np.testing.assert_allclose(face.codes["exp"], expression[:50], atol=1e-6)
    np.testing.assert_allclose(face.codes["pose"], np.r_[deca_code[200:203], expression[50:53]], atol=1e-6)
    np.testing.assert_allclose(face.codes["shape"], deca_code[:100], atol=1e-6)


def test_emoca_checkpoint_choice_and_config_mismatch(model_root, tmp_path):
    assert best_checkpoint(["a/deca-epoch=03-val_loss=0.87.ckpt", "a/deca-epoch=01-val_loss=0.41.ckpt", "a/last.ckpt"]).endswith("0.41.ckpt")
    folder = write_emoca_model(tmp_path / "EMOCA" / "EMOCA", n_expression_outputs=56, version=1, detail=False)
    config = (folder / "cfg.yaml").read_text().replace("exp_deca_global_pose: true", "exp_deca_global_pose: false")
    (folder / "cfg.yaml").write_text(config)
    with pytest.raises(ModelError, match="expression encoder has 56 outputs, but cfg.yaml implies 53"):
        EmocaBackend._load_emoca(Location(str(tmp_path)), "EMOCA")


# -- CLI -------------------------------------------------------------------------------------------
def test_models_lists_present_and_missing_files_and_imports_flame(model_root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["models", "--model-dir", str(model_root)])
    assert result.exit_code == 0, result.output
    assert f"present  DECA model: {model_root}/DECA/deca_model.tar" in result.output
    assert "MISSING  EMOCA configuration (EMOCA) (EMOCA/EMOCA/cfg.yaml): register at https://emoca.is.tue.mpg.de" in result.output
    assert "deca (version deca-coarse-flame2020): 612 vertices" in result.output
    out = tmp_path / "models"
    result = runner.invoke(app, ["models", "import-flame", str(model_root / "FLAME2020" / "generic_model.pkl"), "--model-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "FLAME2020" / "generic_model.npz").exists()
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    result = runner.invoke(app, ["models", "import-flame", str(bad), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 1 and "posix.system" not in result.output and "os.system" in result.output
    assert not (tmp_path / "x.npz").exists()


# -- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_clip(frames, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.slow
def test_deca_recon_end_to_end_on_s3_lazy_vertices_and_resume(dask_client, model_root, short_clip, tmp_path, s3_root, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="faces", video=str(short_clip))
    recordings = find_recordings(str(tmp_path / "bids"))
    options = {"model_dir": str(model_root)}  # the workers have no GMFX_MODEL_DIR of their own
    out = s3_root.child("derivatives")
    run_decode(recordings, out, client=dask_client, chunk_frames=SEGMENT, segment_frames=SEGMENT, progress=False)

    def run():
        return run_recon(recordings, out, client=dask_client, model="deca", device="cpu", segment_frames=SEGMENT,
                     model_options=options, save_vertices=True, progress=False)  # fmt: skip

    [location] = run()
    assert location.url.startswith("s3://")
    ds = open_dataset(location, stage="recon")
    assert {"v", "mat", "landmarks", "code_shape", "code_exp", "code_pose", "code_cam", "code_tex", "code_light"} <= set(ds.data_vars)
    assert ds["code_shape"].shape == (N_FRAMES, 1, 100) and ds["v"].shape == (N_FRAMES, 1, 612, 3)
    assert ds.attrs["topology"] == "flame2020-612" and ds.attrs["model_dir"] == str(model_root)
    assert ds["detected"].values.all() and np.isfinite(ds["code_exp"].values).all()
    derived = flame_vertices(ds)
    assert derived.chunks[0] == (SEGMENT, SEGMENT)  # lazy, one task per stored time chunk
    np.testing.assert_allclose(derived.values, ds["v"].values, atol=1e-3)

    codes_only = gmfx.open_recon(location).drop_vars("v")
    from gmfx.models import with_vertices

    np.testing.assert_allclose(with_vertices(codes_only)["v"].values, ds["v"].values, atol=1e-3)
    aligned = gmfx.align(with_vertices(codes_only), reference="mat")
    assert np.isfinite(aligned["v"].values).all()

    first_write = {k: v.values.copy() for k, v in ds.data_vars.items() if "time" in v.dims}
    run()  # resume: every region is done, nothing runs, the store is the same
    again = open_dataset(location, stage="recon")
    for name, values in first_write.items():
        np.testing.assert_array_equal(again[name].values, values)


def test_codes_only_stores_lay_out_codes_without_vertices(model_env):
    import xarray as xr

    from gmfx.stages.recon import recon_template

    frames = xr.Dataset(coords={"time": np.arange(10.0), "frame": ("time", np.arange(10))})
    lean = recon_template(DecaBackend, frames, max_faces=2, region_frames=5, store_vertices=False)
    full = recon_template(DecaBackend, frames, max_faces=2, region_frames=5, store_vertices=True)
    assert "v" not in lean and full["v"].shape == (10, 2, 612, 3)
    per_frame = sum(lean[n].dtype.itemsize * int(np.prod(lean[n].shape[1:])) for n in lean.data_vars if "time" in lean[n].dims)
    assert per_frame / 2 < 2048  # codes, mat, score and landmarks: under 2 KB a face and frame


def test_rotation_about_the_root_joint_is_in_mat(model_env, frames):
    backend = DecaBackend.load("cpu")
    backend.detector = FixedLandmarks()
    face = backend.reconstruct(frames[:1], max_faces=1)[0][0]
    global_rotation = Rotation.from_rotvec(face.codes["pose"][:3].astype(np.float64)).as_matrix()
    scale = np.cbrt(np.linalg.det(face.mat[:3, :3].astype(np.float64)))
    flip = np.diag([1.0, -1.0, -1.0])  # DECA's y/z flip into image axes
    np.testing.assert_allclose(face.mat[:3, :3] / scale, flip @ global_rotation, atol=1e-5)
