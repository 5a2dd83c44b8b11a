"""MICA and EMICA on generated official-format files: loaders and strict checks, the ArcFace 5-point
crop against hand-computed points (skimage and SciPy as oracles), MICA's mapping network in NumPy, the
identity pass against per-frame MICA computed here, detail displacements against a functional
re-computation, and the recon stage end to end on a real clip (resume, S3, lazy vertices)."""

import av
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.transform import SimilarityTransform, warp
from typer.testing import CliRunner

from gmfx import ModelError
from gmfx.cli import app
from gmfx.dataset import find_recordings
from gmfx.models._arcface import ARCFACE_TEMPLATE, IResNet100, arcface_crop, arcface_input, five_points
from gmfx.models._files import MODEL_DIR_ENV
from gmfx.models.emica import EmicaBackend, detail_displacements, emica_vertices, load_mica
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import identity_sample, plan_recon, run_recon
from gmfx.storage import Location, open_dataset
from gmfx.testing._emica_files import EMICA_FOLDER, write_emica_model, write_mica_tar
from gmfx.testing._model_files import write_lightning_checkpoint, write_model_dir
from gmfx.testing._videos import write_bids_recording

N_FRAMES = 4
SEGMENT = 2


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("models"), detail=True)  # DECA's detail networks for emica_detail
    write_emica_model(root / "EMICA" / EMICA_FOLDER, jaw=True)
    write_mica_tar(root / "MICA" / "mica.tar")
    return root


