"""The CPU rasterizer against hand-computed cases and a slow per-pixel reference written here; the
differentiable torch path against finite differences; nvdiffrast against the CPU (GPU only)."""

import numpy as np
import pytest

from gmfx import ParameterError
from gmfx.render import CpuRasterizer, get_rasterizer, interpolate, interpolate_attributes, shade

CPU = CpuRasterizer()


def raster_one(vertices, tris, width, height, cull="none"):
    return CPU.rasterize(np.asarray(vertices, np.float32)[None], np.asarray(tris), width=width, height=height, cull=cull)


def reference_raster(vertices, tris, width, height):
    """Per pixel, per triangle, in float64: the nearest triangle whose closed interior holds the centre."""
    triangle = np.full((height, width), -1)
    depth = np.full((height, width), np.inf)
    weights = np.zeros((height, width, 3))
    for i in range(height):
        for j in range(width):
            p = np.array([j + 0.5, i + 0.5])
            for f, (a, b, c) in enumerate(tris):
                A, B, C = vertices[a].astype(np.float64), vertices[b].astype(np.float64), vertices[c].astype(np.float64)
                matrix = np.array([[A[0], B[0], C[0]], [A[1], B[1], C[1]], [1.0, 1.0, 1.0]])
                if abs(np.linalg.det(matrix)) < 1e-12:
                    continue
                w = np.linalg.solve(matrix, [p[0], p[1], 1.0])
                if (w >= -1e-9).all():
                    z = w @ [A[2], B[2], C[2]]
                    if z < depth[i, j]:
                        depth[i, j], triangle[i, j], weights[i, j] = z, f, w
    return triangle, weights, depth


def test_a_triangle_covers_exactly_the_pixel_centres_inside_it_edges_included():
    # corners (0,0), (4,0), (0,4): centre (j+0.5, i+0.5) is inside when i + j <= 3 (i + j = 3 lies on the edge)
    raster = raster_one([[0, 0, 1], [4, 0, 1], [0, 4, 1]], [[0, 1, 2]], 6, 6)
    i, j = np.mgrid[:6, :6]
    np.testing.assert_array_equal(raster.mask[0], i + j <= 3)
    assert (raster.triangle[0][raster.mask[0]] == 0).all()
    assert np.isinf(raster.depth[0][~raster.mask[0]]).all()


def test_the_nearer_of_two_overlapping_triangles_wins_whatever_their_order():
    square = [[0, 0], [8, 0], [0, 8]]
    near = [[x, y, 1.0] for x, y in square]
    far = [[x, y, 2.0] for x, y in square]
    for order in ([far, near], [near, far]):
        vertices = np.array(order[0] + order[1])
        raster = raster_one(vertices, [[0, 1, 2], [3, 4, 5]], 8, 8)
        expected = 1 if order[0] is far else 0
        assert (raster.triangle[0][raster.mask[0]] == expected).all()
        np.testing.assert_allclose(raster.depth[0][raster.mask[0]], 1.0)


def test_barycentric_colours_equal_the_hand_computed_mix():
    # corners red (0,0), green (8,0), blue (0,8); pixel row 1, column 2 has centre (2.5, 1.5):
    # green weight x/8, blue weight y/8, red the rest
    raster = raster_one([[0, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]], 8, 8)
    colours = np.eye(3, dtype=np.float32)
    image = interpolate_attributes(raster, np.array([[0, 1, 2]]), colours)[0]
    np.testing.assert_allclose(image[1, 2], [1 - 4 / 8, 2.5 / 8, 1.5 / 8], rtol=1e-6)
    np.testing.assert_allclose(raster.barycentric[0, 1, 2], [0.5, 2.5 / 8, 1.5 / 8], rtol=1e-6)
    assert (image[7, 7] == 0).all()  # outside the triangle


def test_back_faces_are_culled_only_when_asked():
    # (b - a) x (c - a) < 0 in pixel coordinates (y down): counter-clockwise on screen, front facing
    front = [[0, 0, 0], [0, 6, 0], [6, 0, 0]]
    back = [[0, 0, 0], [6, 0, 0], [0, 6, 0]]
    assert raster_one(front, [[0, 1, 2]], 8, 8, cull="back").mask.sum() > 0
    assert raster_one(back, [[0, 1, 2]], 8, 8, cull="back").mask.sum() == 0
    assert raster_one(back, [[0, 1, 2]], 8, 8).mask.sum() == raster_one(front, [[0, 1, 2]], 8, 8).mask.sum()


