"""The fitting's pure parts against hand computations: losses, pose chain, batched rendering, options,
and the MediaPipe -> iBUG 68 correspondence."""

import numpy as np
import pytest
import torch

from gmfx.models._fitting import (
    FitOptions,
    Renderer,
    landmark_loss,
    landmark_weights,
    photometric_loss,
    pose_loss,
    reflectance_loss,
)
from gmfx.models._landmarks68 import IBUG_MIRROR, mediapipe_to_ibug68


def test_landmark_weights_follow_the_reference():
    weights = landmark_weights().numpy()
    heavy = [28, 29, 30, *range(48, 68)]
    raw = np.ones(68)
    raw[heavy] = 10
    np.testing.assert_allclose(weights, raw / raw.sum())
    assert weights[29] / weights[0] == pytest.approx(10)


def test_landmark_loss_by_hand():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(2, 68, 2)) * 20, rng.normal(size=(2, 68, 2)) * 20
    w = np.ones(68)
    w[[28, 29, 30, *range(48, 68)]] = 10
    w /= w.sum()
    expected = [sum(w[k] * (((p[b, k] - q[b, k]) / 224) ** 2).sum() for k in range(68)) for b in range(2)]
    got = landmark_loss(torch.tensor(p), torch.tensor(q), 224).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_photometric_loss_is_the_mean_distance_over_rendered_pixels():
    rng = np.random.default_rng(1)
    rendered, image = rng.random((2, 5, 6, 3)), rng.random((2, 5, 6, 3))
    mask = rng.random((2, 5, 6)) > 0.4
    mask[1] = False  # nothing rendered: zero, not NaN
    expected0 = np.mean([np.linalg.norm(rendered[0, i, j] - image[0, i, j]) for i, j in zip(*np.nonzero(mask[0]))])
    got = photometric_loss(torch.tensor(rendered), torch.tensor(image), torch.tensor(mask)).numpy()
    assert got[0] == pytest.approx(expected0, rel=1e-9)
    assert got[1] == 0


def test_reflectance_loss_is_the_skin_albedo_variance():
    rng = np.random.default_rng(2)
    albedo = rng.random((3, 50, 3))
    skin = rng.random(50) > 0.5
    got = reflectance_loss(torch.tensor(albedo), torch.tensor(skin.astype(float))).numpy()
    on_skin = albedo[:, skin]
    expected = ((on_skin - on_skin.mean(axis=1, keepdims=True)) ** 2).sum(-1).mean(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_pose_term_pulls_each_frame_toward_the_previous_one():
    angle = torch.tensor([[0.1, 0, 0], [0.3, 0, 0], [0.3, 0.2, 0]], dtype=torch.float64)
    trans = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [0, 0.5, 1.0]], dtype=torch.float64)
    options = FitOptions(rotation_weight=2.0, translation_weight=3.0)
    before = (torch.tensor([0.0, 0, 0]), torch.tensor([0.0, 0, 0]))
    got = pose_loss(angle, trans, before, options).numpy()
    expected = [2 * 0.1**2 + 3 * 1.0, 2 * 0.2**2, 2 * 0.2**2 + 3 * 0.5**2]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # no previous frame: the first frame is free, the chain still holds
    np.testing.assert_allclose(pose_loss(angle, trans, None, options).numpy(), [0, *expected[1:]], rtol=1e-12)


def test_options_are_checked():
    assert FitOptions.from_options(rigid_iterations=5, photometric=False, landmark_weight=3).rigid_iterations == 5
    with pytest.raises(TypeError, match="rigid_iters"):
        FitOptions.from_options(rigid_iters=5)
    with pytest.raises(ValueError, match="whole number"):
        FitOptions.from_options(rigid_iterations=2.5)
    with pytest.raises(ValueError, match="true or false"):
        FitOptions.from_options(photometric=1)
    with pytest.raises(ValueError, match="finite"):
        FitOptions.from_options(id_weight=-1.0)


