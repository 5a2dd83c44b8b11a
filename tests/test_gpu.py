"""Checks that need an NVIDIA GPU; they skip on machines without one (such as CI)."""

import pytest

from gmfx.cluster import connect, gpu_workers, local_gpu_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU (nvidia-smi lists none)"),
]


def _cuda_on_this_worker() -> tuple[bool, int]:
    import torch

    return torch.cuda.is_available(), torch.cuda.device_count()


def test_local_gpu_cluster_pins_gpu_tasks_where_cuda_works():
    """With GPUs on the machine, the local cluster's workers offer GPU=1 and a task that asks for the
    resource runs where torch sees CUDA (the client itself never initialises CUDA)."""
    import sys

    with connect(gpus=local_gpu_count()) as client:
        assert len(gpu_workers(client)) == local_gpu_count()
        available, count = client.submit(_cuda_on_this_worker, resources={"GPU": 1}, pure=False).result()
    assert available and count >= 1
    assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()


def test_gpu_pinned_reconstruction_on_a_local_gpu_cluster(tmp_path):
    """A GPU-declared backend through the recon stage on the local GPU cluster: every task runs on a
    GPU worker (the log names the worker), and that worker sees CUDA."""
    from gmfx.dataset import find_recordings
    from gmfx.stages.decode import run_decode as decode
    from gmfx.stages.recon import run_recon as recon
    from gmfx.storage import Location, open_dataset
    from gmfx.testing import GpuBrightSquareBackend, write_bids_recording

    write_bids_recording(tmp_path / "bids", subject="01", task="gpu", video={"n_frames": 48})
    recordings = find_recordings(str(tmp_path / "bids"))
    out = Location(str(tmp_path / "out"))
    log = tmp_path / "placement.log"
    with connect(gpus=local_gpu_count()) as client:
        decode(recordings, out, client=client, chunk_frames=8, segment_frames=8, progress=False)
        [location] = recon(recordings, out, client=client, model=GpuBrightSquareBackend, device="cuda",
                           segment_frames=8, model_options={"log": str(log)}, progress=False)  # fmt: skip
        used = set(log.read_text().split())
        assert used and used <= set(gpu_workers(client))
        assert all(available for available, _ in client.run(_cuda_on_this_worker, workers=sorted(used)).values())
    ds = open_dataset(location, stage="recon")
    assert ds.attrs["device"] == "cuda" and ds.sizes["time"] == 48