def test_off_screen_and_nan_triangles_draw_nothing_and_partly_visible_ones_are_clipped():
    outside = [[-20, -20, 0], [-10, -20, 0], [-20, -10, 0]]
    assert raster_one(outside, [[0, 1, 2]], 8, 8).mask.sum() == 0
    assert raster_one([[np.nan, 0, 0], [8, 0, 0], [0, 8, 0]], [[0, 1, 2]], 8, 8).mask.sum() == 0
    partial = np.array([[-4, -4, 0], [12, -4, 0], [-4, 12, 0]], np.float32)
    triangle, _, _ = reference_raster(partial, [[0, 1, 2]], 8, 8)
    np.testing.assert_array_equal(raster_one(partial, [[0, 1, 2]], 8, 8).triangle[0], triangle)


@pytest.mark.parametrize("seed", range(4))
def test_random_meshes_match_the_per_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    width, height = 23, 17
    vertices = np.column_stack([rng.uniform(-5, width + 5, 30), rng.uniform(-5, height + 5, 30), rng.uniform(0, 10, 30)]).astype(np.float32)
    tris = np.array([rng.choice(30, 3, replace=False) for _ in range(25)])
    raster = raster_one(vertices, tris, width, height)
    triangle, weights, depth = reference_raster(vertices, tris, width, height)
    same = raster.triangle[0] == triangle
    assert same.mean() >= 0.995  # float32 vs float64 on pixel centres that lie on an edge
    assert triangle.max() >= 0 and (triangle >= 0).sum() > 50
    covered = same & (triangle >= 0)
    np.testing.assert_allclose(raster.barycentric[0][covered], weights[covered], atol=1e-4)
    np.testing.assert_allclose(raster.depth[0][covered], depth[covered], rtol=1e-4, atol=1e-4)


def test_differentiable_interpolation_equals_the_raster_and_its_gradients_match_finite_differences():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    width, height = 12, 10
    vertices = np.array([[1, 1, 0], [11, 2, 0], [2, 9, 0], [10, 9, 1]], np.float64) + rng.uniform(-0.3, 0.3, (4, 3))
    tris = np.array([[0, 1, 2], [1, 3, 2]])
    raster = raster_one(vertices, tris, width, height)
    colours = rng.uniform(0, 1, (4, 3))
    image = interpolate(torch.tensor(colours), torch.tensor(vertices), torch.tensor(tris), raster.triangle[0])
    np.testing.assert_allclose(image.numpy(), interpolate_attributes(raster, tris, colours)[0], atol=1e-5)

    def f(v, c):
        return interpolate(c, v, torch.tensor(tris), raster.triangle[0])

    v = torch.tensor(vertices, requires_grad=True)
    c = torch.tensor(colours, requires_grad=True)
    assert torch.autograd.gradcheck(f, (v, c), eps=1e-6, atol=1e-6)
    f(v, c).sum().backward()
    assert v.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


def test_flat_shading_follows_lambert_with_the_light_at_the_viewer():
    # a triangle facing the camera is lit fully; one tilted by 60 degrees about y gets cos 60 = 0.5
    facing = np.array([[0, 0, 5], [8, 0, 5], [0, 8, 5]], np.float32)
    tilted = facing.copy()
    tilted[:, 2] += np.tan(np.deg2rad(60)) * tilted[:, 0]
    for vertices, cosine in ((facing, 1.0), (tilted, 0.5)):
        raster = raster_one(vertices, [[0, 1, 2]], 8, 8)
        rgb = shade(raster, vertices[None], np.array([[0, 1, 2]]), shading="flat", ambient=0.2)[0]
        np.testing.assert_allclose(rgb[raster.mask[0]], 0.8 * (0.2 + 0.8 * cosine), rtol=1e-5)


def test_bad_inputs_raise_parameter_errors():
    with pytest.raises(ParameterError, match="do not index"):
        CPU.rasterize(np.zeros((1, 3, 3)), np.array([[0, 1, 3]]), width=4, height=4)
    with pytest.raises(ParameterError, match="frames, vertices, 3"):
        CPU.rasterize(np.zeros((3, 3)), np.array([[0, 1, 2]]), width=4, height=4)
    with pytest.raises(ParameterError, match="unknown render device"):
        get_rasterizer("tpu")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs CUDA and nvdiffrast (pip install gmfx[gpu])")
def test_nvdiffrast_agrees_with_the_cpu_rasterizer_on_99_percent_of_pixels():
    pytest.importorskip("nvdiffrast")
    from gmfx.testing._render import random_face_meshes

    vertices, tris = random_face_meshes(4, width=640, height=360)
    cpu = CPU.rasterize(vertices, tris, width=640, height=360)
    gpu = get_rasterizer("cuda").rasterize(vertices, tris, width=640, height=360)
    assert (cpu.triangle == gpu.triangle).mean() >= 0.99
    same = (cpu.triangle == gpu.triangle) & cpu.mask
    np.testing.assert_allclose(gpu.barycentric[same], cpu.barycentric[same], atol=1e-3)
