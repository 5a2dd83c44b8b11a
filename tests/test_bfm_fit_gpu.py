"""bfm-fit on CUDA (nvdiffrast for the photometric term): the same fit as on the CPU within float
tolerance. Skips on machines without an NVIDIA GPU (such as CI)."""

import numpy as np
import pytest

from gmfx.cluster import local_gpu_count
from gmfx.testing import write_bfm_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU (nvidia-smi lists none)"),
]

QUICK = {"first_rigid_iterations": 100, "first_nonrigid_iterations": 20, "rigid_iterations": 10, "nonrigid_iterations": 5}


def test_cuda_fit_equals_the_cpu_fit(tmp_path, single_face_frames):
    from gmfx.models.bfm_fit import BfmFitBackend

    (tmp_path / "BFM").mkdir()
    write_bfm_model(tmp_path / "BFM" / "BFM_model_front.mat", n_vertices=1500, n_faces=None)
    frames = single_face_frames[:8].copy()
    results = {}
    for device in ("cpu", "cuda"):
        backend = BfmFitBackend.load(device, model_dir=str(tmp_path), landmarks="mediapipe", **QUICK)
        identities = backend.estimate_identity(frames[::2], max_faces=1)
        backend.reset()
        results[device] = (identities, backend.reconstruct(frames, max_faces=1, identities=identities))
    (cpu_ids, cpu), (cuda_ids, cuda) = results["cpu"], results["cuda"]
    np.testing.assert_allclose(cuda_ids[0].codes["id"], cpu_ids[0].codes["id"], atol=0.05)
    for a, b in zip(cpu, cuda):
        np.testing.assert_allclose(b[0].vertices[:, :2], a[0].vertices[:, :2], atol=1.0)  # pixels of the 640 x 360 frame