def test_batched_rendering_matches_the_rasterizers_barycentrics():
    """All frames through one side-by-side interpolate call equal each frame's raster barycentrics
    (numba's own, computed independently of torch) applied to the colours, and gradients reach the
    vertices of every frame."""
    from gmfx.render import CpuRasterizer

    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(np.linspace(4, 27, 6), np.linspace(5, 26, 6)), -1).reshape(-1, 2)
    r, c = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    a = (r * 6 + c).ravel()
    tris = np.concatenate([np.stack([a, a + 1, a + 6], 1), np.stack([a + 1, a + 7, a + 6], 1)]).astype(np.int32)
    frames = []
    for shift in (0.0, 2.3, -1.7):
        xy = grid + shift + rng.normal(scale=0.3, size=grid.shape)
        frames.append(np.concatenate([xy, rng.random((len(grid), 1)) + 5], 1))
    vertices = torch.tensor(np.stack(frames), dtype=torch.float64, requires_grad=True)
    colours = torch.tensor(rng.random((3, len(grid), 3)))
    rendered, mask = Renderer(tris, torch.device("cpu"))(vertices, colours, 32)
    raster = CpuRasterizer().rasterize(np.stack(frames) + [0.5, 0.5, 0], tris, width=32, height=32)
    for k in range(3):
        expected = np.zeros((32, 32, 3))
        for i, j in zip(*np.nonzero(raster.triangle[k] >= 0)):
            expected[i, j] = raster.barycentric[k, i, j] @ colours[k].numpy()[tris[raster.triangle[k, i, j]]]
        np.testing.assert_allclose(rendered[k].detach().numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(mask[k].numpy(), raster.triangle[k] >= 0)
    rendered.sum().backward()
    assert all(vertices.grad[k].abs().sum() > 0 for k in range(3))


def test_mediapipe_correspondence_is_mirror_symmetric():
    """iBUG's left/right pairs land on mirror images of MediaPipe's symmetric canonical face, its
    midline points on the midline, every row is a convex blend of at most two vertices."""
    from gmfx.models.mediapipe import mediapipe_template

    weights = mediapipe_to_ibug68()
    assert weights.shape == (68, 478)
    np.testing.assert_allclose(weights.sum(1), 1)
    assert (weights >= 0).all() and ((weights > 0).sum(1) <= 2).all()
    points = weights @ mediapipe_template()
    np.testing.assert_allclose(points[IBUG_MIRROR] * [-1, 1, 1], points, atol=1e-6)
    midline = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
    np.testing.assert_allclose(points[midline, 0], 0, atol=1e-6)
    # anatomical anchors: eye and mouth corners, menton, pronasale
    for ibug, vertex in ((36, 33), (39, 133), (42, 362), (45, 263), (48, 61), (54, 291), (8, 152), (30, 4)):
        assert weights[ibug, vertex] == pytest.approx(1)


def test_mediapipe_68_on_a_real_face_come_in_ibug_order(single_face_frames):
    """On frames of the real clip the derived points keep iBUG's layout: jaw from image left to right
    with the chin lowest, eyes above the nose tip above the mouth, corners outside the lids."""
    from gmfx.models._landmarks68 import Landmarks68

    frames = single_face_frames[:40:13].copy()
    found = Landmarks68("mediapipe")(frames, 1)
    for faces in found:
        (points, _), = faces
        x, y = points[:, 0], points[:, 1]
        assert x[0] < x[4] < x[8] < x[12] < x[16] and np.argmax(y[:17]) == 8
        assert x[17] < x[21] < x[22] < x[26]
        assert x[36] < x[39] < x[42] < x[45] and x[48] < x[51] < x[54] and x[60] < x[62] < x[64]
        assert max(y[36:48]) < y[30] < min(y[48:68]) and y[27] < y[28] < y[29] < y[30]
        assert x[36] < x[37] < x[38] < x[39] and x[36] < x[41] < x[40] < x[39]  # lids run outer -> inner, back below
        assert x[42] < x[43] < x[44] < x[45] and x[42] < x[47] < x[46] < x[45]
        assert x[48] < x[59] < x[58] < x[57] < x[56] < x[55] < x[54] and x[60] < x[67] < x[66] < x[65] < x[64]
        assert y[37] < y[41] and y[44] < y[46] and y[51] < y[62] < y[57] and y[51] < y[66] < y[57]


def test_adam_follows_kingma_and_ba():
    """Against Adam written out in NumPy here (Kingma & Ba 2015, Algorithm 1, torch's defaults)."""
    from gmfx.models._fitting import Adam

    rng = np.random.default_rng(4)
    target, weight = rng.normal(size=(3, 5)), np.arange(1.0, 6.0)
    ours = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    optimiser = Adam([ours], lr=0.05)
    theta, m, v = np.zeros((3, 5)), np.zeros((3, 5)), np.zeros((3, 5))
    for t in range(1, 26):
        optimiser.zero_grad()
        (((ours - torch.tensor(target)) ** 2) * torch.tensor(weight)).sum().backward()
        optimiser.step()
        g = 2 * (theta - target) * weight
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        theta = theta - 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(ours.detach().numpy(), theta, rtol=1e-12, atol=1e-14)


def test_two_faces_are_told_apart_by_landmark_shape():
    """Identity pass: detections of two faces (different shapes, positions swapping between frames)
    fall into two groups; segments: each face goes to its identity whatever order the detector gives."""
    from gmfx.models._base import Identity
    from gmfx.models.bfm_fit import assign_faces, best_frames, group_faces, shape_signature

    rng = np.random.default_rng(5)
    round_face, long_face = rng.normal(size=(68, 2)) * [40, 40], rng.normal(size=(68, 2)) * [25, 60]
    frames = []
    for k in range(6):
        a = round_face * (1 + 0.1 * k) + [100 + 30 * k, 100] + rng.normal(scale=0.5, size=(68, 2))
        b = long_face * (1 - 0.05 * k) + [400 - 30 * k, 120] + rng.normal(scale=0.5, size=(68, 2))
        frames.append([(b, 0.8), (a, 0.9)] if k % 2 else [(a, 0.9), (b, 0.8)])
    frames.insert(3, [])  # a frame without a face
    groups = group_faces(frames, max_faces=2)
    assert sorted(len(g) for g in groups) == [6, 6]
    for group in groups:
        signature = shape_signature(np.stack([p for _, p, _ in group]))
        assert min(np.linalg.norm(signature - shape_signature(f[None])) for f in (round_face, long_face)) < 0.1
    identities = [Identity(codes={}, frames=np.arange(1), signature=shape_signature(f[None])) for f in (long_face, round_face)]
    owners = assign_faces(frames, identities)
    assert [i for i, _, _ in owners[0]] == [0, 1, 2, 4, 5, 6] and all(score == 0.8 for _, _, score in owners[0])
    assert all(score == 0.9 for _, _, score in owners[1])
    chosen = best_frames([(i, None, s) for i, s in enumerate([0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.9])], 4)
    assert [i for i, _, _ in chosen] == [0, 1, 5, 6]  # the two best, then the equals spread out