@pytest.fixture
def model_env(model_root, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    return model_root


@pytest.fixture(scope="module")
def frames(single_face_frames):
    return single_face_frames[:N_FRAMES].copy()


@pytest.fixture(scope="module")
def emica(model_root):
    import os

    os.environ.setdefault(MODEL_DIR_ENV, str(model_root))
    return EmicaBackend.load("cpu", model_dir=str(model_root))


# -- MICA ----------------------------------------------------------------------------------------------
def test_iresnet100_has_micas_key_layout():
    network = IResNet100().eval()
    state = network.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and state["fc.weight"].shape == (512, 25088)
    assert state["features.running_var"].shape == (512,) and state["layer3.29.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1) and "layer1.1.downsample.0.weight" not in state
    assert sum(1 for k in state if k.endswith("prelu.weight")) == 1 + 3 + 13 + 30 + 3
    with torch.inference_mode():
        assert network(torch.zeros(1, 3, 112, 112)).shape == (1, 512)


def test_mica_tar_loads_strictly_and_ignores_the_flame_buffers(model_root, tmp_path):
    network = load_mica(Location(str(model_root)))  # generator.* (FLAME 2020 buffers) are in the file and ignored
    regressor = {k: v.numpy().astype(np.float64) for k, v in network.regressor.state_dict().items()}
    with torch.inference_mode():
        embedding, shape = network(torch.linspace(-1, 1, 2 * 3 * 112 * 112).reshape(2, 3, 112, 112))
    np.testing.assert_allclose(np.linalg.norm(embedding.numpy(), axis=1), 1, rtol=1e-5)
    x = embedding.numpy().astype(np.float64)  # the mapping network in NumPy: 4 x (linear, LeakyReLU 0.2), linear
    for k in range(4):
        x = x @ regressor[f"network.{k}.weight"].T + regressor[f"network.{k}.bias"]
        x = np.where(x > 0, x, 0.2 * x)
    np.testing.assert_allclose(shape.numpy(), x @ regressor["output.weight"].T + regressor["output.bias"], rtol=1e-4, atol=1e-5)

    broken = tmp_path / "broken"
    (broken / "MICA").mkdir(parents=True)
    arcface = {k: v for k, v in IResNet100().state_dict().items() if k != "fc.bias"}
    torch.save({"arcface": arcface, "flameModel": {"regressor.output.weight": torch.zeros(300, 300)}}, broken / "MICA" / "mica.tar")
    with pytest.raises(ModelError, match=r"missing keys fc\.bias") as info:
        load_mica(Location(str(broken)))
    assert "[arcface]" in str(info.value)
    torch.save({"arcface": {}, "flameModel": {"mapping.weight": torch.zeros(1)}}, broken / "MICA" / "mica.tar")
    with pytest.raises(ModelError, match=r"keys other than regressor\.\* and generator\.\*: mapping\.weight"):
        load_mica(Location(str(broken)))


def test_five_points_and_the_arcface_crop_match_hand_computed_points():
    mediapipe = np.zeros((478, 3))
    for index, point in {158: (100, 50), 144: (100, 70), 386: (160, 48), 374: (160, 72), 4: (130, 90), 78: (110, 120), 308: (150, 122)}.items():
        mediapipe[index, :2] = point
    np.testing.assert_array_equal(five_points(mediapipe), [[100, 60], [160, 60], [130, 90], [110, 120], [150, 122]])
    ibug = np.zeros((68, 2))
    for index, point in {38: (10, 4), 41: (10, 8), 44: (30, 4), 46: (30, 6), 30: (20, 12), 60: (14, 20), 64: (26, 20)}.items():
        ibug[index] = point
    np.testing.assert_array_equal(five_points(ibug), [[10, 6], [30, 5], [20, 12], [14, 20], [26, 20]])

    # points that are the template moved by a known similarity: the crop is that similarity's inverse
    angle, scale, shift = np.radians(25), 2.5, np.array([300.0, 140.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    to_image = np.eye(3)
    to_image[:2, :2], to_image[:2, 2] = scale * rotation, shift
    np.testing.assert_allclose(arcface_crop(points), np.linalg.inv(to_image), atol=1e-9)
    # noisy points: skimage's least-squares similarity (insightface's norm_crop uses it) is the oracle
    noisy = points + np.random.default_rng(0).normal(scale=3.0, size=points.shape)
    expected = SimilarityTransform.from_estimate(noisy, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(arcface_crop(noisy), expected.params, atol=1e-9)
    np.testing.assert_allclose(arcface_crop(np.stack([noisy, points])), np.stack([expected.params, np.linalg.inv(to_image)]), atol=1e-9)


def test_arcface_input_samples_the_frame_bilinearly_and_scales_to_plus_minus_one():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    points = ARCFACE_TEMPLATE * 0.8 + [20.0, 5.0]
    matrix = arcface_crop(points)
    got = arcface_input(torch.from_numpy(frame[None]), torch.from_numpy(matrix[None]), torch.tensor([0]))[0].numpy()
    v, u = np.mgrid[0:112, 0:112].astype(np.float64)
    source = np.linalg.inv(matrix) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    for channel in range(3):
        sampled = ndimage.map_coordinates(frame[..., channel].astype(np.float64), [source[1], source[0]], order=1, mode="constant")
        np.testing.assert_allclose(got[channel].ravel(), sampled / 127.5 - 1, atol=1e-4)


# -- EMICA loader --------------------------------------------------------------------------------------
def test_the_emica_loader_names_the_prefixes_it_expected_and_found(model_root, tmp_path):
    import shutil

    root = tmp_path / "models"
    shutil.copytree(model_root / "FLAME2020", root / "FLAME2020")
    folder = root / "EMICA" / EMICA_FOLDER
    folder.mkdir(parents=True)
    shutil.copy(model_root / "EMICA" / EMICA_FOLDER / "cfg.yaml", folder / "cfg.yaml")
    state = {"face_encoder.mica_deca_encoder.deca_encoder.encoder.layers.0.weight": torch.zeros(2),
             "shape_model.flame.v_template": torch.zeros(3), "renderer.mask": torch.zeros(1)}  # fmt: skip
    write_lightning_checkpoint(folder / "checkpoints", "emica", state)
    with pytest.raises(ModelError) as info:
        EmicaBackend.load("cpu", model_dir=str(root))
    message = str(info.value)
    assert "lacks face_encoder.expression_encoder.encoder.*" in message
    assert "the file holds face_encoder.mica_deca_encoder.deca_encoder.encoder.*, renderer.mask.*, shape_model.flame.*" in message
    state["face_encoder.expression_encoder.encoder.layers.0.weight"] = torch.zeros(2)  # every prefix present ...
    state["face_encoder.swin.weight"] = torch.zeros(1)  # ... and one nobody expects
    write_lightning_checkpoint(folder / "checkpoints", "emica", state)
    with pytest.raises(ModelError, match=r"holds unknown keys face_encoder\.swin\.weight"):
        EmicaBackend.load("cpu", model_dir=str(root))
    (folder / "cfg.yaml").write_text("model:\n  face_encoder:\n    encoders: {}\n")
    with pytest.raises(ModelError, match="cfg.yaml has no EMICA encoder settings"):
        EmicaBackend.load("cpu", model_dir=str(root))


# -- identity --------------------------------------------------------------------------------------------
def _direct_mica(emica, frames):
    """Per frame: MediaPipe detection afresh, the five points, skimage's similarity and bilinear warp,
    (x - 127.5) / 127.5, then the loaded MICA network."""
    import mediapipe as mp

    crops = []
    height, width = frames.shape[1:3]
    for frame in frames:
        with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=1) as mesh:
            landmarks = mesh.process(frame).multi_face_landmarks[0].landmark
        points = np.array([(p.x * width, p.y * height) for p in landmarks])
        five = np.array([points[[158, 144]].mean(0), points[[386, 374]].mean(0), points[4], points[78], points[308]])
        similarity = SimilarityTransform.from_estimate(five, ARCFACE_TEMPLATE)
        crops.append(warp(frame / 255.0, similarity.inverse, output_shape=(112, 112), order=1) * 2 - 1)
    with torch.inference_mode():
        embedding, shape = emica.mica(torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2)).float())
    return embedding.numpy(), shape.numpy()


def test_the_identity_is_the_median_of_micas_per_frame_shapes(emica, frames):
    [identity] = emica.estimate_identity(frames, max_faces=1)
    embedding, shapes = _direct_mica(emica, frames)
    np.testing.assert_array_equal(identity.frames, np.arange(N_FRAMES))  # every frame scores above 0.7
    np.testing.assert_allclose(identity.codes["shape"], np.median(shapes, axis=0), atol=2e-3 * np.abs(shapes).max())
    mean = embedding.mean(axis=0)
    np.testing.assert_allclose(identity.signature, mean / np.linalg.norm(mean), atol=2e-3)
    # the shape changes from frame to frame, so the median is not any single frame's
    assert np.abs(shapes - shapes[0]).max() > 10 * 2e-3 * np.abs(shapes).max()


def test_segments_decode_the_identity_shape_with_the_frames_expression(emica, frames):
    [identity] = emica.estimate_identity(frames, max_faces=1)
    emica.reset()
    faces = emica.reconstruct(frames[:2], max_faces=1, identities=[identity])
    face = faces[0][0]
    assert face.identity == 0 and set(face.codes) == {"exp", "pose", "cam", "tex", "light"} and face.codes["exp"].shape == (100,)
    with torch.inference_mode():
        local, _, _ = emica.flame(torch.from_numpy(identity.codes["shape"][None]), torch.from_numpy(face.codes["exp"][None]),
                                  jaw=torch.from_numpy(face.codes["pose"][None, 3:]))
    world = local[0].double().numpy() @ face.mat[:3, :3].astype(np.float64).T + face.mat[:3, 3]
    np.testing.assert_allclose(face.vertices, world, atol=1e-3)
    with pytest.raises(ModelError, match="got none"):
        emica.reconstruct(frames[:1], max_faces=1, identities=[])


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
def test_emica_recon_end_to_end_resume_detail_on_s3(model_env, short_clip, tmp_path, s3_root):
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="faces", video=str(short_clip))
    recordings = find_recordings(str(tmp_path / "bids"))
    options = {"model_dir": str(model_env)}
    out = Location(str(tmp_path / "out"))
    run_decode(recordings, out, client=None, chunk_frames=SEGMENT, segment_frames=SEGMENT, progress=False)

    def run(model, target, **kwargs):  # threads of this process (the identity stage on a cluster: test_recon_identity)
        return run_recon(recordings, target, client=None, model=model, device="cpu", segment_frames=SEGMENT,
                         model_options=options, progress=False, **kwargs)  # fmt: skip

    [location] = run("emica", out)
    ds = open_dataset(location, stage="recon")
    assert "v" not in ds and ds["identity_shape"].shape == (1, 300) and ds["code_exp"].shape == (N_FRAMES, 1, 100)
    np.testing.assert_array_equal(ds["identity_frame"].values[0, :N_FRAMES], identity_sample(N_FRAMES, 32))
    assert ds["detected"].values.all() and ds.attrs["identity_min_score"] == 0.7

    # resume: a lost segment is the only task planned, and rewrites the same bytes
    import pathlib

    before = {k: v.values.copy() for k, v in ds.data_vars.items() if "time" in v.dims}
    (pathlib.Path(location.url) / "_gmfx" / "regions" / "000001").unlink()
    zattrs = pathlib.Path(location.url) / "zarr.json"
    zattrs.write_text(zattrs.read_text().replace('"gmfx_complete": true', '"gmfx_complete": false'))
    plan = plan_recon(recordings[0], out, model="emica", device="cpu", segment_frames=SEGMENT, model_options=options)
    assert [task.key.rsplit("-", 1)[-1] for task in plan.tasks] == ["000001"]
    run("emica", out)
    again = open_dataset(location, stage="recon")
    for name, values in before.items():
        np.testing.assert_array_equal(again[name].values, values)

    # detail mode on S3 with stored vertices: the same codes plus detail; derived vertices equal the stored
    s3_out = s3_root.child("derivatives")
    run_decode(recordings, s3_out, client=None, chunk_frames=SEGMENT, segment_frames=SEGMENT, progress=False)
    [detail_location] = run("emica_detail", s3_out, save_vertices=True)
    detail = open_dataset(detail_location, stage="recon")
    assert detail_location.url.startswith("s3://") and detail["code_detail"].shape == (N_FRAMES, 1, 128)
    np.testing.assert_array_equal(detail["identity_shape"].values, ds["identity_shape"].values)
    for name in ("code_exp", "code_pose", "code_cam", "mat"):
        np.testing.assert_array_equal(detail[name].values, ds[name].values)
    derived = emica_vertices(ds)
    assert derived.chunks[0] == (SEGMENT,) * (N_FRAMES // SEGMENT)  # lazy, one task per stored time chunk
    np.testing.assert_allclose(derived.values, detail["v"].values, atol=1e-3)

    maps = detail_displacements(detail)  # from an S3 store (values: test_detail_displacements_equal_a_functional_computation)
    assert maps.dims == ("time", "face", "uv_v", "uv_u") and maps.chunks[0] == (SEGMENT,) * (N_FRAMES // SEGMENT)
    expected = _direct_displacements(model_env, detail)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(maps.values[:, 0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _direct_displacements(root, ds):
    """DECA's D_detail written out with torch.nn.functional on the state dict of deca_model.tar."""
    import torch.nn.functional as F

    state = torch.load(root / "DECA" / "deca_model.tar", map_location="cpu", weights_only=True)["D_detail"]
    pose, exp, detail = (torch.from_numpy(ds[n].values[:, 0].astype(np.float32)) for n in ("code_pose", "code_exp", "code_detail"))
    x = torch.cat([pose[:, 3:], exp[:, :50], detail], dim=1) @ state["l1.0.weight"].T + state["l1.0.bias"]
    x = x.view(-1, 128, 8, 8)

    def bn(x, k, eps):
        return F.batch_norm(x, state[f"conv_blocks.{k}.running_mean"], state[f"conv_blocks.{k}.running_var"],
                            state[f"conv_blocks.{k}.weight"], state[f"conv_blocks.{k}.bias"], eps=eps)  # fmt: skip

    x = bn(x, 0, 1e-5)
    for k in (1, 5, 9, 13, 17):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.conv2d(x, state[f"conv_blocks.{k + 1}.weight"], state[f"conv_blocks.{k + 1}.bias"], padding=1)
        x = F.leaky_relu(bn(x, k + 2, 0.8), 0.2)
    x = torch.tanh(F.conv2d(x, state["conv_blocks.21.weight"], state["conv_blocks.21.bias"], padding=1)) * 0.01
    return x[:, 0].numpy()


def test_cli_mode_detail_picks_the_detail_variant_and_models_lists_emica(model_env):
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "emica (version emica-coarse-flame2020)" in result.output and "identity shape (300) per face" in result.output
    assert f"present  EMICA checkpoint ({EMICA_FOLDER})" in result.output and "emica_detail" in result.output
    from gmfx.cli import _model_for_mode

    assert _model_for_mode("emica", "detail") == "emica_detail" and _model_for_mode("deca", "coarse") == "deca"
    with pytest.raises(Exception, match="--mode detail is not available for the model 'mediapipe'") as info:
        _model_for_mode("mediapipe", "detail")
    assert "emica" in str(info.value)


def test_codes_split_in_cfg_order_with_the_expression_encoders_jaw(emica):
    crops = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    codes = emica.encode(crops)
    with torch.inference_mode():
        deca = emica.encoder(crops)  # texcode 50, globalpose 3, cam 3, lightcode 27 (jaw from the expression encoder)
        expression = emica.expression_encoder(crops)  # expcode 100, jawpose 3
    assert list(emica.deca_predicts) == ["texcode", "globalpose", "cam", "lightcode"]
    torch.testing.assert_close(codes["tex"], deca[:, :50])
    torch.testing.assert_close(codes["pose"], torch.cat([deca[:, 50:53], expression[:, 100:103]], dim=1))
    torch.testing.assert_close(codes["cam"], deca[:, 53:56])
    torch.testing.assert_close(codes["light"], deca[:, 56:83])
    torch.testing.assert_close(codes["exp"], expression[:, :100])


def test_detail_displacements_equal_a_functional_computation(model_env):
    import xarray as xr

    rng = np.random.default_rng(3)
    codes = {"code_pose": rng.normal(size=(3, 2, 6)), "code_exp": rng.normal(size=(3, 2, 100)), "code_detail": rng.normal(size=(3, 2, 128))}
    codes["code_detail"][1, 1] = np.nan  # an undetected face stays NaN
    ds = xr.Dataset({k: (("time", "face", k[5:] + "_param"), v.astype(np.float32)) for k, v in codes.items()}).chunk(time=2)
    maps = detail_displacements(ds)
    assert maps.chunks[0] == (2, 1) and maps.shape == (3, 2, 256, 256)
    values = maps.values
    assert np.isnan(values[1, 1]).all()
    for face in range(2):
        rows = [0, 2] if face == 1 else [0, 1, 2]
        expected = _direct_displacements(model_env, ds.isel(time=rows, face=[face]))
        assert np.isfinite(expected).all() and np.abs(expected).max() > 1e-4
        np.testing.assert_allclose(values[rows, face], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
