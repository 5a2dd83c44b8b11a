"""FLAME-family throughput end to end (DECA, EMOCA, EMICA coarse or detail): a plain PyTorch loop vs
gmfx recon, same frames, same run.

The real clip ``tests/data/single_face.mp4`` is looped to ``--frames`` frames (640x360) and decoded
once into a frames store. Model files are generated in the official formats with a full-size FLAME
(5,023 vertices) unless ``--model-dir`` names real ones (weights' values do not change speed). Then,
for each batch size:

* plain loop: one process reads the frames store chunk by chunk, finds the face (MediaPipe), crops
  it (DECA's rule), runs the model's encoders and FLAME on the device, and moves codes and vertices to
  host memory (no tracking, no writes); for EMICA it first estimates the identity on 32 frames
  evenly spaced over the recording (timed), as the recon stage does;
* gmfx: ``run_recon(model=...)`` on a local cluster of one worker (one per GPU with ``--device
  cuda``), codes-only store (``--save-vertices`` stores vertices too); the cluster start-up and the
  model load are not timed, as in the plain loop.

Run: ``python benchmarks/recon_flame.py [--model deca|emoca|emica] [--mode coarse|detail] [--frames 64]
[--batch-sizes 1 8 32] [--device cpu] [--precision float32]``; on a GPU: ``--device cuda --frames 4096
--batch-sizes 1 32 128 256 --precision float16``. Prints frames/s of both and their ratio, and on CUDA
the GPU's utilisation sampled by ``nvidia-smi`` during gmfx's run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import tempfile
import threading
import time

import numpy as np
from _common import LoopedFrames, Report, clip_frames

from gmfx.dataset import find_recordings
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, store_location
from gmfx.testing._emica_files import EMICA_FOLDER, write_emica_model
from gmfx.testing._model_files import write_model_dir
from gmfx.testing._videos import write_bids_recording, write_video


def plain_loop(frames_store: Location, model: str, model_dir: str, device: str, batch: int, precision: str) -> float:
    """Seconds of a plain loop over the frames store with the model's pieces (model loaded before timing)."""
    import torch
    from gmfx import open_frames

    from gmfx.models import get_backend
    from gmfx.stages.recon import identity_sample

    if device == "cpu":
        torch.set_num_threads(1)
    backend = get_backend(model)
    loaded = backend.load(device, model_dir=model_dir, precision=precision)
    frames = open_frames(frames_store).frames.values  # RGB in memory: the plain loop times the model only
    extra = {"identities": loaded.estimate_identity(frames[:2], max_faces=1)} if backend.identity else {}
    loaded.reconstruct(frames[:batch], max_faces=1, **extra)  # warm-up (cuDNN autotuning, MediaPipe graph)
    loaded.reset()
    start = time.perf_counter()
    if backend.identity:
        picks = identity_sample(frames.shape[0], backend.identity_frames)
        extra = {"identities": loaded.estimate_identity(frames[picks], max_faces=1)}
        loaded.reset()
    for first in range(0, frames.shape[0], batch):
        loaded.reconstruct(frames[first : first + batch], max_faces=1, **extra)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _gpu_utilisation(samples: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout  # fmt: skip
            samples.extend(float(x) for x in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return
        stop.wait(0.2)


def gmfx_recon(recordings, out: Location, model: str, model_dir: str, device: str, batch: int, precision: str, save_vertices: bool) -> tuple[float, float | None]:
    """Seconds for ``recon`` on a fresh local cluster (start-up and model load not timed), and the mean GPU utilisation."""
    from distributed import Client, LocalCluster

    from gmfx.models import get_backend, load_backend

    options = {"model_dir": model_dir, "precision": precision}
    workers = 1
    resources = {"GPU": 1} if device.startswith("cuda") else None
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None, resources=resources) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(lambda: load_backend(get_backend(model), device, options) and None)
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_gpu_utilisation, args=(samples, stop), daemon=True)
        if device.startswith("cuda"):
            sampler.start()
        start = time.perf_counter()
        run_recon(recordings, out, client=client, model=model, device=device, batch_size=batch, model_options=options,
              save_vertices=save_vertices, overwrite=True, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        stop.set()
    return seconds, (float(np.mean(samples)) if samples else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deca", choices=["deca", "emoca", "emica"])
    parser.add_argument("--mode", default="coarse", choices=["coarse", "detail"], help="detail: the model's _detail variant (emica)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--model-dir", default=None, help="real model files [default: generated ones]")
    parser.add_argument("--save-vertices", action="store_true")
    args = parser.parse_args()
    if args.mode == "detail" and args.model != "emica":
        parser.error("--mode detail: only emica has a detail variant")
    model = f"{args.model}_detail" if args.mode == "detail" else args.model
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        model_dir = args.model_dir or str(write_model_dir(root / "models", grid=(70, 71), n_eye=53, detail=args.mode == "detail",
                                                          emoca=args.model == "emoca"))  # fmt: skip
        if args.model == "emica" and not args.model_dir:
            write_emica_model(pathlib.Path(model_dir) / "EMICA" / EMICA_FOLDER)
        os.environ["GMFX_MODEL_DIR"] = model_dir
        video = write_video(root / "looped.mp4", frames=LoopedFrames(clip_frames(), args.frames))
        write_bids_recording(str(root / "bids"), subject="01", task="bench", video=str(video))
        recordings = find_recordings(str(root / "bids"))
        out = Location(str(root / "out"))
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, Client(cluster) as client:
            run_decode(recordings, out, client=client, progress=False)
        frames_store = store_location(out, recordings[0], "decode")
        n = args.frames
        report = Report("recon_flame" if (args.model, args.mode) == ("deca", "coarse") else f"recon_flame_{args.model}_{args.mode}", args)
        print(f"{args.model} {args.mode}, {n} frames 640x360, device {args.device}, precision {args.precision}, FLAME from {model_dir}")
        for batch in args.batch_sizes:
            plain = plain_loop(frames_store, model, model_dir, args.device, batch, args.precision)
            ours, utilisation = gmfx_recon(recordings, out, model, model_dir, args.device, batch, args.precision, args.save_vertices)
            busy = f"   GPU busy {utilisation:.0f}%" if utilisation is not None else ""
            print(f"batch {batch:4d}: plain loop {n / plain:8.1f} frames/s   gmfx {n / ours:8.1f} frames/s   ratio {plain / ours:.2f}{busy}")
            report.add(f"plain loop, batch {batch}", n / plain, "frames/s", echo=False)
            report.add(f"gmfx, batch {batch}", n / ours, "frames/s", ratio=plain / ours, baseline=f"plain loop, batch {batch}",
                       gpu_busy_percent=utilisation, echo=False)  # fmt: skip
            stage = "recon_flame_gpu" if args.device.startswith("cuda") else "recon_flame_cpu"
            report.stage_cost(stage, f"wall_s_per_frame_batch_{batch}", ours / n)
        report.write()


if __name__ == "__main__":
    main()
