"""3DMM fitting (``--model bfm-fit``): known coefficients rendered with a generated BFM and fitted back.

The generated model (gmfx.testing.write_bfm_model) is small (1500 vertices) with few components, so
a fit takes seconds. Its bases are smooth random fields that include constant and linear parts, which
trade off against translation and scale, and its identity and expression bases share some fields;
shape is therefore checked through the geometry it produces, texture and pose as coefficients. Its bases move vertices ~10x less per unit than
BFM's, so the priors are weakened 100x here (the defaults would pull the small truths toward zero), and
the steps are 3x the reference's, so that a hundred iterations converge.
"""

import numpy as np
import pytest
import torch

from gmfx.models._bfm import BfmLayer, read_bfm
from gmfx.models._fitting import FitOptions, Renderer, Targets, fit_identity, fit_video
from gmfx.models.bfm_fit import bfm_decoder
from gmfx.testing import write_bfm_model

SIZES = {"id": 6, "exp": 4, "tex": 5, "angle": 3, "gamma": 27, "trans": 3}
#: a 112-pixel crop (Deep3D's camera at half scale: the photometric term costs a quarter of 224's)
SIZE, FOCAL = 112, 1015.0 / 2
#: ... and 3x the reference's step sizes, so that a hundred iterations converge
WEAK_PRIORS = dict(id_weight=1e-5, exp_weight=0.8e-5, tex_weight=1.7e-8, rigid_lr=0.03, nonrigid_lr=0.03)


def _without_similarity(content: dict) -> dict:
    """The file's shape bases with the 7 similarity fields of the mean shape (3 shifts, 3 small
    rotations, scale) projected out, and the expression bases also without the identity directions:
    as in BFM, whose bases come from aligned scans, no code can imitate a pose."""
    mean = content["meanshape"].reshape(-1, 3).astype(np.float64)
    mean = mean - mean.mean(axis=0)
    n = len(mean)
    shifts = [np.tile(axis, n) for axis in np.eye(3)]
    turns = [np.cross(axis, mean).reshape(-1) for axis in np.eye(3)]
    q, _ = np.linalg.qr(np.stack([*shifts, *turns, mean.reshape(-1)], axis=1))
    identity = content["idBase"] - q @ (q.T @ content["idBase"])
    q_all, _ = np.linalg.qr(np.concatenate([q, identity], axis=1))
    expression = content["exBase"] - q_all @ (q_all.T @ content["exBase"])
    return {**content, "idBase": identity.astype(np.float32), "exBase": expression}


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    import scipy.io

    path = write_bfm_model(tmp_path_factory.mktemp("bfm") / "BFM_model_front.mat", n_vertices=1500, n_faces=None,
                           n_id=SIZES["id"], n_exp=SIZES["exp"], n_tex=SIZES["tex"], seed=3)
    content = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    scipy.io.savemat(path, _without_similarity(content))
    return BfmLayer(read_bfm(path.read_bytes(), where=str(path)), focal=FOCAL, centre=SIZE / 2)


def _truth(n: int, seed: int, *, smooth: bool = False) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)

    def draw(shape, scale):
        return torch.tensor(rng.normal(scale=scale, size=shape), dtype=torch.float32)

    truth = {"id": draw((1, SIZES["id"]), 0.7), "tex": draw((1, SIZES["tex"]), 0.7)}
    if smooth:  # a head turning and a face changing slowly over n frames
        t = torch.linspace(0, 1, n)[:, None]
        truth["exp"] = draw((1, SIZES["exp"]), 1.0) * (1 - t) + draw((1, SIZES["exp"]), 1.0) * t
        truth["angle"] = torch.tensor([0.05, -0.2, 0.02]) + t * torch.tensor([0.05, 0.3, -0.04])
        truth["trans"] = torch.tensor([0.05, -0.03, 0.1]) + t * torch.tensor([0.06, 0.04, -0.1])
        truth["gamma"] = draw((1, 27), 0.1).expand(n, -1).clone()
    else:
        truth.update(exp=draw((n, SIZES["exp"]), 1.0), angle=draw((n, 3), 0.12), trans=draw((n, 3), 0.1), gamma=draw((n, 27), 0.1))
    return truth


