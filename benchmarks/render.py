"""Rasterizer throughput: gmfx's CPU rasterizer vs a straightforward per-triangle reference, same meshes.

Meshes: MediaPipe's canonical face (478 vertices, 898 triangles) and a FLAME-size synthetic face (5,023
vertices, ~10,000 triangles), 60% of the image height, turned up to 30 degrees, at 640x360 and
1280x720 (``gmfx.testing._render.random_face_meshes``). In the same run:

* reference: per triangle, NumPy computes the barycentrics of every pixel centre of its bounding box
  and updates a z-buffer with a masked assignment (the plain vectorised way to write a rasterizer);
* gmfx CPU: ``CpuRasterizer`` (numba, one thread; compilation is done before timing);
* gmfx CPU + shading: the rasterizer and smooth Lambert shading (what a rendered frame costs before
  compositing and encoding);
* nvdiffrast on CUDA when a GPU and ``diffrp-nvdiffrast`` are present: the rasterizer alone on frames
  already on the GPU (one batched call, synchronised; the target's measure), and through gmfx's
  interface to NumPy (with the copy back to the host).

Both rasterizers' triangle ids are compared on the first frames (share of equal pixels is printed).

Run: ``python benchmarks/render.py [--frames 50] [--sizes 640x360 1280x720] [--topologies mediapipe flame]``.
Targets: >= 30 frames/s per core for MediaPipe at 640x360 on CPU; >= 2,000 frames/s for FLAME at 640x360
on one H100 (video encoding apart).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import Report

from gmfx.render import CpuRasterizer, shade
from gmfx.testing._render import random_face_meshes


def reference_rasterize(vertices: np.ndarray, tris: np.ndarray, width: int, height: int) -> np.ndarray:
    """Triangle ids ``(H, W)`` of one mesh, per triangle with NumPy over its bounding box."""
    depth = np.full((height, width), np.inf)
    ids = np.full((height, width), -1)
    for f, (a, b, c) in enumerate(tris):
        (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = vertices[a], vertices[b], vertices[c]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if area == 0:
            continue
        j0, j1 = max(0, int(np.ceil(min(x0, x1, x2) - 0.5))), min(width - 1, int(np.floor(max(x0, x1, x2) - 0.5)))
        i0, i1 = max(0, int(np.ceil(min(y0, y1, y2) - 0.5))), min(height - 1, int(np.floor(max(y0, y1, y2) - 0.5)))
        if j1 < j0 or i1 < i0:
            continue
        py, px = np.mgrid[i0 : i1 + 1, j0 : j1 + 1] + 0.5
        w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
        w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
        w2 = 1 - w0 - w1
        z = w0 * z0 + w1 * z1 + w2 * z2
        window = depth[i0 : i1 + 1, j0 : j1 + 1]
        nearer = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (z < window)
        window[nearer] = z[nearer]
        ids[i0 : i1 + 1, j0 : j1 + 1][nearer] = f
    return ids


def rate(function, n: int) -> float:
    start = time.perf_counter()
    function()
    return n / (time.perf_counter() - start)


def on_gpu_rate(gpu, vertices: np.ndarray, tris: np.ndarray, width: int, height: int, repeats: int = 20) -> float:
    """Frames/s of nvdiffrast's rasterize alone, on a batch already on the GPU (clip space as gmfx maps it)."""
    import torch

    clip = np.concatenate([2 * vertices[..., :1] / width - 1, 2 * vertices[..., 1:2] / height - 1, np.zeros_like(vertices[..., :1]), np.ones_like(vertices[..., :1])], axis=-1)
    z = vertices[..., 2]
    clip[..., 2] = (z - z.min()) / max(float(np.ptp(z)), 1e-12) * 1.8 - 0.9
    pos = torch.from_numpy(np.ascontiguousarray(clip, np.float32)).to(gpu.device)
    tri = torch.from_numpy(tris).to(gpu.device)
    gpu._dr.rasterize(gpu._context, pos, tri, resolution=[height, width])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        gpu._dr.rasterize(gpu._context, pos, tri, resolution=[height, width])
    torch.cuda.synchronize()
    return repeats * len(vertices) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=50, help="frames per case for gmfx (the reference runs a fifth, at least 2)")
    parser.add_argument("--sizes", nargs="+", default=["640x360", "1280x720"], help="WIDTHxHEIGHT image sizes")
    parser.add_argument("--topologies", nargs="+", default=["mediapipe", "flame"], choices=["mediapipe", "flame"])
    args = parser.parse_args()

    report = Report("render", args)
    cpu = CpuRasterizer()
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            from gmfx.render import get_rasterizer

            gpu = get_rasterizer("cuda")
    except Exception as error:  # noqa: BLE001 - report and go on with the CPU
        print(f"nvdiffrast not available: {type(error).__name__}: {error}")
    warm, warm_tris = random_face_meshes(1, width=64, height=64)
    cpu.rasterize(warm, warm_tris, width=64, height=64)  # numba compiles (or loads its cache) here

    print(f"{'topology':10} {'size':9} {'reference f/s':>14} {'gmfx cpu f/s':>13} {'ratio':>7} {'+shading f/s':>13} {'same px':>8} {'nvdiffrast f/s (on GPU / to NumPy)':>36}")
    for topology in args.topologies:
        for size in args.sizes:
            width, height = (int(n) for n in size.split("x"))
            vertices, tris = random_face_meshes(args.frames, topology=topology, width=width, height=height)
            n_reference = max(2, args.frames // 5)
            reference_ids = []
            reference = rate(lambda: reference_ids.extend(reference_rasterize(v, tris, width, height) for v in vertices[:n_reference]), n_reference)
            raster = None

            def run_cpu():
                nonlocal raster
                for k in range(len(vertices)):
                    raster = cpu.rasterize(vertices[k : k + 1], tris, width=width, height=height)

            fast = rate(run_cpu, len(vertices))
            shaded = rate(lambda: [shade(cpu.rasterize(vertices[k : k + 1], tris, width=width, height=height), vertices[k : k + 1], tris) for k in range(len(vertices))], len(vertices))
            ids = cpu.rasterize(vertices[:n_reference], tris, width=width, height=height).triangle
            same = float(np.mean(ids == np.stack(reference_ids)))
            gpu_rate = ""
            case = f"{topology} {size}"
            report.add(f"reference, {case}", reference, "frames/s", echo=False)
            report.add(f"gmfx cpu, {case}", fast, "frames/s", ratio=fast / reference, baseline=f"reference, {case}",
                       same_pixels=same, echo=False)  # fmt: skip
            report.add(f"gmfx cpu + shading, {case}", shaded, "frames/s", echo=False)
            if gpu is not None:
                on_gpu, to_numpy = on_gpu_rate(gpu, vertices, tris, width, height), rate(lambda: gpu.rasterize(vertices, tris, width=width, height=height), len(vertices))
                gpu_same = float(np.mean(gpu.rasterize(vertices[:n_reference], tris, width=width, height=height).triangle == ids))
                gpu_rate = f"{on_gpu:17.0f} / {to_numpy:.0f} (same px as CPU {gpu_same:.4f})"
                report.add(f"nvdiffrast on GPU, {case}", on_gpu, "frames/s", same_pixels_as_cpu=gpu_same, echo=False)
                report.add(f"nvdiffrast to NumPy, {case}", to_numpy, "frames/s", echo=False)
            print(f"{topology:10} {size:9} {reference:14.1f} {fast:13.1f} {fast / reference:6.0f}x {shaded:13.1f} {same:8.4f} {gpu_rate}")
    report.write()


if __name__ == "__main__":
    main()
