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
