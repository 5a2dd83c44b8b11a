"""The two-pass recon stage of models with a per-face identity: pass 1 estimates each face's identity
once per recording from evenly spaced frames and stores it with the frames used; pass 2 runs every
segment with it. The oracle is NumPy/SciPy on the decoded frames, grouped by the known layout."""

import numpy as np
import pytest
from scipy import ndimage

from gmfx import ModelError
from gmfx.dataset import find_recordings
from gmfx.models import Identity
from gmfx.stages.decode import run_decode
from gmfx.stages.recon import LowDetectionWarning, plan_recon, run_recon
from gmfx._execute import run_tasks
from gmfx.storage import Location, open_dataset, store_location
from gmfx.testing import ColourIdentityBackend, write_bids_recording, write_video

CHUNK = 16
N = 80
RED, BLUE = (230, 40, 40), (40, 70, 230)


def _layout(i):
    """Which colour is on the left and right in frame ``i`` (``None``: absent): the two faces swap
    sides at frame 40, every 10th frame (5, 15, ...) is black, every 7th shows red alone."""
    if i % 10 == 5:
        return None, None
    left, right = (RED, BLUE) if i < 40 else (BLUE, RED)
    if i % 7 == 3:
        return (left, None) if left == RED else (None, right)
    return left, right


def _video(path):
    images = np.zeros((N, 64, 96, 3), np.uint8)
    for i in range(N):
        left, right = _layout(i)
        if left:
            images[i, 16:44, 6 + i % 8 : 34 + i % 8] = left
        if right:
            images[i, 16:44, 56 + i % 8 : 84 + i % 8] = right
    return write_video(path, frames=images, crf=10)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    write_bids_recording(str(root / "bids"), subject="01", task="two", video=str(_video(root / "two.mp4")))
    recordings = find_recordings(str(root / "bids"))
    return recordings, root


def _decode(recordings, out):
    run_decode(recordings, out, client=None, chunk_frames=CHUNK, segment_frames=CHUNK, progress=False)
    return open_dataset(store_location(out, recordings[0], "decode"), stage="decode")["frames"].values


def _observed(images):
    """Per frame and colour, the decoded blob's mean colour (NumPy/SciPy, grouped by the known layout)."""
    seen = {RED: {}, BLUE: {}}
    for i, image in enumerate(images):
        labels, n = ndimage.label(image.max(axis=2) > 64)
        blobs = [labels == k for k in range(1, n + 1) if (labels == k).sum() >= 16]
        for colour in _layout(i):
            if colour is None:
                continue
            on_left = (colour == _layout(i)[0])
            [mask] = [m for m in blobs if (np.nonzero(m)[1].mean() < 48) == on_left]
            seen[colour][i] = image[mask].mean(axis=0)
    return seen


