"""EMICA on CUDA: the identity pass and the segments equal the CPU's within float tolerance, and the
CPU model of the same process is left on the CPU. They skip on machines without an NVIDIA GPU (such as CI)."""

import numpy as np
import pytest

from gmfx.cluster import local_gpu_count
from gmfx.models._files import MODEL_DIR_ENV
from gmfx.models.emica import EmicaBackend
from gmfx.testing._emica_files import EMICA_FOLDER, write_emica_model
from gmfx.testing._model_files import write_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU (nvidia-smi lists none)"),
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("models"), grid=(70, 71), n_eye=53, detail=False)
    write_emica_model(root / "EMICA" / EMICA_FOLDER)
    return root


@pytest.fixture(scope="module")
def frames(single_face_frames):
    return single_face_frames[:8].copy()


def test_cuda_equals_cpu_for_identity_and_segments(model_root, frames, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    cpu, cuda = EmicaBackend.load("cpu"), EmicaBackend.load("cuda")
    [identity_cpu] = cpu.estimate_identity(frames, max_faces=1)
    [identity_cuda] = cuda.estimate_identity(frames, max_faces=1)
    np.testing.assert_allclose(identity_cuda.codes["shape"], identity_cpu.codes["shape"], atol=1e-3)
    np.testing.assert_allclose(identity_cuda.signature, identity_cpu.signature, atol=1e-4)
    for a, b in zip(cpu.reconstruct(frames, max_faces=1, identities=[identity_cpu]),
                    cuda.reconstruct(frames, max_faces=1, identities=[identity_cpu])):  # fmt: skip
        np.testing.assert_allclose(b[0].vertices, a[0].vertices, atol=0.05)  # pixels
        np.testing.assert_allclose(b[0].codes["exp"], a[0].codes["exp"], atol=1e-3)
    assert next(cpu.encoder.parameters()).device.type == "cpu"
