"""The command line against a running cluster, checked from the cluster's side (its task stream), and
every command, alias and shared option exercised at least once with an assertion on its result."""

import json
import socket

import numpy as np
import pytest
from distributed import Client

from _gmfx_cli_helpers import gmfx_command, placements, plugin_site, run, square_dataset, task_stream_start
from gmfx.storage import Location, RegionStore, open_dataset

NAME = "sub-01_task-square"


def _store(out, stage):
    suffix = {"decode": "frames", "align": "aligned", "interpolate": "interpolated", "filter": "filtered", "epoch": "epochs"}
    return Location(str(out / "sub-01" / f"{NAME}_{suffix.get(stage, stage)}.zarr"))


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("plugins"))


@pytest.mark.slow
def test_every_stage_command_on_a_scheduler_runs_where_the_cluster_says(cli_cluster, env, tmp_path):
    """decode/recon/preproc/epoch and the gmfx_* aliases with --scheduler (or GMFX_SCHEDULER): recon of
    a GPU-declared plugin backend runs only on the GPU=1 worker; decode and preproc use both workers."""
    study = square_dataset(tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "recon.log"
    with Client(cli_cluster, timeout="30s") as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        [gpu] = [address for address, worker in workers.items() if worker["resources"].get("GPU")]
        start = task_stream_start(client)

        # GMFX_SCHEDULER and GMFX_OUT from the environment; --max-size downscales 96x64 to 48x32
        by_env = {**env, "GMFX_SCHEDULER": cli_cluster, "GMFX_OUT": str(out)}
        _ok(run([gmfx_command("gmfx_decode"), str(study), "--max-size", "48", "--chunk-frames", "8",
                 "--segment-frames", "8", "--no-progress"], by_env))  # fmt: skip
        frames = open_dataset(_store(out, "decode"), stage="decode")
        assert frames.frames.shape == (80, 32, 48, 3) and frames.attrs["gmfx_complete"]

        recon = [gmfx_command("gmfx_recon"), str(study), "--out", str(out), "--scheduler", cli_cluster,
                 "--model", "bright-square-gpu", "--device", "cuda", "--segment-frames", "8", "--batch-size", "3",
                 "--max-faces", "2", "--model-option", f"log={log}", "--no-progress"]  # fmt: skip
        _ok(run(recon, env))
        ds = open_dataset(_store(out, "recon"), stage="recon")
        assert ds.sizes["face"] == 2 and ds.attrs["model"] == "bright-square-gpu" and ds.attrs["device"] == "cuda"
        np.testing.assert_array_equal(ds.detected.values[:, 0], np.arange(80) % 5 != 0)  # every 5th frame is black
        assert not ds.detected.values[:, 1].any()  # one square, one track across the segments
        calls = log.read_text().split()
        assert set(calls) == {gpu}  # --model-option reached the backend on the GPU worker only
        assert len(calls) == 10 * 3  # 10 segments of 8 frames, batches of 3 (--batch-size): 3 calls each

        for command in (["preproc"], ["epoch", "--start", "-0.2", "--end", "0.4"]):
            _ok(run([gmfx_command(), command[0], str(study), "--no-progress", *command[1:]], by_env))
        assert open_dataset(_store(out, "epoch"), stage="epoch").sizes["epoch"] == 3
        for step in ("align", "interpolate", "filter"):
            _ok(run([gmfx_command(f"gmfx_{step}"), str(study), "--no-progress"], by_env))
        filtered = open_dataset(_store(out, "filter"), stage="filter").v.values
        np.testing.assert_allclose(filtered, open_dataset(_store(out, "preproc"), stage="preproc").v.values, rtol=1e-5, atol=1e-3)

        ran = {stage: placements(client, start, stage) for stage in ("decode", "recon", "preproc", "interpolate")}
        assert set(ran["recon"]) == {gpu} and len(ran["recon"][gpu]) == 10
        assert set(ran["decode"]) == set(workers) and sum(map(len, ran["decode"].values())) == 10
        assert set(ran["preproc"]) == set(workers)

        # --resume (the default) runs no recon task; --overwrite runs every one again
        again = task_stream_start(client)
        _ok(run([*recon, "--resume"], env))
        assert placements(client, again, "recon") == {} and len(log.read_text().split()) == 30
        _ok(run([*recon, "--overwrite"], env))
        assert sum(map(len, placements(client, again, "recon").values())) == 10 and len(log.read_text().split()) == 60


@pytest.mark.slow
def test_a_scheduler_that_is_not_there_fails_clearly_and_writes_nothing(env, tmp_path):
    study = square_dataset(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "out"
    result = run([gmfx_command(), "run", str(study), "--out", str(out), "--scheduler", address, "--no-progress"], env)
    assert result.returncode == 1
    assert "cannot reach the Dask scheduler" in result.stderr and address in result.stderr and "dask scheduler" in result.stderr
    assert not out.exists() and not (study / "derivatives").exists()


def test_models_lists_plugins_installed_as_distributions(env):
    result = _ok(run([gmfx_command(), "models"], env))
    assert "bright-square-gpu (version 1): 4 vertices, devices cuda (GPU required), codes brightness (1)" in result.stdout
    assert "mediapipe" in result.stdout


def test_workers_of_the_local_cluster_from_the_environment(env, tmp_path):
    """GMFX_WORKERS sizes the local cluster: with --verbose the scheduler logs each worker that registers."""
    study = square_dataset(tmp_path)
    counted = _ok(run([gmfx_command(), "decode", str(study), "--out", str(tmp_path / "out"), "--no-progress", "--verbose"],
                      {**env, "GMFX_WORKERS": "1"}))  # fmt: skip
    assert counted.stderr.count("Register worker addr") == 1
    assert RegionStore(_store(tmp_path / "out", "decode"), "decode").is_complete()
    assert json.loads((tmp_path / "out" / "dataset_description.json").read_text())["Name"]
