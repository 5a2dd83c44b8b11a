"""The recon stage on a real distributed cluster: MediaPipe on real videos, placement, faults, S3."""

import json

import numpy as np
import pytest
import xarray as xr

from gmfx import ClusterError, ModelError, StorageError
from gmfx.dataset import find_recordings
from gmfx.stages.decode import open_frames, run_decode
from gmfx.stages.recon import LowDetectionWarning, plan_recon, run_recon, stitch_store
from gmfx.storage import Location, RegionStore, open_dataset, store_location
from gmfx.testing._backends import BrightSquareBackend, GpuBrightSquareBackend
from gmfx.testing._faces import astronaut_motion
from gmfx.testing._videos import write_bids_recording, write_video
from gmfx.types import split_regions

CHUNK = 16  # frames per frames-store chunk and per recon segment in these tests


@pytest.fixture(scope="module")
def mixed_client():
    """Two single-threaded worker processes; only the second offers ``GPU=1``."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    workers = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "host": "127.0.0.1"}}
    with SpecCluster(scheduler=scheduler, workers=workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield client


def _dataset(root, video, **kwargs):
    write_bids_recording(root, subject="01", task="faces", video=video, **kwargs)
    return find_recordings(root)


def _frames(client, recordings, out):
    run_decode(recordings, out, client=client, chunk_frames=CHUNK, segment_frames=CHUNK, progress=False)
    return open_frames(store_location(out, recordings[0], "decode"))  # RGB frames, converted from the planes


@pytest.fixture(scope="module")
def single_face(mixed_client, data_dir, tmp_path_factory):
    """single_face.mp4 decoded and reconstructed with MediaPipe in 16-frame segments."""
    root = tmp_path_factory.mktemp("single")
    recordings = _dataset(str(root / "bids"), str(data_dir / "single_face.mp4"))
    out = Location(str(root / "out"))
    frames = _frames(mixed_client, recordings, out)
    [location] = run_recon(recordings, out, client=mixed_client, segment_frames=CHUNK, progress=False)
    return frames, open_dataset(location, stage="recon"), location


def test_recon_store_follows_the_contract(single_face):
    frames, ds, location = single_face
    n = frames.sizes["time"]
    assert ds["v"].dims == ("time", "face", "vertex", "coord") and ds["v"].shape == (n, 1, 478, 3)
    assert ds["v"].dtype == np.float32 and ds["v"].attrs == {"space": "world", "units": "pixels"}
    assert ds["mat"].shape == (n, 1, 4, 4) and ds["detected"].dtype == bool and ds["score"].dtype == np.float32
    assert ds["tris"].shape == (898, 3) and ds["tris"].dtype == np.int32 and ds["template"].attrs["units"] == "cm"
    assert int(ds["rigid"].sum()) == 33 and ds["rigid_weight"].dtype == np.float32
    np.testing.assert_array_equal(ds["time"].values, frames["time"].values)
    np.testing.assert_array_equal(ds["frame"].values, frames["frame"].values)
    assert list(ds["coord"].values) == ["x", "y", "z"] and list(ds["face"].values) == [0]
    assert ds["v"].encoding["chunks"][0] == CHUNK  # one region per frames chunk group
    attrs = ds.attrs
    assert attrs["model"] == "mediapipe" and attrs["device"] == "cpu" and attrs["max_faces"] == 1
    assert attrs["mediapipe_version"] == "0.10.14" and attrs["min_detection_confidence"] == 0.5
    assert attrs["frames_store"].endswith("_frames.zarr") and attrs["topology"] == "mediapipe-478"
    assert ds["detected"].values.all() and (ds["score"].values > 0.5).all()
    # a face in pixels: inside the 640x360 frame
    v = ds["v"].values
    assert 0 < v[..., 0].min() and v[..., 0].max() < 640 and 0 < v[..., 1].min() and v[..., 1].max() < 360


def test_recon_equals_mediapipe_called_directly_inside_each_segment(single_face):
    import mediapipe as mp

    frames, ds, _ = single_face
    images = frames["frames"].values
    height, width = images.shape[1:3]

    def direct(run):
        with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=1) as mesh:
            results = [mesh.process(image).multi_face_landmarks[0].landmark for image in run]
        return np.array([[(p.x * width, p.y * height, p.z * width) for p in lm] for lm in results], np.float32)

    v = ds["v"].values[:, 0]
    segments = split_regions(len(images), CHUNK)
    for region in segments:  # a tracker restarted at each segment start gives identical landmarks
        np.testing.assert_array_equal(v[region.slice], direct(images[region.slice]))
    # one tracker over the whole video differs only after the segment boundaries, and little:
    # restarting from a fresh detection moves landmarks by at most a few % of the face's size
    continuous = direct(images)
    np.testing.assert_array_equal(v[: CHUNK], continuous[:CHUNK])
    face_size = np.ptp(continuous[..., :2], axis=1).max()
    difference = np.abs(v - continuous).max()
    assert 0 < difference < 0.05 * face_size, (difference, face_size)


def test_video_without_a_face_gives_nan_rows_and_a_warning(mixed_client, data_dir, tmp_path):
    recordings = _dataset(str(tmp_path / "bids"), str(data_dir / "no_face.mp4"))
    out = Location(str(tmp_path / "out"))
    with pytest.warns(LowDetectionWarning, match=r"found in 0\.0% of the 95 frames"):
        [location] = run_recon(recordings, out, client=mixed_client, progress=False)  # decodes first
    ds = open_dataset(location, stage="recon")
    assert ds.sizes["time"] == 95 and not ds["detected"].values.any()
    assert np.isnan(ds["v"].values).all() and np.isnan(ds["mat"].values).all() and np.isnan(ds["score"].values).all()


def test_pose_follows_the_applied_head_rotation(mixed_client, tmp_path):
    motion = astronaut_motion(32, max_angle=20)
    video = write_video(tmp_path / "astronaut.mp4", frames=motion.frames, crf=12)
    recordings = _dataset(str(tmp_path / "bids"), str(video))
    out = Location(str(tmp_path / "out"))
    _frames(mixed_client, recordings, out)
    [location] = run_recon(recordings, out, client=mixed_client, segment_frames=CHUNK, progress=False)
    mat = open_dataset(location, stage="recon")["mat"].values[:, 0].astype(np.float64)
    scale = np.cbrt(np.linalg.det(mat[:, :3, :3]))
    rotation = mat[:, :3, :3] / scale[:, None, None]
    np.testing.assert_allclose(rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (32, 3, 3)), atol=1e-5)
    relative = rotation @ rotation[0].T
    angles = np.degrees(np.arctan2(relative[:, 1, 0], relative[:, 0, 0]))
    np.testing.assert_allclose(angles, motion.angles - motion.angles[0], atol=3.0)
    assert np.abs(relative[:, 2, :2]).max() < 0.1  # in-plane: the rotation axis stays along z


@pytest.fixture(scope="module")
def square_video(mixed_client, tmp_path_factory):
    """A 80-frame video of a bright square moving over black (every 5th frame is black)."""
    root = tmp_path_factory.mktemp("square")
    images = np.zeros((80, 64, 96, 3), np.uint8)
    for i in range(80):
        if i % 5:
            images[i, 10 + i % 20 : 40 + i % 20, 20 + i % 30 : 50 + i % 30] = 220
    video = write_video(root / "square.mp4", frames=images)
    recordings = _dataset(str(root / "bids"), str(video))
    out = Location(str(root / "out"))
    _frames(mixed_client, recordings, out)
    return recordings, out, root


def _placement(client, recordings, out, backend, log, device="auto"):
    run_recon(
        recordings, out, client=client, model=backend, device=device, segment_frames=CHUNK, overwrite=True,
        progress=False, model_options={"log": str(log)},
    )
    return set(log.read_text().split())


def test_gpu_models_run_only_on_gpu_workers_and_cpu_models_on_all(mixed_client, square_video):
    from gmfx.cluster import gpu_workers

    recordings, out, root = square_video
    [gpu_worker] = gpu_workers(mixed_client)
    used = _placement(mixed_client, recordings, out, GpuBrightSquareBackend, root / "gpu.log")
    assert used == {gpu_worker}
    ds = open_dataset(store_location(out, recordings[0], "recon"), stage="recon")
    assert ds.attrs["device"] == "cuda" and ds["detected"].values.sum() == 64
    all_workers = set(mixed_client.scheduler_info()["workers"])
    assert _placement(mixed_client, recordings, out, BrightSquareBackend, root / "cpu.log") == all_workers


def test_gpu_model_without_gpu_workers_fails_before_any_work(dask_client, square_video):
    recordings, out, _ = square_video
    with pytest.raises(ClusterError) as info:
        run_recon(recordings, out, client=dask_client, model=GpuBrightSquareBackend, progress=False)
    assert "--resources GPU=1" in str(info.value) and "run_recon(device='cpu')" in str(info.value)
    with pytest.raises(ModelError, match="needs a GPU"):
        run_recon(recordings, out, client=dask_client, model=GpuBrightSquareBackend, device="cpu", progress=False)
    with pytest.raises(ModelError, match="CPU only|runs on cpu only"):
        run_recon(recordings, out, client=dask_client, model="mediapipe", device="cuda", progress=False)


def test_a_worker_killed_mid_run_leaves_the_same_store_as_a_clean_run(mixed_client, square_video):
    recordings, out, root = square_video
    clean = Location(str(root / "clean"))
    faulty = Location(str(root / "faulty"))
    for target in (clean, faulty):
        _frames(mixed_client, recordings, target)
    run_recon(recordings, clean, client=mixed_client, model=BrightSquareBackend, segment_frames=CHUNK, progress=False)
    marker = root / "exited"
    [location] = run_recon(
        recordings, faulty, client=mixed_client, model=BrightSquareBackend, segment_frames=CHUNK, progress=False,
        model_options={"exit_once": str(marker)},
    )
    assert marker.exists()  # a worker process did die in the middle of a task
    expected = open_dataset(store_location(clean, recordings[0], "recon"), stage="recon")
    got = open_dataset(location, stage="recon")
    xr.testing.assert_identical(got.drop_attrs(), expected.drop_attrs())


def test_end_to_end_on_s3(mixed_client, data_dir, s3_root, single_face):
    recordings = _dataset(s3_root.child("bids"), str(data_dir / "single_face.mp4"))
    out = s3_root.child("derivatives")
    _frames(mixed_client, recordings, out)
    [location] = run_recon(recordings, out, client=mixed_client, segment_frames=CHUNK, progress=False)
    assert location.url.startswith("s3://") and location.exists()
    ds = open_dataset(location, stage="recon")
    assert ds.attrs["frames_store"].startswith("s3://")
    np.testing.assert_array_equal(ds["v"].values, single_face[1]["v"].values)  # same bytes as on a local disk


def _fake_frames_store(location, *, drop=(), version="0.1.0"):
    store = RegionStore(location, "decode")
    template = xr.Dataset(
        {"frames": (("time", "y", "x", "rgb"), np.zeros((4, 8, 8, 3), np.uint8))},
        coords={"time": np.arange(4.0), "frame": ("time", np.arange(4))},
        attrs={"gmfx_version": version},
    ).drop_vars(list(drop))
    store.prepare(template, plan={"regions": 1}, overwrite=True)
    store.write_region(0, slice(0, 4), {"frames": np.zeros((4, 8, 8, 3), np.uint8)} if "frames" not in drop else {})
    store.finalize()


def test_frames_store_missing_variables_or_from_another_version_is_refused(tmp_path):
    [recording] = _dataset(str(tmp_path / "bids"), {"n_frames": 4})
    out = Location(str(tmp_path / "out"))
    frames = store_location(out, recording, "decode")
    _fake_frames_store(frames, drop=["frame"])
    with pytest.raises(StorageError, match=r"frame \(missing\)") as info:
        plan_recon(recording, out, device="cpu")
    assert frames.url in str(info.value) and "--overwrite" in str(info.value)
    _fake_frames_store(frames, version="7.2.0")
    with pytest.raises(StorageError, match="gmfx 7.2.0"):
        plan_recon(recording, out, device="cpu")


def test_plans_have_deterministic_keys_and_pin_gpu_models(tmp_path):
    [recording] = _dataset(str(tmp_path / "bids"), {"n_frames": 4})
    out = Location(str(tmp_path / "out"))
    _fake_frames_store(store_location(out, recording, "decode"))
    first = plan_recon(recording, out, model=BrightSquareBackend, device="cpu")
    again = plan_recon(recording, out, model=BrightSquareBackend, device="cpu")
    assert [t.key for t in first.tasks] == [t.key for t in again.tasks] and len(first.tasks) == 1
    assert first.tasks[0].resources is None
    gpu = plan_recon(recording, out, model=GpuBrightSquareBackend, overwrite=True)
    assert gpu.tasks[0].resources == {"GPU": 1} and gpu.attrs["device"] == "cuda"
    assert gpu.tasks[0].key != first.tasks[0].key
    with pytest.raises(ModelError, match="does not accept the options"):
        plan_recon(recording, out, model="mediapipe", device="cpu", model_options={"min_detection": 0.2}, overwrite=True)


def test_stitching_gives_segments_one_face_index(tmp_path):
    """Two faces whose local order is swapped in the second segment get one index after stitching."""
    store = RegionStore(Location(str(tmp_path / "r_recon.zarr")), "recon")
    left = np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0]], np.float32)
    right = left + [100, 0, 0]
    v = np.stack([np.stack([left, right])] * 4 + [np.stack([right, left])] * 4)  # (8, 2, 4, 3)
    score = np.array([[0.9, 0.6]] * 4 + [[0.6, 0.9]] * 4, np.float32)
    template = xr.Dataset(
        {"v": (("time", "face", "vertex", "coord"), np.zeros_like(v)), "score": (("time", "face"), np.zeros_like(score)),
         "detected": (("time", "face"), np.zeros((8, 2), bool))},
        coords={"time": np.arange(8.0)},
    ).chunk(time=4)
    store.prepare(template, plan={"regions": 2, "region_frames": 4})
    for region in split_regions(8, 4):
        store.write_region(region.index, region.slice, {"v": v[region.slice], "score": score[region.slice], "detected": np.ones((4, 2), bool)})
    stitch_store(store, 2)
    stitch_store(store, 2)  # idempotent
    store.finalize()
    ds = store.open()
    np.testing.assert_array_equal(ds["v"].values[:, 0], np.broadcast_to(left, (8, 4, 3)))
    np.testing.assert_array_equal(ds["score"].values[:, 0], np.full(8, 0.9, np.float32))
    assert json.loads(ds.attrs["gmfx_plan"])["region_frames"] == 4
