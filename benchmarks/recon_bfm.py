"""BFM family throughput: a plain PyTorch loop vs gmfx recon, same frames, same run.

The real clip ``tests/data/single_face.mp4`` is looped to ``--frames`` frames (640x360) and decoded
once into a frames store. Model files are generated in the official formats with the full-size BFM
front model (35,709 vertices, 70,789 triangles) unless ``--model-dir`` names real ones (the weights'
values do not change speed). Parts (``--parts``), each a function in :data:`PARTS`:

``deep3d``, for each batch size:

* plain loop: one process reads the frames store chunk by chunk, finds the face (MediaPipe), aligns
  it as Deep3DFaceRecon's ``align_img`` does (PIL: bicubic resize of the whole frame, then a 224 crop),
  runs the network and decodes the BFM mesh (shape, pose, projection) on the device, and moves
  coefficients and projected vertices to host memory (no tracking, no writes);
* gmfx: ``run_recon(model="deep3d")`` on a local cluster of one worker, codes-only store
  (``--save-vertices`` stores vertices too); cluster start-up and model load are not timed, as in the
  plain loop.

Run: ``python benchmarks/recon_bfm.py [--frames 64] [--batch-sizes 1 8 32] [--device cpu]``; on a GPU:
``--device cuda --frames 4096 --batch-sizes 1 32 128 256 --precision float16``. Prints frames/s of
both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import numpy as np
from _common import LoopedFrames, Report, clip_frames

from gmfx.dataset import find_recordings
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, store_location
from gmfx.testing._bfm_files import BFM_FACES, BFM_VERTICES, write_deep3d_model_dir
from gmfx.testing._videos import write_bids_recording, write_video


# -- Deep3DFaceRecon ------------------------------------------------------------------------------------
def _pil_align(frame: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Deep3D's ``resize_n_crop_img``: the frame resized by the crop's scale (bicubic), then 224 x 224 cut."""
    from PIL import Image

    s = crop[0, 0]
    h0, w0 = frame.shape[:2]
    w, h = int(w0 * s), int(h0 * s)
    left, up = int(-crop[0, 2]), int(-crop[1, 2])
    image = Image.fromarray(frame).resize((w, h), resample=Image.BICUBIC).crop((left, up, left + 224, up + 224))
    return np.asarray(image)


def deep3d_plain_loop(frames_store: Location, model_dir: str, device: str, batch: int, precision: str) -> float:
    """Seconds of a plain loop over the frames store with Deep3D's steps (models loaded before timing)."""
    import torch
    from gmfx import open_frames

    from gmfx.models._bfm import split_coefficients
    from gmfx.models.deep3d import Deep3dBackend, alignment_crop, five_points

    if device == "cpu":
        torch.set_num_threads(1)
    model = Deep3dBackend.load(device, model_dir=model_dir, precision=precision)  # its network, BFM and detector
    frames = open_frames(frames_store).frames.values  # RGB in memory: the plain loop times the model only

    def step(chunk: np.ndarray) -> None:
        found = model.detector(chunk, 1)
        crops = [_pil_align(frame, alignment_crop(five_points(faces[0][0]), model.template, frame.shape[0]))
                 for frame, faces in zip(chunk, found) if faces]  # fmt: skip
        if not crops:
            return
        images = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            codes = split_coefficients(model.coefficients(images))
            posed = model.layer.pose(model.layer.shape(codes["id"], codes["exp"]), codes["angle"], codes["trans"])
            projected = model.layer.project(posed)
        _ = {name: value.cpu().numpy() for name, value in codes.items()}, projected.cpu().numpy()

    step(frames[:batch])  # warm-up (cuDNN autotuning, MediaPipe graph)
    model.reset()
    start = time.perf_counter()
    for first in range(0, frames.shape[0], batch):
        step(frames[first : first + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def deep3d_gmfx(recordings, out: Location, model_dir: str, device: str, batch: int, precision: str, save_vertices: bool) -> float:
    """Seconds for ``recon --model deep3d`` on a fresh one-worker cluster (start-up and model load not timed)."""
    from distributed import Client, LocalCluster

    from gmfx.models import load_backend
    from gmfx.models.deep3d import Deep3dBackend

    options = {"model_dir": model_dir, "precision": precision}
    resources = {"GPU": 1} if device.startswith("cuda") else None
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, resources=resources) as cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        client.run(lambda: load_backend(Deep3dBackend, device, options) and None)
        start = time.perf_counter()
        run_recon(recordings, out, client=client, model="deep3d", device=device, batch_size=batch, model_options=options,
                  save_vertices=save_vertices, overwrite=True, progress=False)  # fmt: skip
        return time.perf_counter() - start


def deep3d_part(args: argparse.Namespace, recordings, out: Location, frames_store: Location, model_dir: str, report: Report) -> None:
    n = args.frames
    print(f"Deep3DFaceRecon, {n} frames 640x360, device {args.device}, precision {args.precision}, BFM from {model_dir}")
    for batch in args.batch_sizes:
        plain = deep3d_plain_loop(frames_store, model_dir, args.device, batch, args.precision)
        ours = deep3d_gmfx(recordings, out, model_dir, args.device, batch, args.precision, args.save_vertices)
        print(f"batch {batch:4d}: plain loop {n / plain:8.1f} frames/s   gmfx {n / ours:8.1f} frames/s   ratio {plain / ours:.2f}")
        report.add(f"deep3d plain loop, batch {batch}", n / plain, "frames/s", echo=False)
        report.add(f"deep3d gmfx, batch {batch}", n / ours, "frames/s", ratio=plain / ours, baseline=f"deep3d plain loop, batch {batch}", echo=False)


#: the benchmark's parts by name (``--parts``): each gets the arguments, recordings, output root,
#: frames store, model directory and the report its figures go to. 3DMM fitting (``bfm-fit``) is timed by ``benchmarks/recon_bfm_fit.py``.
PARTS: dict[str, Callable[..., None]] = {"deep3d": deep3d_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--model-dir", default=None, help="real model files [default: generated ones, full-size BFM]")
    parser.add_argument("--save-vertices", action="store_true")
    args = parser.parse_args()
    report = Report("recon_bfm", args)
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        model_dir = args.model_dir or str(write_deep3d_model_dir(root / "models", n_vertices=BFM_VERTICES, n_faces=BFM_FACES))
        os.environ["GMFX_MODEL_DIR"] = model_dir
        video = write_video(root / "looped.mp4", frames=LoopedFrames(clip_frames(), args.frames))
        write_bids_recording(str(root / "bids"), subject="01", task="bench", video=str(video))
        recordings = find_recordings(str(root / "bids"))
        out = Location(str(root / "out"))
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, Client(cluster) as client:
            run_decode(recordings, out, client=client, progress=False)
        frames_store = store_location(out, recordings[0], "decode")
        for name in args.parts:
            PARTS[name](args, recordings, out, frames_store, model_dir, report)
    report.write()


if __name__ == "__main__":
    main()
