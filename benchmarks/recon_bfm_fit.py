"""3DMM video fitting (``bfm-fit``): gmfx's batched schedule vs a plain per-frame PyTorch loop, same run.

Frames are rendered from a generated BFM file in the official format (``--vertices 35709``: full size)
with a known head motion (a sway of 4 s at 30 frames/s) and expression change, 224 x 224 crops with
their 68 landmarks (plus ``--noise`` px of landmark noise), so the fitting alone is timed (detection
and cropping are not). Both fit ``exp``, ``angle``, ``gamma``, ``trans`` per frame with the identity
fixed, at the video defaults (50 rigid + 30 non-rigid iterations, landmarks + photometric + priors),
each frame warm-started from the previous one; both start from the same fitted first frame:

* plain loop (3DMM-Fitting-Pytorch's ``fit_coeffs``): frame after frame, ``torch.optim.Adam``
  re-created per frame, the pose regulariser toward the previous frame;
* gmfx: :func:`gmfx.models._fitting.fit_video` over batches of ``--batch`` frames (one optimisation per
  batch, the pose term chaining each frame to the one before it).

Prints frames/s of both and their ratio, the final landmark error (RMS px vs the noise-free truth) of
both, and gmfx's landmark error against the number of iterations (``--iterations`` rigid+non-rigid
totals, split 5:3 as the defaults). A batch starts every frame from the previous batch's last one, so
larger batches trade landmark accuracy for speed (printed for each ``--batch``). Run:
``python benchmarks/recon_bfm_fit.py [--frames 32] [--batch 4 32] [--vertices 35709] [--device cpu]
[--iterations 8 16 40 80 160]``; on a GPU ``--device cuda --frames 512 --batch 8 32 128``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import Report

from gmfx.models._bfm import BfmLayer, read_bfm
from gmfx.models._fitting import FRAME_CODES, FitOptions, Renderer, Targets, fit_video, frame_losses
from gmfx.models.bfm_fit import bfm_decoder
from gmfx.testing import write_bfm_model

SIZE = 224
#: frames of one head sway (4 s at 30 frames/s): yaw +/-0.3 rad, pitch +/-0.1, a face moving +/-0.1 dm
PERIOD = 120


def synthetic_video(layer: BfmLayer, renderer: Renderer, n: int, noise: float, device: torch.device, seed: int = 0):
    """Targets (noisy landmarks, rendered crops), the identity and the true landmarks of ``n`` frames."""
    rng = np.random.default_rng(seed)
    t = torch.arange(n, device=device, dtype=torch.float32)[:, None] / PERIOD

    def draw(*shape, scale=1.0):
        return torch.tensor(rng.normal(scale=scale, size=shape), dtype=torch.float32, device=device)

    sizes = layer.sizes
    identity = {"id": draw(1, sizes["id"], scale=0.5), "tex": draw(1, sizes["tex"], scale=0.5)}
    swing = torch.sin(2 * np.pi * t)
    truth = {
        **identity,
        "exp": draw(1, sizes["exp"]) * torch.cos(2 * np.pi * t) + draw(1, sizes["exp"]) * torch.sin(2 * np.pi * t),
        "angle": torch.tensor([0.05, 0.0, 0.0], device=device) + swing * torch.tensor([0.1, 0.3, 0.05], device=device),
        "trans": torch.tensor([0.0, 0.0, 0.2], device=device) + swing * torch.tensor([0.1, 0.05, 0.0], device=device),
        "gamma": draw(1, 27, scale=0.1).expand(n, -1),
    }
    decode = bfm_decoder(layer)
    images, landmarks = [], []
    with torch.no_grad():
        for start in range(0, n, 16):
            part = {k: v if v.shape[0] == 1 else v[start : start + 16] for k, v in truth.items()}
            seen = decode(part, True)
            images.append(renderer(seen.vertices, seen.colours, SIZE)[0])
            landmarks.append(seen.landmarks)
    clean = torch.cat(landmarks)
    noisy = clean + torch.tensor(rng.normal(scale=noise, size=clean.shape), dtype=torch.float32, device=device)
    return Targets(noisy, SIZE, torch.cat(images)), identity, clean


def plain_loop(decode, targets: Targets, identity, start, options: FitOptions, renderer: Renderer) -> dict[str, torch.Tensor]:
    """Frame after frame, as 3DMM-Fitting-Pytorch's ``fit_coeffs`` (previous-frame pose regulariser)."""
    current = {name: value.clone() for name, value in start.items()}
    fitted = []
    for k in range(targets.landmarks.shape[0]):
        frame = targets.select(slice(k, k + 1))
        previous = (current["angle"].clone(), current["trans"].clone())
        for free, iterations, photometric in ((("angle", "trans"), options.rigid_iterations, False),
                                              (FRAME_CODES, options.nonrigid_iterations, True)):  # fmt: skip
            leaves = {name: current[name].clone().requires_grad_(True) for name in free}
            optimiser = torch.optim.Adam(list(leaves.values()), lr=options.rigid_lr if not photometric else options.nonrigid_lr)
            for _ in range(iterations):
                optimiser.zero_grad()
                params = {**identity, **current, **leaves}
                loss = frame_losses(decode(params, photometric), params, frame, options, photometric=photometric, renderer=renderer,
                                    previous=previous)["total"]
                loss.sum().backward()
                optimiser.step()
            current.update({name: leaf.detach() for name, leaf in leaves.items()})
        fitted.append(dict(current))
    return {name: torch.cat([f[name] for f in fitted]) for name in FRAME_CODES}


