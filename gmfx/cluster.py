"""Getting a Dask client: an existing scheduler's address, or a local cluster sized to the machine."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psutil
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from gmfx._errors import ClusterError, ModelError, ParameterError, parameter
from gmfx._threads import LOCAL_WORKERS_VARIABLE, thread_environment, usable_cores
from gmfx._version import __version__

if TYPE_CHECKING:
    from gmfx.models import Backend

__all__ = ["GPU_FIX", "connect", "gpu_worker_specs", "gpu_workers", "local_gpu_count", "require_resource", "resolve_device"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(scheduler: str | None = None, *, workers: int | None = None, gpus: int = 0) -> Iterator[Client]:
    """A Dask client for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``); ``None`` starts a local cluster.
    workers
        Worker processes of the local cluster (default: one per core, at most 8).
    gpus
        Local GPUs to use: one worker per GPU, pinned to it with ``CUDA_VISIBLE_DEVICES`` and offering
        the resource ``GPU=1`` (see :func:`gpu_worker_specs`).
    """
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as error:
            raise ClusterError(
                f"cannot reach the Dask scheduler ({error})",
                where=scheduler,
                fix="check the address (tcp://HOST:8786) and that `dask scheduler` is running",
            ) from error
        with client:
            _check_versions(client, scheduler)
            yield client
        return
    n = gpus or workers or min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, 8)
    memory_limit = int(psutil.virtual_memory().total * 0.8 / n)
    if gpus:
        cluster = _start(lambda: SpecCluster(
            scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": dashboard_address()}},
            workers=gpu_worker_specs(gpus, memory_limit=memory_limit),
        ), n)  # fmt: skip
    else:
        cluster = _start(lambda: LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dashboard_address(),
            memory_limit=memory_limit,
            # Ctrl-C stops the command, which stops its workers (no traceback from each); each worker
            # runs on its own cores (gmfx._threads.place_worker), and no library sizes its pool to the
            # whole machine
            preload=["gmfx._worker_setup"],
            env={**thread_environment(max(1, len(usable_cores()) // n)), LOCAL_WORKERS_VARIABLE: str(n)},
        ), n)  # fmt: skip
    client = Client(cluster)
    try:
        yield client
    finally:
        _close(client, cluster)


#: where Dask's dashboard of a local cluster listens when the port is free
DASHBOARD_PORT = 8787


def dashboard_address() -> str:
    """Dask's usual dashboard port when it is free, else any free port: a second gmfx command running
    beside the first gets its own dashboard without distributed's "Port 8787 is already in use" warning
    (``client.dashboard_link`` says where it is)."""
    with socket.socket() as probe:
        try:
            probe.bind(("", DASHBOARD_PORT))
        except OSError:
            return ":0"
    return f":{DASHBOARD_PORT}"


#: seconds a local cluster may take to start its workers (each imports gmfx and its libraries: ~5-15 s
#: measured on a loaded 2-core box) before gmfx gives up with a clear message
START_TIMEOUT = 120.0
#: seconds given to closing the local cluster once the work is done
CLOSE_TIMEOUT = 60.0


def _start(make: Callable[[], SpecCluster], n: int, timeout: float | None = None) -> SpecCluster:
    """Start a local cluster, or fail with a :class:`ClusterError` after ``timeout`` seconds (workers that
    cannot start would otherwise hang forever)."""
    timeout = START_TIMEOUT if timeout is None else timeout
    outcome: dict[str, object] = {}

    def start() -> None:
        try:
            outcome["cluster"] = make()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=start, name="gmfx-cluster-start", daemon=True)
    thread.start()
    thread.join(timeout)
    fix = "check that gmfx imports in a fresh process (python -c 'import gmfx'), free memory, or give --workers fewer"
    if thread.is_alive():
        raise ClusterError(f"the local cluster's {n} workers did not start within {timeout:g} s", where="local cluster", fix=fix)
    if "error" in outcome:
        error = outcome["error"]
        raise ClusterError(
            f"the local cluster could not start ({type(error).__name__}: {error})", where="local cluster", fix=fix
        ) from error  # type: ignore[misc]
    return outcome["cluster"]  # type: ignore[return-value]


def _close(client: Client, cluster: SpecCluster) -> None:
    """Close the client and the local cluster; problems are logged, not raised: the work is done (or
    has already failed with its own error) by the time the cluster goes away."""
    for what, close in (("client", client.close), ("local cluster", cluster.close)):
        try:
            close(timeout=CLOSE_TIMEOUT)
        except Exception as error:  # noqa: BLE001
            log.warning("closing the %s failed (%s: %s); the results are not affected", what, type(error).__name__, error)


def gpu_worker_specs(gpus: int, *, memory_limit: int | str = "auto") -> dict[str, dict]:
    """Worker specs for a local cluster with ``gpus`` GPUs: one single-threaded worker process per GPU,
    which sees only its own GPU (``CUDA_VISIBLE_DEVICES``), offers the resource ``GPU=1`` and sizes the
    CPU libraries' thread pools to its share of the cores (:mod:`gmfx._threads`)."""
    threads = max(1, len(usable_cores()) // gpus)
    return {
        f"gpu-{index}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "memory_limit": memory_limit,
                "env": {"CUDA_VISIBLE_DEVICES": str(index), **thread_environment(threads)},
            },
        }
        for index in range(gpus)
    }


