"""GPU feeding: do decode and the frames store keep a GPU busy? A FLAME-cost model on one GPU worker.

The model is ``gmfx.testing._gpu_model.SyntheticFlameBackend``: DECA's coarse cost (ResNet-50 encoder,
FLAME-sized vertex layer, optionally MediaPipe detection on the CPU as DECA's default) with random
weights, so no model files are needed. On a node (default: every core, one GPU) it measures, in one run:

* decode: ``run_decode`` of the video on ``--decode-workers`` single-threaded CPU workers (frames/s the
  node's CPUs can put into the frames store);
* model alone: the model on the GPU worker over frames already in its memory (the ceiling);
* gmfx recon: ``run_recon`` with the model on the GPU worker (frames read from the store, tasks, writes)
  while ``nvidia-smi`` samples the GPU's utilisation every 0.2 s.

Feeding keeps up when recon reaches the model's ceiling (ratio ~1) with the GPU busy, and decode's
frames/s is above it. Without CUDA it runs on the CPU (small sizes, for a smoke run; no utilisation).

    python benchmarks/gpu_feeding.py --frames 4096 --batch-size 128 --precision float16      # on a GPU node
    python benchmarks/gpu_feeding.py                                                         # CPU: 32 frames
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
from _common import CLIP, Report



def make_video(path: pathlib.Path, n_frames: int) -> pathlib.Path:
    import av

    from gmfx.testing._videos import write_video

    with av.open(str(CLIP)) as container:
        clip = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    loop = clip + clip[-2:0:-1]
    return write_video(path, frames=[loop[i % len(loop)] for i in range(n_frames)], fps=30, width=640, height=360)


def gpu_utilisation(samples: list[float], stop: threading.Event) -> None:
    """Append the GPU's utilisation (%) every 0.2 s until ``stop`` (nothing without ``nvidia-smi``)."""
    if shutil.which("nvidia-smi") is None:
        return
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout  # fmt: skip
            samples.extend(float(x) for x in out.split()[:1])
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return
        stop.wait(0.2)


def model_alone(frames_url: str, n: int, batch: int, device: str, options: dict) -> float:
    """Frames/s of the model over ``n`` frames already in memory (runs on the GPU worker)."""
    from gmfx import open_frames

    from gmfx.models import load_backend
    from gmfx.testing._gpu_model import SyntheticFlameBackend

    model = load_backend(SyntheticFlameBackend, device, options)
    frames = open_frames(frames_url).frames[:n].values
    model.reconstruct(frames[:batch], max_faces=1)  # warm-up: cuDNN autotuning, allocator
    synchronize = _synchronizer(device)
    synchronize()
    start = time.perf_counter()
    for first in range(0, n, batch):
        model.reconstruct(frames[first : first + batch], max_faces=1)
    synchronize()
    return n / (time.perf_counter() - start)


def _synchronizer(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=None, help="default: 2048 on a GPU, 32 on the CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on the CPU")
    parser.add_argument("--precision", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--detector", default="none", choices=["none", "mediapipe"], help="run DECA's CPU-side detector too")
    parser.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--model-frames", type=int, default=None, help="frames for the model-alone ceiling (default: 512, 8 on the CPU)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    from gmfx._threads import thread_environment, worker_thread_counts
    from gmfx.cluster import gpu_worker_specs, local_gpu_count
    from gmfx.dataset import find_recordings
    from gmfx.stages.decode import run_decode
    from gmfx.stages.recon import run_recon
    from gmfx.storage import Location, store_location
    from gmfx.testing._gpu_model import SyntheticFlameBackend
    from gmfx.testing._videos import write_bids_recording

    device = "cuda" if local_gpu_count() else "cpu"
    on_gpu = device == "cuda"  # the CPU runs the ResNet-50 at ~0.4 s a frame: small sizes there
    args.frames = args.frames or (2048 if on_gpu else 32)
    args.batch_size = args.batch_size or (64 if on_gpu else 8)
    args.model_frames = args.model_frames or (512 if on_gpu else 8)
    report = Report("gpu_feeding", args)
    options = {"precision": args.precision if device == "cuda" else "float32", "detector": args.detector}
    report.note(f"device {device}; {args.frames} frames 640x360; batch {args.batch_size}; {options}")
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        video = make_video(root / "looped.mp4", args.frames)
        write_bids_recording(str(root / "bids"), subject="01", task="feed", video=str(video))
        recordings = find_recordings(str(root / "bids"))
        out = Location(str(root / "out"))

        with LocalCluster(n_workers=args.decode_workers, threads_per_worker=1, dashboard_address=None,
                          env=thread_environment(1)) as cluster, Client(cluster) as client:  # fmt: skip
            start = time.perf_counter()
            run_decode(recordings, out, client=client, progress=False)
            decode_fps = args.frames / (time.perf_counter() - start)
        frames_url = store_location(out, recordings[0], "decode").url

        workers = gpu_worker_specs(1) if device == "cuda" else {"cpu-0": {"cls": Nanny, "options": {"nthreads": 1, "env": thread_environment(1)}}}
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
        with SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            client.wait_for_workers(1)
            n_model = min(args.model_frames, args.frames)
            resources = {"GPU": 1} if device == "cuda" else None
            ceiling = client.submit(model_alone, frames_url, n_model, args.batch_size, device, options, resources=resources, pure=False).result()
            samples: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=gpu_utilisation, args=(samples, stop), daemon=True)
            sampler.start()
            start = time.perf_counter()
            run_recon(recordings, out, client=client, model=SyntheticFlameBackend, device=device, batch_size=args.batch_size,
                      model_options=options, overwrite=True, progress=False)  # fmt: skip
            recon_seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
            threads = next(iter(client.run(worker_thread_counts).values()))
    recon_fps = args.frames / recon_seconds
    busy = float(np.mean(samples)) if samples else None
    report.add(f"decode, {args.decode_workers} CPU workers", decode_fps, "frames/s", ratio=decode_fps / ceiling, baseline="model alone")
    report.add("model alone (frames in memory)", ceiling, "frames/s")
    report.add("gmfx recon, 1 GPU worker" if device == "cuda" else "gmfx recon, 1 CPU worker", recon_fps, "frames/s",
               ratio=recon_fps / ceiling, baseline="model alone", target=0.9, gpu_busy_percent=busy)  # fmt: skip
    report.note(f"GPU busy during recon: {busy:.0f}% ({len(samples)} samples)" if busy is not None else "GPU utilisation: no nvidia-smi")
    report.note(f"recon worker's thread pools: {threads}")
    report.stage_cost("gpu_feeding", "gpu_s_per_frame" if device == "cuda" else "cpu_model_s_per_frame", 1 / recon_fps)
    report.stage_cost("gpu_feeding", "decode_node_s_per_frame", 1 / decode_fps)
    report.write()


if __name__ == "__main__":
    main()
