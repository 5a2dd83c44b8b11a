"""3DMM fitting (``--model bfm-fit``): known coefficients rendered with a generated BFM and fitted back.

The generated model (gmfx.testing.write_bfm_model) is small (1500 vertices) with few components, so
a fit takes seconds. Its bases are smooth random fields that include constant and linear parts, which
trade off against translation and scale, and its identity and expression bases share some fields;
shape is therefore checked through the geometry it produces, texture and pose as coefficients. Its bases move vertices ~10x less per unit than
BFM's, so the priors are weakened 100x here (the defaults would pull the small truths toward zero).
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
WEAK_PRIORS = dict(id_weight=1e-5, exp_weight=0.8e-5, tex_weight=1.7e-8)


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    torch.manual_seed(0)
    path = write_bfm_model(tmp_path_factory.mktemp("bfm") / "BFM_model_front.mat", n_vertices=1500, n_faces=None,
                           n_id=SIZES["id"], n_exp=SIZES["exp"], n_tex=SIZES["tex"], seed=3)
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
    """Landmarks + photometric fit of one rendered frame: geometry within 0.5 px RMS, angles within
    0.01 rad, translation within 0.03 dm (depth 0.1 dm, 1% of the distance), texture within 0.25
    (prior sd 1), albedo within 0.01 RMS (of [0, 1]). In one frame identity and expression are both
    just shape, so they are checked together, through the geometry (the video test separates them)."""
    truth = _truth(1, seed=1)
    targets, renderer, seen = _observe(layer, truth)
    options = FitOptions(first_rigid_iterations=150, first_nonrigid_iterations=150, **WEAK_PRIORS)
    params, losses = fit_identity(bfm_decoder(layer), targets, options, sizes=SIZES, renderer=renderer)
    vertices_px, landmarks_px = _geometry_error(layer, params, seen)
    assert vertices_px < 0.5 and landmarks_px < 0.5
    np.testing.assert_allclose(params["angle"], truth["angle"], atol=0.01)
    np.testing.assert_allclose(params["trans"][:, :2], truth["trans"][:, :2], atol=0.03)
    assert abs(params["trans"][0, 2] - truth["trans"][0, 2]) < 0.1  # depth trades off against the bases' scale fields
    np.testing.assert_allclose(params["tex"], truth["tex"], atol=0.25)
    with torch.no_grad():
        albedo_error = (layer.albedo(params["tex"]) - layer.albedo(truth["tex"])).pow(2).mean().sqrt().item()
    assert albedo_error < 0.01
    assert losses["photometric"].item() < 0.02 and losses["landmark"].item() < 1e-5


def test_video_fit_shares_identity_and_warm_starts(layer):
    """Identity and texture from 3 of 8 frames, then the 8 frames in two batches of 4 with it fixed:
    every frame's pose and geometry come back; the second batch starts from the first one's last frame
    (warm start), and with its 40 iterations alone it does not get there from a cold start."""
    n = 8
    truth = _truth(n, seed=2, smooth=True)
    targets, renderer, seen = _observe(layer, truth)
    decode = bfm_decoder(layer)
    identity_options = FitOptions(first_rigid_iterations=200, first_nonrigid_iterations=200, **WEAK_PRIORS)
    chosen = torch.tensor([0, 3, 6])
    found, _ = fit_identity(decode, targets.select(chosen), identity_options, sizes=SIZES, renderer=renderer)
    np.testing.assert_allclose(found["tex"], truth["tex"], atol=0.25)
    identity = {"id": found["id"], "tex": found["tex"]}

    options = FitOptions(first_rigid_iterations=200, first_nonrigid_iterations=100, rigid_iterations=25, nonrigid_iterations=15, **WEAK_PRIORS)
    first, _ = fit_video(decode, targets.select(slice(0, 4)), identity, options, sizes=SIZES, renderer=renderer)
    start = {name: first[name][-1:] for name in ("exp", "angle", "gamma", "trans")}
    second, losses = fit_video(decode, targets.select(slice(4, 8)), identity, options, sizes=SIZES, renderer=renderer, start=start)
    for name in ("id", "tex"):  # fixed, never re-fitted
        assert torch.equal(first[name], found[name]) and torch.equal(second[name], found[name])
    params = {name: torch.cat([first[name], second[name]]) if name not in ("id", "tex") else found[name] for name in SIZES}
    vertices_px, landmarks_px = _geometry_error(layer, params, seen)
    assert vertices_px < 1.0 and landmarks_px < 1.0
    np.testing.assert_allclose(params["angle"], truth["angle"], atol=0.02)
    assert losses["landmark"].shape == (4,) and torch.isfinite(losses["total"]).all()

    cold = FitOptions(**{**options.__dict__, "first_rigid_iterations": 25, "first_nonrigid_iterations": 15})
    alone, _ = fit_video(decode, targets.select(slice(4, 8)), identity, cold, sizes=SIZES, renderer=renderer)
    cold_px, _ = _geometry_error(layer, {**params, **{k: torch.cat([first[k], alone[k]]) for k in ("exp", "angle", "gamma", "trans")}}, seen)
    assert cold_px > 3 * vertices_px
