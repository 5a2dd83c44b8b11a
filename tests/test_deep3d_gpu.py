"""Deep3DFaceRecon on CUDA: equal to the CPU within float tolerance, batched, mixed precision. They skip
on machines without an NVIDIA GPU (such as CI)."""

import numpy as np
import pytest

from gmfx.cluster import local_gpu_count
from gmfx.models._files import MODEL_DIR_ENV
from gmfx.models.deep3d import Deep3dBackend
from gmfx.testing._bfm_files import BFM_FACES, BFM_VERTICES, write_deep3d_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU (nvidia-smi lists none)"),
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    # heads with random weights: the coefficients depend on the image, so batching and precision show
    return write_deep3d_model_dir(tmp_path_factory.mktemp("models"), n_vertices=BFM_VERTICES, n_faces=BFM_FACES, head_scale=0.05)


@pytest.fixture(scope="module")
def frames(single_face_frames):
    return single_face_frames.copy()


def test_cuda_equals_cpu_and_mixed_precision_stays_close(model_root, frames, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    cpu = Deep3dBackend.load("cpu").reconstruct(frames[:8], max_faces=1)
    cuda = Deep3dBackend.load("cuda").reconstruct(frames[:8], max_faces=1)
    half = Deep3dBackend.load("cuda", precision="float16").reconstruct(frames[:8], max_faces=1)
    for a, b, c in zip(cpu, cuda, half):
        np.testing.assert_allclose(b[0].codes["exp"], a[0].codes["exp"], atol=1e-3)
        np.testing.assert_allclose(b[0].vertices, a[0].vertices, atol=0.05)  # pixels
        np.testing.assert_allclose(c[0].vertices, a[0].vertices, atol=1.0)
        assert np.isfinite(c[0].vertices).all()


def test_batches_give_the_same_faces_as_single_frames(model_root, frames, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    model = Deep3dBackend.load("cuda")
    batched = model.reconstruct(frames[:64], max_faces=1)
    model.reset()
    single = [model.reconstruct(frames[i : i + 1], max_faces=1)[0] for i in range(64)]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a[0].vertices, b[0].vertices, atol=0.05)
