"""Mass-univariate GLM of FLAME-sized data: plain in-memory NumPy least squares vs gmfx's lazy GLM.

    python benchmarks/analysis.py                      # 2 and 5 minutes at 30 fps (a few minutes in all)
    python benchmarks/analysis.py --lengths 10 60      # the issue's sizes (1 h: gmfx only by default)

Data: one face of 5,023 vertices at 30 fps, 4 conditions with overlapping events, a known FIR response,
drift and head-motion leak, stored as the preproc stage writes it (chunks of 1,024 frames x a block of
vertices). Model: FIR over 60 lags (0-1.97 s) per condition, cubic drift, 6 motion regressors.

* naive: load ``v`` (float64), ``np.linalg.lstsq`` of every vertex x coordinate on the dense design,
  residual variance and standard errors, save the betas;
* gmfx: ``gmfx.glm`` + the glm stage's writer (one task per vertex block, resumable store) on a
  distributed LocalCluster of one single-threaded worker per core, started inside the timed run.

Each run happens in its own subprocess; the parent samples its RSS (children included) for the peak.
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
VERTICES, FPS, CHUNK, LAGS, CONDITIONS = 5023, 30.0, 1024, 60, ("a", "b", "c", "d")
WINDOW = (0.0, (LAGS - 1) / FPS)
MOTION = ("tx", "ty", "tz", "rx", "ry", "rz")
STARTUP = WORK / "_gmfx_startup.txt"


def make_store(minutes: float) -> tuple[Path, Path]:
    """A synthetic preproc store and its events file, written vertex block by vertex block."""
    import dask.array as da
    import pandas as pd
    import xarray as xr

    from gmfx.stages.preproc import vertex_block_size

    path, events_path = WORK / f"preproc_{minutes:g}min.zarr", WORK / f"events_{minutes:g}min.tsv"
    n = int(minutes * 60 * FPS)
    rng = np.random.default_rng(0)
    onsets = np.cumsum(rng.exponential(1.5, size=int(n / FPS / 1.2))) + 1.0
    onsets = np.round(onsets[onsets < n / FPS - 3] * FPS) / FPS
    events = pd.DataFrame({"onset": onsets, "duration": 0.5, "trial_type": rng.choice(CONDITIONS, onsets.size)})
    if (path / "zarr.json").exists() and events_path.exists():
        return path, events_path
    events.to_csv(events_path, sep="\t", index=False)
    block = vertex_block_size(n, 1, VERTICES, 3)  # as the preproc stage's filter writes
    starts = np.rint(onsets * FPS).astype(int)
    types = np.searchsorted(CONDITIONS, events["trial_type"].to_numpy())
    lag = np.arange(LAGS) / FPS
    shape = (lag / 0.3) ** 2 * np.exp(-lag / 0.15)
    motion = np.cumsum(rng.normal(size=(n, 6)), axis=0) * 0.01
    motion = np.concatenate([motion, np.ones((n, 3)), np.zeros((n, 3))], axis=1)

    def vertices(block_info=None):
        lo, hi = block_info[None]["array-location"][2]
        local = np.random.default_rng(lo)
        m = hi - lo
        v = local.normal(size=(n, m, 3)) * 1e-4 + local.uniform(-0.05, 0.05, size=(1, m, 3))
        patterns = local.normal(size=(len(CONDITIONS), m, 3)) * 1e-3
        for start, c in zip(starts, types):
            v[start : start + LAGS] += shape[:, None, None] * patterns[c]
        v += np.linspace(-1, 1, n)[:, None, None] ** 2 * local.normal(size=(1, m, 3)) * 1e-3
        v += (motion[:, :6] @ local.normal(size=(6, m * 3))).reshape(n, m, 3) * 1e-4  # head motion leaks into v
        return v[:, None].astype(np.float32)

    data = da.map_blocks(vertices, chunks=((n,), (1,), tuple(np.diff(np.r_[0:VERTICES:block, VERTICES])), (3,)), dtype=np.float32)
    ds = xr.Dataset(
        {
            "v": (("time", "face", "vertex", "coord"), data.rechunk({0: CHUNK})),
            "detected": (("time", "face"), np.ones((n, 1), bool)),
            "motion": (("time", "face", "motion_param"), motion[:, None].astype(np.float32)),
        },
        coords={"time": np.arange(n) / FPS, "motion_param": list(MOTION) + ["sx", "sy", "sz", "shear_xy", "shear_xz", "shear_yz"]},
    )
    shutil.rmtree(path, ignore_errors=True)
    with __import__("dask").config.set(scheduler="threads"):
        ds.to_zarr(path, zarr_format=3, consolidated=True, mode="w")
    return path, events_path


def run_naive(source: Path, events: Path, target: Path) -> None:
    """Load everything, dense design, lstsq of every column at once, residual variance and SEs, save."""
    import xarray as xr
    import zarr

    import gmfx

    ds = xr.open_zarr(source)
    times = ds["time"].values
    motion = ds["motion"].sel(motion_param=list(MOTION)).values[:, 0].astype(np.float64)
    design = gmfx.build_design(__import__("pandas").read_csv(events, sep="\t"), times, window=WINDOW, drift_order=3,
                               motion=motion, motion_names=MOTION)  # fmt: skip
    x = design.dense()
    y = ds["v"].values[:, 0].reshape(times.size, -1).astype(np.float64)
    beta, rss, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    sigma2 = rss / (x.shape[0] - rank)
    se = np.sqrt(np.outer(np.diag(np.linalg.inv(x.T @ x)), sigma2))
    out = zarr.open_group(str(target), mode="w")
    out.create_array("beta", data=beta[: design.n_interest].astype(np.float32))
    out.create_array("se", data=se[: design.n_interest].astype(np.float32))


def run_gmfx(source: Path, events: Path, target: Path) -> None:
    """As the CLI runs it: a LocalCluster with one single-threaded worker process per core."""
    import xarray as xr
    from distributed import Client, LocalCluster

    import gmfx
    from gmfx.stages.glm import write_result
    from gmfx.storage import Location

    start = time.perf_counter()
    with LocalCluster(n_workers=os.cpu_count(), threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.run(__import__, "gmfx.stages.glm")  # what a warm CLI cluster has done already
            started = time.perf_counter()
            fit = gmfx.glm(xr.open_zarr(source), events, window=WINDOW, drift_order=3)
            write_result(fit, Location(str(target)), client=client, overwrite=True, progress=False, source=str(source))
            STARTUP.write_text(f"{started - start:.1f} {time.perf_counter() - started:.1f}")


def measure(kind: str, source: Path, events: Path) -> tuple[float, float]:
    """Wall time (s) and peak RSS (GB) of one run in a fresh subprocess."""
    import psutil

    target = WORK / f"{kind}_{source.stem}_glm.zarr"
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--run", kind, str(source), str(events), str(target)])
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True)))
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
    parser.add_argument("--lengths", type=float, nargs="+", default=[2, 5], help="recording lengths in minutes")
    parser.add_argument("--skip-naive-above", type=float, default=15, help="minutes above which the in-memory fit is not run "
                        "(it holds ~2.5x the recording in float64: ~6 GB for 10 min, ~33 GB for 1 h)")  # fmt: skip
    parser.add_argument("--keep-data", action="store_true", help="keep the synthetic stores in benchmarks/_work")
    parser.add_argument("--run", nargs=4, metavar=("KIND", "SOURCE", "EVENTS", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        kind, source, events, target = args.run
        (run_naive if kind == "naive" else run_gmfx)(Path(source), Path(events), Path(target))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores; {VERTICES} vertices x 3, {FPS:g} fps, {len(CONDITIONS)} conditions x {LAGS} lags, "
          "cubic drift, 6 motion regressors")  # fmt: skip
    print("gmfx runs on a LocalCluster of one single-threaded worker per core, started inside the timed run "
          "(start s: the cluster's start; fit s: glm + store writes on the started cluster)")
    print(f"{'length':>8} {'naive s':>9} {'naive GB':>9} {'gmfx s':>9} {'gmfx GB':>8} {'time ratio':>11} {'mem ratio':>10} {'start s':>8} {'fit s':>6}")
    report = Report("analysis", args)
    for minutes in args.lengths:
        source, events = make_store(minutes)
        gmfx_time, gmfx_mem = measure("gmfx", source, events)
        if minutes <= args.skip_naive_above:
            naive_time, naive_mem = measure("naive", source, events)
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
            report.stage_cost("analysis", "core_s_per_frame", float(run) * (os.cpu_count() or 1) / frames)
        if not args.keep_data:
            shutil.rmtree(source, ignore_errors=True)
    print("ratios: naive / gmfx (above 1 = gmfx faster / lighter)")
    report.write()


if __name__ == "__main__":
    main()
