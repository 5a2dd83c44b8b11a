"""deploy/ recipes run where they can: the multi-GPU start script started for real (CPU workers) and used
by gmfx run; the SLURM launcher started for real against stand-in sbatch/scancel commands that run the
job script dask-jobqueue wrote; the Kubernetes manifests validated against the Dask operator's CRD
schemas shipped in the dask-kubernetes wheel."""

import copy
import importlib.metadata
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import time

import jsonschema
import numpy as np
import pytest
import yaml

from _gmfx_cli_helpers import plugin_site, square_dataset
from gmfx.storage import Location, open_dataset

DEPLOY = pathlib.Path(__file__).resolve().parents[1] / "deploy"
NAME = "sub-01_task-square"


# -- Kubernetes: the operator's published schemas ---------------------------------------------------
def _crd_schemas() -> dict[str, dict]:
    """kind -> openAPIV3Schema of the Dask operator's CRDs, from the installed dask-kubernetes
    distribution's files (its Helm chart), without importing the package."""
    distribution = importlib.metadata.distribution("dask-kubernetes")
    schemas = {}
    for file in distribution.files or []:
        if "/crds/" in str(file) and str(file).endswith(".yaml"):
            crd = yaml.safe_load(distribution.locate_file(file).read_text())
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def _strict(schema):
    """The schema with unknown fields refused where Kubernetes would silently drop them (a misspelt
    key in a manifest is an error here, not a setting that quietly does nothing)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _validate(document: dict, schemas: dict) -> None:
    schema = _strict(schemas[document["kind"]])
    # every object has these (Kubernetes' own ObjectMeta, not part of the CRD's schema)
    schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
    jsonschema.validate(document, schema, cls=jsonschema.Draft7Validator)


@pytest.fixture(scope="module")
def crd_schemas():
    schemas = _crd_schemas()
    assert {"DaskCluster", "DaskWorkerGroup", "DaskJob", "DaskAutoscaler"} <= set(schemas)
    return schemas


@pytest.mark.parametrize("manifest", ["daskcluster.yaml", "gpu-workergroup.yaml"])
def test_kubernetes_manifests_follow_the_dask_operator_crd_schemas(manifest, crd_schemas):
    (document,) = yaml.safe_load_all((DEPLOY / "kubernetes" / manifest).read_text())
    assert document["apiVersion"] == "kubernetes.dask.org/v1"
    _validate(document, crd_schemas)


def test_the_crd_check_refuses_misspelt_and_mistyped_fields(crd_schemas):
    (document,) = yaml.safe_load_all((DEPLOY / "kubernetes" / "daskcluster.yaml").read_text())
    misspelt = copy.deepcopy(document)
    misspelt["spec"]["worker"]["replica"] = misspelt["spec"]["worker"].pop("replicas")
    mistyped = copy.deepcopy(document)
    mistyped["spec"]["worker"]["replicas"] = "4"
    misplaced = copy.deepcopy(document)
    misplaced["spec"]["worker"]["spec"]["containers"][0]["envfrom"] = misplaced["spec"]["worker"]["spec"]["containers"][0].pop("envFrom")
    for broken in (misspelt, mistyped, misplaced):
        with pytest.raises(jsonschema.ValidationError):
            _validate(broken, crd_schemas)


# -- SLURM: the launcher with dask-jobqueue, against stand-in sbatch/scancel -------------------------
_SBATCH = """#!/usr/bin/env bash
# stand-in for SLURM's sbatch: keep the job script, run it in its own process group, print a job id
set -euo pipefail
jobs="{jobs}"
id=$(( $(ls "$jobs" | grep -c '\\.sh$' || true) + 101 ))
cp "$1" "$jobs/$id.sh"
setsid bash "$jobs/$id.sh" > "$jobs/$id.log" 2>&1 < /dev/null &
echo $! > "$jobs/$id.pid"
echo "Submitted batch job $id"
"""
_SCANCEL = """#!/usr/bin/env bash
# stand-in for SLURM's scancel: stop each job's process group
for id in "$@"; do kill -TERM -- "-$(cat "{jobs}/$id.pid")" 2>/dev/null || true; done
"""


def _worker_addresses(log: pathlib.Path) -> list[str]:
    """The addresses that ``dask worker`` logged it started at."""
    return [line.split("Start worker at:")[1].strip() for line in log.read_text().splitlines() if "Start worker at:" in line]


def _executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_launcher_job_script_starts_a_gpu_worker_that_gmfx_run_uses(tmp_path):
    jobs, bin_dir, home = tmp_path / "jobs", tmp_path / "bin", tmp_path / "home"
    for folder in (jobs, bin_dir, home / "gmfx-venv" / "bin"):
        folder.mkdir(parents=True)
    (home / "gmfx-venv" / "bin" / "activate").write_text("# the environment is already active\n")
    _executable(bin_dir / "sbatch", _SBATCH.format(jobs=jobs))
    _executable(bin_dir / "scancel", _SCANCEL.format(jobs=jobs))
    study = square_dataset(tmp_path)
    out = tmp_path / "out"
    env = plugin_site(tmp_path / "plugins")
    env.update(PATH=f"{bin_dir}{os.pathsep}{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               HOME=str(home), TMPDIR=str(tmp_path))  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "slurm" / "launch_jobqueue.py"), "--jobs", "1", "--timeout", "120", "--",
         str(study), "--out", str(out), "--model", "bright-square-gpu", "--device", "cuda",
         "--model-option", f"log={tmp_path / 'recon.log'}", "--no-progress"],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (script,) = sorted(jobs.glob("*.sh"))
    text = script.read_text()
    printed = result.stdout.split("running:")[0]  # the launcher shows the job script it submits
    assert "#SBATCH --gres=gpu:1" in printed and printed.count("#SBATCH") == text.count("#SBATCH")
    for line in ("#SBATCH -J gmfx-gpu-worker", "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=",
                 "#SBATCH -t 12:00:00", 'source "$HOME/gmfx-venv/bin/activate"', "--resources GPU=1", "--nthreads 1",
                 "--death-timeout 120"):  # fmt: skip
        assert line in text, line
    assert "-m distributed.cli.dask_worker" in text
    # the GPU-declared model ran on the worker that the job script started, and only there
    assert set((tmp_path / "recon.log").read_text().split()) == set(_worker_addresses(jobs / f"{script.stem}.log"))
    recon = open_dataset(Location(str(out / "sub-01" / f"{NAME}_recon.zarr")), stage="recon")
    assert recon.attrs["device"] == "cuda" and recon.detected.values.sum() == 64
    assert open_dataset(Location(str(out / "sub-01" / f"{NAME}_epochs.zarr")), stage="epoch").sizes["epoch"] == 3
    # the launcher cancelled its job: the worker's process group is gone
    pid = int((jobs / f"{script.stem}.pid").read_text())
    deadline = time.monotonic() + 60  # the worker shuts down after scancel's TERM
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the SLURM job's worker is still running after the launcher ended")


# -- a multi-GPU box: the start script with CPU workers ----------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_multi_gpu_start_script_runs_gmfx_on_its_own_cluster(tmp_path):
    study = square_dataset(tmp_path)
    out = tmp_path / "out"
    env = plugin_site(tmp_path / "plugins")
    bin_dir = tmp_path / "bin"  # `dask` of this environment (the script starts `dask scheduler` and `dask worker`)
    bin_dir.mkdir()
    _executable(bin_dir / "dask", f'#!/usr/bin/env bash\nexec "{sys.executable}" -m dask "$@"\n')
    env["PATH"] = f"{bin_dir}{os.pathsep}{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = tmp_path / "logs"
    result = subprocess.run(
        ["bash", str(DEPLOY / "multi-gpu" / "start-cluster.sh"), "--cpu-workers", "2", "--port", str(port),
         "--log-dir", str(logs), "--", str(study), "--out", str(out), "--model", "bright-square",
         "--model-option", f"log={tmp_path / 'recon.log'}", "--no-progress"],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"waiting for 0 GPU and 2 CPU workers at tcp://127.0.0.1:{port}" in result.stdout
    assert "sub-01_task-square" in result.stdout  # gmfx run's summary
    # both CPU workers joined the script's scheduler and were stopped with it
    scheduler_log = (logs / "scheduler.log").read_text()
    assert scheduler_log.count("Register worker addr") == 2 and f":{port}" in scheduler_log
    workers = _worker_addresses(logs / "worker-cpu-0.log") + _worker_addresses(logs / "worker-cpu-1.log")
    assert len(workers) == 2 and set((tmp_path / "recon.log").read_text().split()) <= set(workers)
    preproc = open_dataset(Location(str(out / "sub-01" / f"{NAME}_preproc.zarr")), stage="preproc")
    assert np.isfinite(preproc.v.values).any() and preproc.attrs["gmfx_complete"]
    with pytest.raises(ConnectionRefusedError):  # the script stopped its scheduler
        __import__("socket").create_connection(("127.0.0.1", port), timeout=5).close()