def _check_versions(client: Client, where: str) -> None:
    """Refuse a cluster whose workers run other versions of gmfx or of Dask's core packages."""
    fix = "install the same gmfx environment on the client, scheduler and workers (see deploy/)"
    try:
        client.get_versions(check=True)
    except ValueError as error:
        raise ClusterError(f"package versions differ between this client and the cluster: {error}", where=where, fix=fix) from error
    theirs = client.run(_gmfx_version)
    differing = {worker: version for worker, version in theirs.items() if version != __version__}
    if differing:
        listing = ", ".join(f"{worker} has {version}" for worker, version in sorted(differing.items()))
        raise ClusterError(f"gmfx {__version__} here, but {listing}", where=where, fix=fix)


def _gmfx_version() -> str:
    try:
        from gmfx import __version__ as version
    except ImportError:
        return "not installed"
    return version


def local_gpu_count() -> int:
    """GPUs on this machine, counted with ``nvidia-smi -L`` (no CUDA initialisation in this process)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers that offer the ``GPU`` resource."""
    return _workers_offering(_workers(client), "GPU")


def require_resource(client: Client, resource: str, *, fix: str) -> list[str]:
    """Fail fast unless some worker offers ``resource``; return those workers."""
    workers = _workers(client)
    found = _workers_offering(workers, resource)
    if not found:
        raise ClusterError(
            f"no worker of the cluster offers the {resource} resource ({len(workers)} workers)",
            where=str(client.scheduler.address if client.scheduler else "local cluster"),
            fix=fix,
        )
    return found


def _workers(client: Client) -> dict[str, dict]:
    return client.scheduler_info(n_workers=-1)["workers"]


def _workers_offering(workers: dict[str, dict], resource: str) -> list[str]:
    return sorted(address for address, worker in workers.items() if worker.get("resources", {}).get(resource, 0) >= 1)


#: how to get a GPU worker, for messages that need one
GPU_FIX = (
    "start workers that offer a GPU: `dask worker SCHEDULER_ADDRESS --resources GPU=1` (one per GPU); "
    "for a local cluster use gmfx.connect(gpus=N) (the gmfx command without --scheduler starts one GPU "
    "worker per visible NVIDIA GPU by itself); or run on the CPU with run_recon(device='cpu')"
)


def resolve_device(backend: type[Backend], device: str, client: Client | None = None) -> str:
    """The concrete device (``cpu``/``cuda``/``cuda:N``) for ``device`` (``auto`` picks cuda when a GPU
    worker exists and the backend runs on it); never touches CUDA in this process."""
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ParameterError(
            f"unknown device {device!r}", where=parameter("run_recon", "device"), fix="use auto, cpu, cuda or cuda:N"
        )
    if device == "auto":
        has_gpu = backend.requires_gpu or bool(client is not None and gpu_workers(client))
        device = "cuda" if has_gpu and "cuda" in backend.devices else "cpu"
    if backend.requires_gpu and device == "cpu":
        raise ModelError(
            f"the model {backend.name!r} needs a GPU and cannot run on the CPU",
            where=parameter("run_recon", "device"),
            fix='use run_recon(device="cuda") (or "auto") on a cluster with GPU workers, or choose a CPU model',
        )
    if device.split(":")[0] not in backend.devices:
        raise ModelError(
            f"the model {backend.name!r} runs on {', '.join(backend.devices)} only, not on {device}",
            where=parameter("run_recon", "device"),
            fix=f'use run_recon(device="{backend.devices[0]}") (or "auto")',
        )
    return device
