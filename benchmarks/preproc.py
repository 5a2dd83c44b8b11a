"""Preprocessing (align -> interpolate -> filter) of FLAME-sized data: the same fixed chain in plain
in-memory NumPy/SciPy vs gmfx.

    python benchmarks/preproc.py                 # 1 minute and 10 minutes at 30 fps
    python benchmarks/preproc.py --lengths 1 10 60

The in-memory chain does what gmfx's defaults do, with SciPy on whole arrays: a rigid fit per frame,
linear interpolation onto the even grid, and the 0.005-4 Hz Butterworth band (-3 dB at both cut-offs
after two passes) with each vertex's mean removed and restored, the high-pass zero-phase from a zero
state and the low-pass by ``scipy.signal.sosfiltfilt``.

Each run happens in its own subprocess; the parent samples its RSS to report the peak. Data: one face of
5,023 vertices with known rigid motion, irregular frame times, written to ``benchmarks/_work/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import Report

WORK = Path(__file__).parent / "_work"
VERTICES, FPS, CHUNK = 5023, 30.0, 1024
STARTUP = WORK / "_gmfx_startup.txt"


def make_store(minutes: float) -> Path:
    """A synthetic recon store, written chunk by chunk (never the whole array in memory)."""
    import dask.array as da
    import xarray as xr

    from gmfx.preproc._rigid import euler_to_matrix
    from gmfx.storage import Location, RegionStore
    from gmfx.testing._synthetic import _template
    from gmfx.types import split_regions

    path = WORK / f"recon_{minutes:g}min.zarr"
    store = RegionStore(Location(str(path)), "recon")
    if store.is_complete():
        return path
    n = int(minutes * 60 * FPS)
    rng = np.random.default_rng(0)
    template, tris = _template(VERTICES, rng)
    times = (np.arange(n) + np.clip(rng.normal(0, 0.1, n), -0.4, 0.4)) / FPS

    def zeros(shape, dtype):
        return da.zeros(shape, dtype=dtype, chunks=(CHUNK,) + shape[1:])

    template_ds = xr.Dataset(
        {
            "v": (("time", "face", "vertex", "coord"), zeros((n, 1, VERTICES, 3), np.float32), {"space": "world"}),
            "mat": (("time", "face", "row", "col"), zeros((n, 1, 4, 4), np.float32)),
            "detected": (("time", "face"), zeros((n, 1), bool)),
            "tris": (("triangle", "corner"), tris),
            "template": (("vertex", "coord"), template.astype(np.float32)),
            "rigid": (("vertex",), template[:, 1] > -0.03),
        },
        coords={"time": ("time", times)},
    )
    regions = split_regions(n, CHUNK)
    store.prepare(template_ds, plan={"regions": len(regions)}, overwrite=True)
    for region in regions:
        t = times[region.slice]
        angles = 10 * np.sin(2 * np.pi * np.array([0.1, 0.13, 0.07])[None] * t[:, None])
        mat = np.zeros((t.size, 1, 4, 4))
        mat[:, 0, :3, :3] = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        mat[:, 0, :3, 3] = 0.02 * np.sin(2 * np.pi * 0.05 * t)[:, None] + [0, 0, 0.6]
        mat[:, 0, 3, 3] = 1
        local = template[None] + 2e-4 * rng.standard_normal((t.size, VERTICES, 3))
        v = np.einsum("tij,tvj->tvi", mat[:, 0, :3, :3], local) + mat[:, 0, None, :3, 3]
        store.write_region(
            region.index, region.slice,
            {"v": v[:, None].astype(np.float32), "mat": mat.astype(np.float32), "detected": np.ones((t.size, 1), bool), "time": t},
        )  # fmt: skip
    store.finalize()
    return path


def run_naive(source: Path, target: Path) -> None:
    """Load everything, align frame by frame, interp1d onto the grid, filter the full array, save."""
    import zarr
    from scipy import signal
    from scipy.interpolate import interp1d

    from gmfx.preproc._filters import design_butterworth

    group = zarr.open_group(str(source), mode="r")
    v = group["v"][:, 0].astype(np.float64)
    times = group["time"][:]
    template = group["template"][:].astype(np.float64)
    rigid = group["rigid"][:]
    ref = template[rigid] - template[rigid].mean(0)
    for t in range(v.shape[0]):
        x = v[t, rigid]
        mean = x.mean(0)
        u, _, vt = np.linalg.svd((ref).T @ (x - mean))
        d = np.sign(np.linalg.det(u @ vt))
        rotation = u @ np.diag([1, 1, d]) @ vt
        v[t] = (v[t] - mean) @ rotation.T + template[rigid].mean(0)
    grid = times[0] + np.arange(int((times[-1] - times[0]) * FPS) + 1) / FPS
    v = interp1d(times, v, axis=0)(grid)
    sos, design = design_butterworth(FPS, highpass=0.005, lowpass=4.0, order=5)  # the same sections as gmfx
    highpass, lowpass = sos[: design["highpass_sections"]], sos[design["highpass_sections"] :]
    mean = v.mean(axis=0)
    v -= mean
    v = signal.sosfilt(highpass, v, axis=0)
    v = signal.sosfilt(highpass, v[::-1], axis=0)[::-1]
    v = signal.sosfiltfilt(lowpass, v, axis=0)
    v += mean - v.mean(axis=0)
    v = v.astype(np.float32)
    out = zarr.open_array(str(target), mode="w", shape=v.shape, chunks=(CHUNK, VERTICES, 3), dtype="float32")
    out[:] = v


def run_gmfx(source: Path, target: Path) -> None:
    """As the CLI runs it: a distributed LocalCluster with one single-threaded worker process per core.

    The cluster's start (and the workers' imports) is part of the measured wall time and peak RSS
    (workers included); it is also reported on its own (``start s``), and so is ``run_chain`` alone on
    the started cluster (``run s``, what a command on a running cluster pays)."""
    from distributed import Client, LocalCluster

    from gmfx.stages.preproc import run_chain
    from gmfx.storage import Location

    start = time.perf_counter()
    with LocalCluster(n_workers=os.cpu_count(), threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.run(__import__, "gmfx.stages.preproc")  # what a warm CLI cluster has done already
            started = time.perf_counter()
            run_chain([Location(str(source))], [Location(str(target))], client=client, overwrite=True, progress=False,
                      filter={"highpass": 0.005, "lowpass": 4.0, "order": 5})  # fmt: skip
            STARTUP.write_text(f"{started - start:.2f} {time.perf_counter() - started:.2f}")


def measure(kind: str, source: Path) -> tuple[float, float]:
    """Wall time (s) and peak RSS (GB) of one run in a fresh subprocess."""
    import psutil

    target = WORK / f"{kind}_{source.stem}_out.zarr"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(str(target).removesuffix(".zarr") + "-scratch.zarr", ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--run", kind, str(source), str(target)])
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{kind} failed on {source} (exit {child.returncode})")
    shutil.rmtree(target, ignore_errors=True)
    return wall, peak / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=float, nargs="+", default=[1, 10], help="recording lengths in minutes")
    parser.add_argument("--skip-naive", action="store_true", help="run gmfx only")
    parser.add_argument("--skip-naive-above", type=float, default=30, help="minutes above which naive is not run")
    parser.add_argument("--run", nargs=3, metavar=("KIND", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        kind, source, target = args.run
        (run_naive if kind == "naive" else run_gmfx)(Path(source), Path(target))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores; {VERTICES} vertices, 1 face, {FPS:g} fps, chunks of {CHUNK} frames")
    print("gmfx runs on a LocalCluster of one single-threaded worker process per core, started inside the timed run")
    print("in-memory: the same chain in plain NumPy/SciPy on whole arrays (mean kept, zero-phase, -3 dB cut-offs)")
    print(f"{'length':>8} {'naive s':>9} {'naive GB':>9} {'gmfx s':>9} {'gmfx GB':>8} {'time ratio':>11} {'mem ratio':>10} {'start s':>8} {'run s':>6}")
    report = Report("preproc", args)
    for minutes in args.lengths:
        source = make_store(minutes)
        gmfx_time, gmfx_mem = measure("gmfx", source)
        if minutes <= args.skip_naive_above and not args.skip_naive:
            naive_time, naive_mem = measure("naive", source)
            ratios = f"{naive_time / gmfx_time:>10.2f}x {naive_mem / gmfx_mem:>9.2f}x"
        else:
            naive_time = naive_mem = float("nan")
            ratios = f"{'-':>11} {'-':>10}"
        startup, run = STARTUP.read_text().split() if STARTUP.exists() else ("?", "?")
        STARTUP.unlink(missing_ok=True)
        print(f"{minutes:>6g} m {naive_time:>9.1f} {naive_mem:>9.2f} {gmfx_time:>9.1f} {gmfx_mem:>8.2f} {ratios} {startup:>8} {run:>6}", flush=True)
        frames = int(minutes * 60 * FPS)
        case = f"{minutes:g} min"
        report.add(f"gmfx, {case}", gmfx_time, "s", ratio=naive_time / gmfx_time if np.isfinite(naive_time) else None,
                   baseline=f"in-memory, {case}", echo=False)  # fmt: skip
        report.add(f"gmfx peak RSS, {case}", gmfx_mem, "GB", ratio=naive_mem / gmfx_mem if np.isfinite(naive_mem) else None,
                   baseline=f"in-memory peak RSS, {case}", echo=False)  # fmt: skip
        if np.isfinite(naive_time):
            report.add(f"in-memory, {case}", naive_time, "s", echo=False)
        if run != "?" and minutes == max(args.lengths):  # the longest run: fixed costs matter least
            report.stage_cost("preproc", "core_s_per_frame", float(run) * (os.cpu_count() or 1) / frames)
    print("ratios: in-memory (naive) / gmfx (above 1 = gmfx faster / lighter)")
    report.write()


if __name__ == "__main__":
    main()
