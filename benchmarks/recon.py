"""Reconstruction throughput: a plain MediaPipe loop vs gmfx recon with 1 and 2 workers, same frames.

The video is the real clip ``tests/data/single_face.mp4`` looped to 1,800 frames (640x360). It is
decoded once into a frames store; then, in the same run:

* baseline: one process reads the frames store chunk by chunk, calls MediaPipe's face mesh
  (``static_image_mode=False, refine_landmarks=True``) on every frame and takes its landmarks as a
  NumPy array (the least a user's own loop does);
* gmfx: ``recon`` on gmfx's local cluster (``gmfx.connect``, as the CLI runs it) of 1, then 2
  single-threaded worker processes, each of the 2 held on its own core (cluster start-up
  and the import of mediapipe are not timed, as in the baseline; graph creation, scheduling, score
  and pose fits, tracking and writes are).

Run: ``python benchmarks/recon.py [--frames 1800]``. Prints frames/s and the ratios to the baseline
(targets: >= 0.9 with 1 worker, >= 1.6 with 2 on a machine with 2 free cores) and writes them, with
the workers' CPU seconds per frame, to ``benchmarks/results/recon.json``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import tempfile
import time

import numpy as np

from _common import LoopedFrames, Report, clip_frames

from gmfx.dataset import find_recordings
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, store_location
from gmfx.testing._videos import write_video, write_bids_recording


def baseline(frames_store: Location) -> float:
    """Seconds for a plain loop over the RGB frames in memory: MediaPipe on each frame, take the landmarks."""
    import mediapipe as mp
    from gmfx import open_frames

    frames = open_frames(frames_store).frames.values  # RGB in memory: the plain loop times the model only
    start = time.perf_counter()
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=1) as mesh:
        for image in frames:
            result = mesh.process(image)
            for face in result.multi_face_landmarks or []:
                np.array([(p.x, p.y, p.z) for p in face.landmark])
    return time.perf_counter() - start


def gmfx_recon(recordings, out: Location, workers: int) -> tuple[float, float]:
    """Wall seconds for ``recon`` on a fresh local cluster of ``workers`` processes (start-up not
    timed), and the CPU seconds its workers spent."""
    from gmfx import connect

    with connect(workers=workers) as client:  # as the CLI runs it
        client.wait_for_workers(workers)
        client.run(importlib.import_module, "mediapipe")
        cpu = sum(client.run(time.process_time).values())
        start = time.perf_counter()
        run_recon(recordings, out, client=client, overwrite=True, progress=False)
        return time.perf_counter() - start, sum(client.run(time.process_time).values()) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        video = write_video(root / "looped.mp4", frames=LoopedFrames(clip_frames(), args.frames))
        write_bids_recording(str(root / "bids"), subject="01", task="bench", video=str(video))
        recordings = find_recordings(str(root / "bids"))
        out = Location(str(root / "out"))
        from gmfx import connect

        with connect(workers=2) as client:
            run_decode(recordings, out, client=client, progress=False)
        frames_store = store_location(out, recordings[0], "decode")
        n = args.frames
        report = Report("recon", args)
        report.note(f"frames: {n} (640x360, MediaPipe face mesh 478 points)")
        plain = baseline(frames_store)
        one, one_cpu = gmfx_recon(recordings, out, 1)
        two, _ = gmfx_recon(recordings, out, 2)
        report.add("plain loop", n / plain, "frames/s")
        report.add("gmfx, 1 worker", n / one, "frames/s", ratio=plain / one, baseline="plain loop", target=0.9)
        report.add("gmfx, 2 workers", n / two, "frames/s", ratio=plain / two, baseline="plain loop", target=1.6)
        report.stage_cost("recon_mediapipe", "cpu_s_per_frame", one_cpu / n)
        report.write()


if __name__ == "__main__":
    main()