def _observe(layer, truth) -> tuple[Targets, Renderer, object]:
    decode = bfm_decoder(layer)
    renderer = Renderer(layer.triangles.numpy(), torch.device("cpu"))
    with torch.no_grad():
        seen = decode(truth, True)
        image, _ = renderer(seen.vertices, seen.colours, SIZE)
    return Targets(seen.landmarks.clone(), SIZE, image.clone()), renderer, seen


def _geometry_error(layer, params, seen) -> tuple[float, float]:
    """RMS distance (crop pixels) of all projected vertices and of the 68 landmarks."""
    with torch.no_grad():
        fitted = bfm_decoder(layer)(params, True)
    vertices = ((fitted.vertices[..., :2] - seen.vertices[..., :2]) ** 2).sum(-1).mean().sqrt().item()
    landmarks = ((fitted.landmarks - seen.landmarks) ** 2).sum(-1).mean().sqrt().item()
    return vertices, landmarks


def test_one_frame_fit_recovers_known_coefficients(layer):
    """Landmarks + photometric fit of one rendered frame: geometry within 0.5 px RMS (all vertices and
    the 68 landmarks), angles within 0.02 rad, translation within 0.03 dm (depth 0.2 dm, 2% of the
    distance), texture within 0.25 (prior sd 1), albedo within 0.01 RMS (of [0, 1]). The generated
    identity and expression bases overlap, and small rotations are linear fields they contain, so shape
    is checked through the geometry, and angles to 0.02 rad only."""
    truth = _truth(1, seed=1)
    targets, renderer, seen = _observe(layer, truth)
    options = FitOptions(first_rigid_iterations=100, first_nonrigid_iterations=80, **WEAK_PRIORS)
    params, losses = fit_identity(bfm_decoder(layer), targets, options, sizes=SIZES, renderer=renderer)
    vertices_px, landmarks_px = _geometry_error(layer, params, seen)
    assert vertices_px < 0.5 and landmarks_px < 0.5
    np.testing.assert_allclose(params["angle"], truth["angle"], atol=0.02)
    np.testing.assert_allclose(params["trans"][:, :2], truth["trans"][:, :2], atol=0.03)
    assert abs(params["trans"][0, 2] - truth["trans"][0, 2]) < 0.2  # depth trades off against the bases' scale fields
    np.testing.assert_allclose(params["tex"], truth["tex"], atol=0.25)
    with torch.no_grad():
        albedo_error = (layer.albedo(params["tex"]) - layer.albedo(truth["tex"])).pow(2).mean().sqrt().item()
    assert albedo_error < 0.01
    assert losses["photometric"].item() < 0.02 and losses["landmark"].item() < 1e-5


