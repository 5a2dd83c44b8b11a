"""DECA/EMOCA on CUDA: equal to the CPU within float tolerance, batched, mixed precision, and CUDA
never initialised in the client. They skip on machines without an NVIDIA GPU (such as CI)."""

import sys

import numpy as np
import pytest

from gmfx.cluster import connect, local_gpu_count
from gmfx.dataset import find_recordings
from gmfx.models._files import MODEL_DIR_ENV
from gmfx.models.deca import DecaBackend
from gmfx.stages.recon import run_recon
from gmfx.storage import Location, open_dataset
from gmfx.testing._model_files import write_model_dir
from gmfx.testing._videos import write_bids_recording

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(local_gpu_count() == 0, reason="needs an NVIDIA GPU (nvidia-smi lists none)"),
]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("models"), grid=(70, 71), n_eye=53, detail=False)


@pytest.fixture(scope="module")
def frames(single_face_frames):
    return single_face_frames.copy()


def test_cuda_equals_cpu_and_mixed_precision_stays_close(model_root, frames, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    cpu = DecaBackend.load("cpu").reconstruct(frames[:8], max_faces=1)
    cuda = DecaBackend.load("cuda").reconstruct(frames[:8], max_faces=1)
    half = DecaBackend.load("cuda", precision="float16").reconstruct(frames[:8], max_faces=1)
    for a, b, c in zip(cpu, cuda, half):
        np.testing.assert_allclose(b[0].vertices, a[0].vertices, atol=0.05)  # pixels
        np.testing.assert_allclose(b[0].codes["exp"], a[0].codes["exp"], atol=1e-3)
        np.testing.assert_allclose(c[0].vertices, a[0].vertices, atol=1.0)
        assert np.isfinite(c[0].vertices).all()


def test_batches_give_the_same_faces_as_single_frames(model_root, frames, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    model = DecaBackend.load("cuda")
    batched = model.reconstruct(frames[:32], max_faces=1)
    model.reset()
    single = [model.reconstruct(frames[i : i + 1], max_faces=1)[0] for i in range(32)]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a[0].vertices, b[0].vertices, atol=0.05)


def test_recon_on_gpu_workers_never_initialises_cuda_in_the_client(model_root, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, str(model_root))
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="faces", video=str(data_dir / "single_face.mp4"))
    recordings = find_recordings(str(tmp_path / "bids"))
    with connect(gpus=local_gpu_count()) as client:
        [location] = run_recon(recordings, Location(str(tmp_path / "out")), client=client, model="deca", device="cuda",
                           batch_size=64, model_options={"model_dir": str(model_root), "precision": "float16"},
                           progress=False)  # fmt: skip
    ds = open_dataset(location, stage="recon")
    assert ds.attrs["device"] == "cuda" and ds["detected"].values.mean() > 0.9
    assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()