def test_identity_is_the_robust_average_of_the_sampled_frames_and_segments_use_it(recording, dask_client):
    recordings, root = recording
    out = Location(str(root / "out"))
    images = _decode(recordings, out)
    log = root / "calls.log"
    [location] = run_recon(recordings, out, client=dask_client, model=ColourIdentityBackend, max_faces=2,
                           segment_frames=CHUNK, progress=False, model_options={"log": str(log)})
    ds = open_dataset(location, stage="recon")
    assert sorted(log.read_text().split()) == ["identity"] + ["segment"] * (N // 4)  # reconstruct takes batches of 4 frames
    assert ds["identity_colour"].dims == ("face", "colour_param") and ds["identity_frame"].dims == ("face", "identity_sample")
    assert "code_colour" not in ds and ds["code_contrast"].dims == ("time", "face", "contrast_param")

    picks = np.round(np.linspace(0, N - 1, 8)).astype(int)  # 8 frames evenly spaced, ends included
    seen = _observed(images)
    identity = ds["identity_colour"].values
    for colour in (RED, BLUE):
        used = [i for i in picks if i in seen[colour]]
        expected = np.median([seen[colour][i] for i in used], axis=0)
        [slot] = [k for k in range(2) if np.abs(identity[k] - expected).max() < 1e-3]
        np.testing.assert_allclose(identity[slot], expected, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(ds["identity_frame"].values[slot], np.pad(used, (0, 8 - len(used)), constant_values=-1))
        np.testing.assert_array_equal(ds["identity_signature"].values[slot], identity[slot])
        # every frame's face is in its identity's slot, across the swap of sides at frame 40
        present = np.array([i in seen[colour] for i in range(N)])
        np.testing.assert_array_equal(ds["detected"].values[:, slot], present)
        contrast = ds["code_contrast"].values[present, slot]
        np.testing.assert_allclose(contrast, np.array([seen[colour][i] for i in np.flatnonzero(present)]) - identity[slot], atol=1e-3)
        assert np.isnan(ds["code_contrast"].values[~present, slot]).all()
    assert 45 not in ds["identity_frame"].values  # a black frame sampled is not used


def test_a_resumed_run_reuses_the_stored_identity(recording):
    import zarr

    recordings, root = recording
    out = Location(str(root / "resume"))
    _decode(recordings, out)
    log = root / "resume.log"
    options = {"log": str(log)}
    plan = plan_recon(recordings[0], out, model=ColourIdentityBackend, max_faces=2, segment_frames=CHUNK, device="cpu",
                      model_options=options)
    first = [task for task in plan.tasks if task.key.startswith("recon-identity-")]
    assert len(first) == 1 and len(plan.tasks) == 1 + N // CHUNK
    run_tasks(None, first, description="identity", progress=False)  # pass 1 only, then "interrupted"
    group = zarr.open_group(plan.store.location.url, mode="r+")
    stored = group["identity_colour"][:]
    group["identity_colour"][:] = stored + 5  # the rerun must use what the store holds
    again = plan_recon(recordings[0], out, model=ColourIdentityBackend, max_faces=2, segment_frames=CHUNK, device="cpu",
                       model_options=options)
    assert not any(task.key.startswith("recon-identity-") for task in again.tasks)
    [location] = run_recon(recordings, out, client=None, model=ColourIdentityBackend, max_faces=2, segment_frames=CHUNK,
                           progress=False, model_options=options)
    assert log.read_text().split().count("identity") == 1
    ds = open_dataset(location, stage="recon")
    np.testing.assert_array_equal(ds["identity_colour"].values, stored + 5)
    detected = ds["detected"].values
    colour = ds["code_contrast"].values + ds["identity_colour"].values[None]  # the frame's own colour
    unshifted = ds["code_contrast"].values + stored[None]
    assert np.allclose((colour - unshifted)[detected], 5)


def test_a_recording_without_a_face_keeps_nan_identity_and_rows(tmp_path):
    images = np.zeros((20, 32, 48, 3), np.uint8)
    write_bids_recording(str(tmp_path / "bids"), subject="01", task="none", video=str(write_video(tmp_path / "black.mp4", frames=images)))
    recordings = find_recordings(str(tmp_path / "bids"))
    out = Location(str(tmp_path / "out"))
    _decode(recordings, out)
    log = tmp_path / "calls.log"
    with pytest.warns(LowDetectionWarning, match="identity pass saw no face in the 8 frames"):
        [location] = run_recon(recordings, out, client=None, model=ColourIdentityBackend, max_faces=2, progress=False,
                               model_options={"log": str(log)})
    assert log.read_text().split() == ["identity"]  # the segments did not run the model
    ds = open_dataset(location, stage="recon")
    assert np.isnan(ds["identity_colour"].values).all() and (ds["identity_frame"].values == -1).all()
    assert not ds["detected"].values.any() and np.isnan(ds["code_contrast"].values).all()


class _WrongIdentity(ColourIdentityBackend):
    name = "wrong-identity"

    def estimate_identity(self, frames, *, max_faces):
        return [Identity({"color": np.zeros(3, np.float32)}, np.array([0]), np.zeros(3, np.float32))]


def test_a_backend_breaking_the_identity_contract_is_named(recording):
    recordings, root = recording
    out = Location(str(root / "wrong"))
    _decode(recordings, out)
    with pytest.raises(ModelError, match=r"identity 0 has codes \['color'\], declared \['colour'\]") as info:
        run_recon(recordings, out, client=None, model=_WrongIdentity, max_faces=2, segment_frames=CHUNK, progress=False)
    assert "identity pass over frames [0, 11, 23, 34, 45, 56, 68, 79]" in str(info.value)


def test_the_conformance_kit_checks_backends_with_an_identity(recording):
    from gmfx.testing import check_backend

    recordings, root = recording
    images = _decode(recordings, Location(str(root / "kit")))
    check_backend(ColourIdentityBackend, frames=images[:12], max_faces=2)

    class Untagged(ColourIdentityBackend):
        name = "untagged"

        def reconstruct(self, frames, *, max_faces, identities=()):
            return [[Face(f.vertices, f.mat, f.score, f.codes) for f in faces] for faces in super().reconstruct(frames, max_faces=max_faces, identities=identities)]

    from gmfx.models import Face

    with pytest.raises(ModelError, match=r"Face\.identity \[None"):
        check_backend(Untagged, frames=images[:12], max_faces=2)