@pytest.mark.slow
def test_video_fit_shares_identity_and_warm_starts(layer):
    """Identity and texture from 3 of 8 frames, then the 8 frames in two batches of 4 with it fixed:
    every frame's geometry comes back within 1 px RMS (all vertices), texture within 0.25, angles within
    0.06 rad (small rotations are linear fields, which the generated bases contain, so they trade off
    against shape). The second batch starts from the first one's last frame: with no iterations at all
    it sits there, 2x closer to the truth than a cold start at the mean face."""
    n = 8
    truth = _truth(n, seed=2, smooth=True)
    targets, renderer, seen = _observe(layer, truth)
    decode = bfm_decoder(layer)
    identity_options = FitOptions(first_rigid_iterations=100, first_nonrigid_iterations=80, **WEAK_PRIORS)
    found, _ = fit_identity(decode, targets.select(torch.tensor([0, 3, 6])), identity_options, sizes=SIZES, renderer=renderer)
    np.testing.assert_allclose(found["tex"], truth["tex"], atol=0.25)
    identity = {"id": found["id"], "tex": found["tex"]}

    options = FitOptions(first_rigid_iterations=100, first_nonrigid_iterations=40, rigid_iterations=50, nonrigid_iterations=30, **WEAK_PRIORS)
    first, _ = fit_video(decode, targets.select(slice(0, 4)), identity, options, sizes=SIZES, renderer=renderer)
    start = {name: first[name][-1:] for name in ("exp", "angle", "gamma", "trans")}
    second, losses = fit_video(decode, targets.select(slice(4, 8)), identity, options, sizes=SIZES, renderer=renderer, start=start)
    for name in ("id", "tex"):  # fixed, never re-fitted
        assert torch.equal(first[name], found[name]) and torch.equal(second[name], found[name])
    params = {name: torch.cat([first[name], second[name]]) if name not in ("id", "tex") else found[name] for name in SIZES}
    vertices_px, landmarks_px = _geometry_error(layer, params, seen)
    assert vertices_px < 1.0 and landmarks_px < 1.0
    np.testing.assert_allclose(params["angle"], truth["angle"], atol=0.06)
    assert losses["landmark"].shape == (4,) and torch.isfinite(losses["total"]).all()

    still = FitOptions(**{**options.__dict__, "rigid_iterations": 0, "nonrigid_iterations": 0, "first_rigid_iterations": 0,
                          "first_nonrigid_iterations": 0})
    later = type(seen)(*(getattr(seen, field)[4:] for field in ("landmarks", "vertices", "colours", "albedo")))
    warm, _ = fit_video(decode, targets.select(slice(4, 8)), identity, still, sizes=SIZES, start=start)
    cold, _ = fit_video(decode, targets.select(slice(4, 8)), identity, still, sizes=SIZES)
    np.testing.assert_array_equal(warm["angle"], start["angle"].expand(4, -1))
    assert _geometry_error(layer, warm, later)[0] * 2 < _geometry_error(layer, cold, later)[0]


# -- the backend on real frames ---------------------------------------------------------------------
N_FRAMES, SEGMENT = 6, 3
#: a few iterations: these tests check the plumbing, the recovery tests above the fitting
QUICK = {"first_rigid_iterations": 60, "first_nonrigid_iterations": 4, "rigid_iterations": 8, "nonrigid_iterations": 3}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "BFM").mkdir()
    write_bfm_model(root / "BFM" / "BFM_model_front.mat", n_vertices=1500, n_faces=None)  # 80 / 64 / 80 components
    return root


@pytest.fixture(scope="module")
def clip_frames(single_face_frames):
    return single_face_frames[:N_FRAMES].copy()


@pytest.mark.slow
def test_frames_without_a_face_give_no_face_and_the_fit_goes_on(model_root, clip_frames, data_dir):
    """Frames of a faceless video between real ones: no face there (the stage writes NaN rows), the
    fit of the others is unaffected, and an identity pass over faceless frames finds nobody."""
    import av

    from gmfx.models.bfm_fit import BfmFitBackend

    with av.open(str(data_dir / "no_face.mp4")) as container:
        empty = np.stack([f.to_ndarray(format="rgb24")[:360, :640] for _, f in zip(range(2), container.decode(video=0))])
    backend = BfmFitBackend.load("cpu", model_dir=str(model_root), landmarks="mediapipe", **QUICK)
    assert backend.estimate_identity(empty, max_faces=1) == []
    [identity] = backend.estimate_identity(clip_frames[:3], max_faces=1)
    assert set(identity.codes) == {"id", "tex"} and identity.codes["id"].shape == (80,)
    mixed = np.concatenate([clip_frames[:2], empty, clip_frames[2:4]])
    backend.reset()
    found = backend.reconstruct(mixed, max_faces=1, identities=[identity])
    assert [len(faces) for faces in found] == [1, 1, 0, 0, 1, 1]
    for faces in (found[0], found[1], found[4], found[5]):
        face = faces[0]
        assert face.identity == 0 and np.isfinite(face.vertices).all() and face.landmarks.shape == (68, 3)
        assert set(face.codes) == {"exp", "angle", "gamma", "trans", "crop", "fit_loss"}
        assert face.codes["fit_loss"][0] < 25  # RMS landmark distance in pixels of the 640 x 360 frame, after a few iterations


