import pytest

from gmfx import ClusterError
from gmfx.cluster import connect, gpu_workers, require_resource


def test_connect_to_a_command_line_cluster_checks_versions_and_finds_the_gpu_worker(cli_cluster):
    with connect(cli_cluster) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert len(info) == 2
        gpu = gpu_workers(client)
        assert len(gpu) == 1 and info[gpu[0]]["name"] == "gpu-worker"
        assert require_resource(client, "GPU", fix="start one") == gpu


def test_no_gpu_worker_fails_fast_with_how_to_fix():
    with connect(workers=1) as client:
        with pytest.raises(ClusterError) as info:
            require_resource(client, "GPU", fix="start `dask worker ADDRESS --resources GPU=1`, or use --device cpu")
    message = str(info.value)
    assert "no worker of the cluster offers the GPU resource (1 workers)" in message
    assert "--resources GPU=1" in message and "--device cpu" in message


def test_unreachable_scheduler_is_a_clear_error():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with connect(f"tcp://127.0.0.1:{port}"):
            pass


def test_version_mismatch_is_refused(cli_cluster, monkeypatch):
    import gmfx.cluster

    monkeypatch.setattr(gmfx.cluster, "__version__", "0.0.0-other")
    with pytest.raises(ClusterError, match="gmfx 0.0.0-other here, but"):
        with connect(cli_cluster):
            pass


def _visible_devices() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_local_gpu_cluster_pins_one_gpu_per_worker():
    """Without real GPUs the pinning itself is checkable: each worker sees only its own device index."""
    with connect(gpus=2) as client:
        assert len(gpu_workers(client)) == 2
        assert sorted(client.run(_visible_devices).values()) == ["0", "1"]


def test_two_local_clusters_at_once_each_get_a_dashboard_without_a_warning():
    """A second gmfx command beside the first: its dashboard moves to a free port quietly."""
    import warnings

    import gmfx

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gmfx.connect(workers=1) as first, gmfx.connect(workers=1) as second:
            links = {first.dashboard_link, second.dashboard_link}
    assert len(links) == 2, links
    assert not [w for w in caught if "already in use" in str(w.message)], [str(w.message) for w in caught]
