"""The whole pipeline on the bundled example: local and S3, a command-line cluster, faults."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import xarray as xr

from gmfx import Location, find_recordings
from gmfx._example import write_example_dataset
from gmfx.pipeline import run_pipeline
from gmfx.storage import RegionStore, open_dataset, store_location

STAGES = ("decode", "recon", "preproc", "epoch")
FAST = {"recon_options": {"device": "cpu"}}


def _gmfx() -> str:
    return str(pathlib.Path(sys.executable).parent / "gmfx")


def _upload(folder: pathlib.Path, root: Location) -> Location:
    fs, base = root.filesystem()
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{base}/study/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return Location(f"{root.url}/study", root.storage_options)


def _stores(out: Location, recording) -> dict[str, xr.Dataset]:
    return {stage: open_dataset(store_location(out, recording, stage), stage=stage).load() for stage in STAGES}


def _assert_same(left: dict[str, xr.Dataset], right: dict[str, xr.Dataset]) -> None:
    for stage in STAGES:
        a, b = left[stage], right[stage]
        assert sorted(a.data_vars) == sorted(b.data_vars), stage
        for name in a.variables:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{stage}:{name}")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> pathlib.Path:
    return write_example_dataset(tmp_path_factory.mktemp("example") / "study")


@pytest.fixture(scope="module")
def clean_run(example, tmp_path_factory):
    """The reference: the whole pipeline on a local store with a fresh local cluster."""
    from distributed import Client, LocalCluster

    out = Location(str(tmp_path_factory.mktemp("clean") / "out"))
    recordings = find_recordings(example)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        summaries, timings = run_pipeline(recordings, out, client=client, progress=False, **FAST)
    return out, recordings[0], summaries, timings


def test_whole_pipeline_on_the_example(clean_run):
    out, recording, summaries, timings = clean_run
    assert set(timings) == set(STAGES)
    (summary,) = summaries
    assert summary.recording == "sub-01_task-faces" and summary.frames == 72
    assert summary.detected_fraction > 0.9
    stores = _stores(out, recording)
    assert stores["recon"].v.dims == ("time", "face", "vertex", "coord")
    assert stores["epoch"].v.dims == ("epoch", "lag", "face", "vertex", "coord")
    assert list(stores["epoch"].trial_type.values) == ["smile", "neutral", "smile"]
    np.testing.assert_allclose(stores["decode"].time.values[:2], [12.5, 12.533333], atol=1e-6)
    assert pathlib.Path(out.url, "dataset_description.json").exists()


def test_s3_input_and_output_equal_the_local_run(clean_run, example, s3_root, dask_client):
    out_local, recording, _, _ = clean_run
    study = _upload(example, s3_root)
    out = Location(f"{s3_root.url}/derivatives/gmfx", s3_root.storage_options)
    (s3_recording,) = find_recordings(study)
    run_pipeline([s3_recording], out, client=dask_client, progress=False, **FAST)
    _assert_same(_stores(out_local, recording), _stores(out, s3_recording))


def test_gmfx_run_against_a_command_line_cluster(clean_run, example, cli_cluster, tmp_path):
    out_local, recording, _, _ = clean_run
    out = tmp_path / "out"
    result = subprocess.run(
        [_gmfx(), "run", str(example), "--out", str(out), "--scheduler", cli_cluster, "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "sub-01_task-faces" in result.stdout and "gmfx.open_recon(" in result.stdout
    _assert_same(_stores(out_local, recording), _stores(Location(str(out)), recording))


def test_worker_killed_while_it_runs_a_recon_task_loses_nothing(example, dask_client, tmp_path):
    """Recon in 9 segments; the worker that the scheduler says is running a recon task is killed; that
    task reruns elsewhere and every store equals a clean run with the same segmentation."""
    from distributed import Client, LocalCluster

    segmentation = {"decode_options": {"segment_frames": 8, "chunk_frames": 8},
                    "recon_options": {"device": "cpu", "segment_frames": 8}}  # fmt: skip
    recordings = find_recordings(example)
    clean = Location(str(tmp_path / "clean"))
    run_pipeline(recordings, clean, client=dask_client, progress=False, **segmentation)
    out = Location(str(tmp_path / "out"))
    killed: list[tuple[str, str]] = []  # (worker address, recon key it was running)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        client.get_task_stream(count=1)  # the scheduler records finished tasks from now on

        def kill_a_worker_running_recon() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                for worker, keys in client.processing().items():
                    running = [str(k) for k in keys if str(k).startswith("recon-")]
                    if running and worker in pids:
                        os.kill(pids[worker], signal.SIGKILL)
                        killed.append((worker, running[0]))
                        return
                time.sleep(0.005)

        watcher = threading.Thread(target=kill_a_worker_running_recon, daemon=True)
        watcher.start()
        run_pipeline(recordings, out, client=client, progress=False, **segmentation)
        watcher.join(timeout=5)
        assert killed, "no worker was seen running a recon task"
        (worker, key), = killed
        finished = [r["worker"] for r in client.get_task_stream() if str(r["key"]) == key]
        assert finished and worker not in finished  # the killed worker's task was run again by another
    assert RegionStore(store_location(out, recordings[0], "recon"), "recon").attrs()["gmfx_regions"] == 9
    _assert_same(_stores(clean, recordings[0]), _stores(out, recordings[0]))


def test_interrupted_client_resumes_only_the_missing_regions(clean_run, example, tmp_path):
    out_local, recording, _, _ = clean_run
    out = tmp_path / "out"
    command = [_gmfx(), "recon", str(example), "--out", str(out), "--device", "cpu", "--workers", "1",
               "--segment-frames", "8", "--no-progress"]  # fmt: skip
    frames = Location(str(out / "sub-01" / "sub-01_task-faces_frames.zarr"))
    def decode_in_chunks_of_8(target: pathlib.Path) -> None:
        subprocess.run([_gmfx(), "decode", str(example), "--out", str(target), "--chunk-frames", "8", "--no-progress"],
                       check=True, capture_output=True, timeout=300)

    decode_in_chunks_of_8(out)
    recon_store = RegionStore(store_location(Location(str(out)), recording, "recon"), "recon")
    markers = pathlib.Path(recon_store.location.url, "_gmfx", "regions")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (markers.exists() and len(list(markers.iterdir())) >= 2):
        assert process.poll() is None, "recon finished before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "resume" in stderr
    done = recon_store.done_regions()
    total = recon_store.attrs()["gmfx_regions"]
    assert 2 <= len(done) < total and not recon_store.is_complete()
    assert open_dataset(frames, stage="decode").attrs["gmfx_complete"]

    from gmfx.stages.recon import plan_recon

    plan = plan_recon(recording, Location(str(out)), device="cpu", segment_frames=8)
    assert len(plan.tasks) == total - len(done)  # only the missing regions are planned
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    assert recon_store.is_complete()
    # the oracle: an uninterrupted run with the same segmentation (MediaPipe's tracker restarts at
    # segment boundaries, so another segmentation gives other values there)
    clean = tmp_path / "clean"
    decode_in_chunks_of_8(clean)
    subprocess.run([*command[:4], str(clean), *command[5:]], check=True, capture_output=True, timeout=600)
    reference = open_dataset(store_location(Location(str(clean)), recording, "recon"), stage="recon")
    result = recon_store.open()
    for name in ("v", "mat", "detected", "score", "time"):
        np.testing.assert_array_equal(result[name].values, reference[name].values, err_msg=name)


def test_credentials_never_reach_outputs_logs_or_errors(example, s3_endpoint):
    from gmfx.testing import make_bucket

    bucket = make_bucket(s3_endpoint)
    secret, key = "sEcReT-value-9f3a", "KEYID-7c21"
    options = Location(f"s3://{bucket}", {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint}})
    study = _upload(example, options)
    args = ["-s", f"key={key}", "-s", f"secret={secret}", "-s", f"client_kwargs.endpoint_url={s3_endpoint}"]
    result = subprocess.run(
        [_gmfx(), "run", study.url, "--device", "cpu", "--workers", "1", "--verbose", "--no-progress", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    failing = subprocess.run(
        [_gmfx(), "decode", f"s3://{bucket}/missing", "--no-progress", *args], capture_output=True, text=True, timeout=120
    )
    assert failing.returncode == 1
    fs, _ = options.filesystem()
    written = fs.find(f"{bucket}/study/derivatives")
    assert any(path.endswith("zarr.json") for path in written)
    for text in [result.stdout, result.stderr, failing.stdout, failing.stderr] + [fs.cat_file(p).decode("latin-1") for p in written]:
        assert secret not in text and key not in text


def test_single_steps_chain_like_the_original_tool_and_equal_preproc(clean_run, tmp_path, dask_client):
    import shutil

    from gmfx import StorageError
    from gmfx.pipeline import run_step

    out_local, recording, _, _ = clean_run
    out = Location(str(tmp_path / "out"))
    recon = store_location(out_local, recording, "recon").url
    shutil.copytree(recon, store_location(out, recording, "recon").url)
    with pytest.raises(StorageError, match="run gmfx align first"):
        run_step("interpolate", [recording], out, client=dask_client, progress=False)
    for step in ("align", "interpolate", "filter"):
        run_step(step, [recording], out, client=dask_client, progress=False)
    filtered = open_dataset(store_location(out, recording, "filter"), stage="filter")
    chained = open_dataset(store_location(out_local, recording, "preproc"), stage="preproc")
    for name in ("v", "motion", "time"):
        np.testing.assert_allclose(filtered[name].values, chained[name].values, rtol=1e-5, atol=1e-4, err_msg=name)
    assert [step["operation"] for step in map(__import__("json").loads, filtered.attrs["gmfx_history"])][-3:] == [
        "align", "interpolate", "filter"
    ]