@pytest.fixture(scope="module")
def short_clip(clip_frames, tmp_path_factory):
    import av

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = clip_frames.shape[2], clip_frames.shape[1], "yuv420p"
        for frame in clip_frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.slow
def test_bfm_fit_end_to_end_on_s3_lazy_vertices_and_resume(model_root, short_clip, tmp_path, s3_root, monkeypatch):
    """decode -> recon --model bfm-fit on S3 (in-process tasks: the worker placement is the stage's,
    tested with the identity stage): identity once per recording, codes per frame, QC losses; lazy vertices equal the stored ones; a segment whose marker is gone is redone
    bit for bit from the stored identity."""
    import s3fs

    import gmfx
    from gmfx.dataset import find_recordings
    from gmfx.models import with_vertices
    from gmfx.models._files import MODEL_DIR_ENV
    from gmfx.models.bfm_fit import bfm_fit_vertices
    from gmfx.stages.decode import run_decode
    from gmfx.stages.recon import run_recon
    from gmfx.storage import open_dataset
    from gmfx.testing._videos import write_bids_recording

    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="faces", video=str(short_clip))
    recordings = find_recordings(str(tmp_path / "bids"))
    options = {"model_dir": str(model_root), "landmarks": "mediapipe", **QUICK}
    out = s3_root.child("derivatives")
    run_decode(recordings, out, client=None, chunk_frames=SEGMENT, segment_frames=SEGMENT, progress=False)

    def run():
        return run_recon(recordings, out, client=None, model="bfm-fit", device="cpu", segment_frames=SEGMENT,
                         model_options=options, save_vertices=True, progress=False)

    [location] = run()
    ds = open_dataset(location, stage="recon")
    assert {"v", "mat", "landmarks", "code_exp", "code_angle", "code_gamma", "code_trans", "code_crop", "code_fit_loss",
            "identity_id", "identity_tex", "identity_frame"} <= set(ds.data_vars)
    assert ds["identity_id"].shape == (1, 80) and ds["code_exp"].shape == (N_FRAMES, 1, 64) and ds["v"].shape == (N_FRAMES, 1, 1500, 3)
    assert ds["detected"].values.all() and np.isfinite(ds["code_fit_loss"].values).all()
    assert ds.attrs["fit_loss_terms"][0] == "landmark_px" and (ds["code_fit_loss"].values[..., 0] < 25).all()
    np.testing.assert_array_equal(ds["identity_frame"].values[0, :N_FRAMES], np.arange(N_FRAMES))
    np.testing.assert_allclose(bfm_fit_vertices(ds).values, ds["v"].values, atol=1e-3)
    codes_only = gmfx.open_recon(location).drop_vars("v")
    np.testing.assert_allclose(with_vertices(codes_only)["v"].values, ds["v"].values, atol=1e-3)

    first_write = {k: v.values.copy() for k, v in ds.data_vars.items() if "time" in v.dims}
    fs = s3fs.S3FileSystem(**location.storage_options)
    fs.rm(f"{location.url.removeprefix('s3://')}/_gmfx/regions/000001")  # the second segment is lost
    run()
    again = open_dataset(location, stage="recon")
    for name, values in first_write.items():
        np.testing.assert_array_equal(again[name].values, values)