def gmfx_fit(decode, targets: Targets, identity, start, options: FitOptions, renderer: Renderer, batch: int, sizes) -> dict[str, torch.Tensor]:
    pieces, previous = [], start
    for first in range(0, targets.landmarks.shape[0], batch):
        params, _ = fit_video(decode, targets.select(slice(first, first + batch)), identity, options, sizes=sizes, start=previous,
                              renderer=renderer)
        pieces.append(params)
        previous = {name: params[name][-1:] for name in FRAME_CODES}
    return {name: torch.cat([p[name] for p in pieces]) for name in FRAME_CODES}


def landmark_error(decode, identity, params, clean: torch.Tensor) -> float:
    with torch.no_grad():
        fitted = decode({**identity, **params}, False).landmarks
    return float(((fitted - clean) ** 2).sum(-1).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 32], help="gmfx's frames per batch (the recon stage's --batch-size)")
    parser.add_argument("--vertices", type=int, default=35709, help="35709: the official size; fewer: a quick model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--noise", type=float, default=1.0, help="landmark noise, px (sd)")
    parser.add_argument("--iterations", type=int, nargs="*", default=[8, 16, 40, 80, 160])
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()
    report = Report("recon_bfm_fit", args)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "BFM_model_front.mat"
        full = args.vertices == 35709
        write_bfm_model(path, n_vertices=args.vertices, n_faces=70789 if full else None)
        layer = BfmLayer(read_bfm(path.read_bytes(), where=str(path))).to(device)
    sizes = {**layer.sizes, "angle": 3, "gamma": 27, "trans": 3}
    renderer = Renderer(layer.triangles.cpu().numpy(), device)
    decode = bfm_decoder(layer)
    targets, identity, clean = synthetic_video(layer, renderer, args.frames + 1, args.noise, device)
    options = FitOptions()
    # the first frame, fitted once with the full schedule, starts both
    first, _ = fit_video(decode, targets.select(slice(0, 1)), identity, options, sizes=sizes, renderer=renderer)
    start = {name: first[name] for name in FRAME_CODES}
    rest, clean_rest = targets.select(slice(1, None)), clean[1:]
    print(f"{args.frames} frames, {layer.n_vertices} vertices, {len(layer.triangles)} triangles, {SIZE} px crops, {args.device}, "
          f"torch threads 1, landmark noise {args.noise} px; video defaults {options.rigid_iterations} + {options.nonrigid_iterations} iterations")

    def timed(function):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - begin

    seconds_of = {}
    for batch in args.batch:
        ours, seconds_of[batch] = timed(lambda: gmfx_fit(decode, rest, identity, start, options, renderer, batch, sizes))
        error = landmark_error(decode, identity, ours, clean_rest)
        print(f"gmfx (batch {batch}): {args.frames / seconds_of[batch]:.2f} frames/s, landmark error {error:.2f} px")
        report.add(f"gmfx, batch {batch}", args.frames / seconds_of[batch], "frames/s", landmark_error_px=error, echo=False)
    if not args.skip_plain:
        plain, plain_s = timed(lambda: plain_loop(decode, rest, identity, start, options, renderer))
        print(f"plain loop (per frame): {args.frames / plain_s:.2f} frames/s, landmark error {landmark_error(decode, identity, plain, clean_rest):.2f} px")
        report.add("plain loop (per frame)", args.frames / plain_s, "frames/s", echo=False)
        for batch, ours_s in seconds_of.items():
            print(f"ratio gmfx (batch {batch}) / plain: {plain_s / ours_s:.2f}x")
            report.add(f"gmfx, batch {batch}, vs plain", args.frames / ours_s, "frames/s", ratio=plain_s / ours_s,
                       baseline="plain loop (per frame)", echo=False)  # fmt: skip
    print(f"landmark error vs iterations (gmfx, batch {max(args.batch)}, rigid + non-rigid 5:3):")
    batch = max(args.batch)
    for total in args.iterations:
        rigid = round(total * 5 / 8)
        varied = FitOptions(rigid_iterations=rigid, nonrigid_iterations=total - rigid)
        fitted, seconds = timed(lambda: gmfx_fit(decode, rest, identity, start, varied, renderer, batch, sizes))
        error = landmark_error(decode, identity, fitted, clean_rest)
        print(f"  {rigid:4d} + {total - rigid:4d}: {error:.2f} px, {args.frames / seconds:.2f} frames/s")
        report.add(f"landmark error, {rigid} + {total - rigid} iterations", error, "px", echo=False)
    report.write()


if __name__ == "__main__":
    main()