class _KnownLandmarks:
    """A detector that returns given 68 landmarks (one face) in every frame."""

    def __init__(self, points):
        self.points = points

    def __call__(self, frames, max_faces):
        return [[(self.points[i], 0.9)] for i in range(len(frames))]

    def reset(self):
        pass


def test_meshes_land_on_the_frame_where_the_camera_puts_them(model_root, monkeypatch):
    """A face posed with known identity and pose, projected by hand (C.3: u = 1015 x / (10 - z) + 112, row = 223 - v,
    then frame = (crop - offset) / k) into a 640 x 360 frame: the backend's fitted landmarks and every
    vertex land within 0.5 px of it, and ``mat @ local`` (weak perspective) within 4% of the face's size."""
    import gmfx.models.bfm_fit as bfm_fit

    layer = bfm_fit._layer_of(bfm_fit.resolve_model_dir(str(model_root)))
    rng = np.random.default_rng(7)
    truth = {"id": rng.normal(scale=0.3, size=(1, 80)), "exp": np.zeros((2, 64)),  # 68 points cannot pin 64 expressions' other vertices
             "angle": np.array([[0.1, -0.25, 0.05], [0.05, 0.2, -0.1]]), "trans": np.array([[0.05, 0.02, 0.1], [-0.1, 0.05, -0.2]])}
    crop = np.array([[224 / 300, -170 * 224 / 300, -30 * 224 / 300], [224 / 260, -300 * 224 / 260, -60 * 224 / 260]])

    def rotation(a):  # Rz Ry Rx, written out
        cx, cy, cz, sx, sy, sz = *np.cos(a), *np.sin(a)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        return rz @ ry @ rx

    mean = layer.mean_shape.double().numpy()
    frame_vertices = []
    for b in range(2):
        local = mean + layer.id_base.double().numpy() @ truth["id"][0] + layer.exp_base.double().numpy() @ truth["exp"][b]
        posed = local @ rotation(truth["angle"][b]).T + truth["trans"][b]
        u = 1015 * posed[:, 0] / (10 - posed[:, 2]) + 112
        row = 223 - (1015 * posed[:, 1] / (10 - posed[:, 2]) + 112)
        frame_vertices.append(np.stack([(u - crop[b, 1]) / crop[b, 0], (row - crop[b, 2]) / crop[b, 0]], axis=1))
    frame_vertices = np.stack(frame_vertices)
    keypoints = layer.keypoints.numpy()
    monkeypatch.setattr(bfm_fit, "crop_parameters", lambda points: crop[: len(points)])
    backend = bfm_fit.BfmFitBackend.load("cpu", model_dir=str(model_root), landmarks="mediapipe", photometric=False,
                                         first_rigid_iterations=300, first_nonrigid_iterations=100, rigid_iterations=100,
                                         nonrigid_iterations=100, rotation_weight=0.0, translation_weight=0.0)  # two unrelated poses
    backend.landmarks = _KnownLandmarks(frame_vertices[:, keypoints])
    identity = bfm_fit.Identity(codes={"id": truth["id"][0].astype(np.float32), "tex": np.zeros(80, np.float32)}, frames=np.arange(1))
    found = backend.reconstruct(np.zeros((2, 360, 640, 3), np.uint8), max_faces=1, identities=[identity])
    for b, (face,) in enumerate(found):
        np.testing.assert_allclose(face.landmarks[:, :2], frame_vertices[b, keypoints], atol=0.5)
        np.testing.assert_allclose(face.vertices[:, :2], frame_vertices[b], atol=0.5)
        local = layer.shape(torch.tensor(truth["id"], dtype=torch.float32), torch.tensor(face.codes["exp"])[None])[0].double().numpy()
        weak = local @ face.mat[:3, :3].T.astype(np.float64) + face.mat[:3, 3]
        size = np.ptp(frame_vertices[b], axis=0).max()
        assert np.abs(weak[:, :2] - face.vertices[:, :2]).max() < 0.04 * size
