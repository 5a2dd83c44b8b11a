"""Issue 9: never silently wrong. Stale outputs, missing chunks, moved datasets, implausible frame times,
damaged stores, read-only finished stores."""

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gmfx import FrameTimesError, StorageError, find_recordings
from gmfx._validate import FrameTimesWarning
from gmfx.stages.decode import decode, plan_decode
from gmfx.stages.preproc import chain, epochs, preproc
from gmfx.stages.recon import plan_recon
from gmfx.storage import Location, RegionStore, open_dataset, store_location
from gmfx.testing import synthetic_face, write_bids_recording, write_synthetic_recon

FACE = synthetic_face(120, n_vertices=20, seed=3)
OTHER_FACE = synthetic_face(120, n_vertices=20, seed=4)
NO_FILTER = {"filter": False}
EVENTS = pd.DataFrame({"onset": [1.0, 2.0], "duration": [0.5, 0.5], "trial_type": ["smile", "frown"]})


def _dataset(root: Location, *, n_frames: int = 12, frametimes=None, events=EVENTS):
    write_bids_recording(root, subject="01", task="x", video=dict(n_frames=n_frames), frametimes=frametimes, events=events)
    (recording,) = find_recordings(root)
    return recording


def _completion(location: Location) -> str | None:
    return RegionStore(location, "any").attrs().get("gmfx_completion")


# -- 1. stale downstream outputs -------------------------------------------------------------------
def test_edited_events_file_is_recomputed_under_resume(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("derivatives", "gmfx")
    write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    preproc([recording], out, progress=False, **NO_FILTER)
    (target,) = epochs([recording], out, start=-0.2, end=0.4, progress=False)
    np.testing.assert_array_equal(open_dataset(target, stage="epoch")["onset"].values, [1.0, 2.0])
    edited = pd.DataFrame({"onset": [1.5, 2.5, 3.0], "duration": [0.5] * 3, "trial_type": ["a", "b", "c"]})
    edited.to_csv(recording.events.url, sep="\t", index=False)
    epochs([recording], out, start=-0.2, end=0.4, progress=False)  # --resume, the default
    written = open_dataset(target, stage="epoch")
    np.testing.assert_array_equal(written["onset"].values, [1.5, 2.5, 3.0])
    assert list(written["trial_type"].values) == ["a", "b", "c"]


def test_recon_redone_with_overwrite_makes_preproc_recompute(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("derivatives", "gmfx")
    recon_store = store_location(out, recording, "recon")
    write_synthetic_recon(recon_store, FACE, chunk=32)
    (target,) = preproc([recording], out, progress=False, **NO_FILTER)
    write_synthetic_recon(recon_store, OTHER_FACE, chunk=32)  # e.g. gmfx recon --overwrite with other options
    preproc([recording], out, progress=False, **NO_FILTER)
    expected = chain(open_dataset(recon_store, stage="recon"), filter=False).compute()
    np.testing.assert_allclose(open_dataset(target, stage="preproc")["v"].values, expected["v"].values, atol=1e-6)


# -- 2. missing chunks -------------------------------------------------------------------------------
def test_a_deleted_frames_chunk_is_refused_naming_the_store_and_chunk(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = Location(str(tmp_path / "out"))
    (frames,) = decode([recording], out, client=None, chunk_frames=4, progress=False)
    (tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr" / "frames" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(StorageError, match="1 chunks of the decode store are missing") as info:
        plan_recon(recording, out, device="cpu")
    assert frames.url in str(info.value) and "frames/c/1/0/0/0" in str(info.value)
    assert "--overwrite" in str(info.value)


def test_a_deleted_recon_chunk_is_refused_by_preproc(tmp_path):
    root = Location(str(tmp_path / "bids"))
    recording = _dataset(root)
    out = root.child("out")
    recon_store = write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    fs, path = recon_store.filesystem()
    fs.rm(f"{path}/v/c/2/0/0/0")
    with pytest.raises(StorageError, match="v/c/2/0/0/0") as info:
        preproc([recording], out, progress=False, **NO_FILTER)
    assert recon_store.url in str(info.value)
    assert RegionStore(store_location(out, recording, "preproc"), "preproc").attrs() is None


# -- 3. a moved dataset keeps its plans ------------------------------------------------------------
def test_a_moved_dataset_needs_no_overwrite_and_recomputes_nothing(tmp_path):
    first = Location(str(tmp_path / "first" / "bids"))
    recording = _dataset(first, frametimes=np.arange(12) / 25 + 0.5)
    out = first.child("derivatives", "gmfx")
    decode([recording], out, client=None, chunk_frames=4, progress=False)
    write_synthetic_recon(store_location(out, recording, "recon"), FACE, chunk=32)
    preproc([recording], out, progress=False, **NO_FILTER)
    epochs([recording], out, start=-0.2, end=0.4, progress=False)
    stages = ("decode", "preproc", "epoch")
    tokens = {stage: _completion(store_location(out, recording, stage)) for stage in stages}
    shutil.move(tmp_path / "first", tmp_path / "second")
    moved_root = Location(str(tmp_path / "second" / "bids"))
    (moved,) = find_recordings(moved_root)
    moved_out = moved_root.child("derivatives", "gmfx")
    assert plan_decode(moved, moved_out, chunk_frames=4).tasks == []
    preproc([moved], moved_out, progress=False, **NO_FILTER)
    epochs([moved], moved_out, start=-0.2, end=0.4, progress=False)
    assert {stage: _completion(store_location(moved_out, moved, stage)) for stage in stages} == tokens


# -- 4. implausible frame times --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("times", "message"),
    [
        (np.arange(12) * 40.0, r"span 440 s and median interval 40 s in the frame times, but 0.44 s and 0.04 s"),
        (np.r_[np.arange(11) * 0.04, 44.2], r"span 44.2 s and median interval 0.04 s in the frame times, but 0.44 s"),
    ],
)
def test_implausible_frame_times_are_refused_with_both_numbers(tmp_path, times, message):
    recording = _dataset(Location(str(tmp_path / "bids")), frametimes=times)
    with pytest.raises(FrameTimesError, match=message) as info:
        plan_decode(recording, Location(str(tmp_path / "out")))
    assert recording.frametimes.url in str(info.value) and recording.video.url in str(info.value)


def test_slightly_different_frame_times_warn_and_are_used(tmp_path):
    times = np.arange(12) * 0.042  # a camera clock 5% slower than the container's 25 fps
    recording = _dataset(Location(str(tmp_path / "bids")), frametimes=times)
    with pytest.warns(FrameTimesWarning, match="median interval 0.042 s in the frame times, but 0.44 s and 0.04 s"):
        plan = plan_decode(recording, Location(str(tmp_path / "out")))
    np.testing.assert_allclose(xr.open_zarr(plan.store.location.url, consolidated=False)["time"].values, times)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameTimesWarning)
        plan_decode(_dataset(Location(str(tmp_path / "exact")), frametimes=np.arange(12) / 25), Location(str(tmp_path / "o2")))


# -- 9. damaged stores ------------------------------------------------------------------------------
def test_truncated_zarr_json_names_the_store_and_overwrite_recovers(tmp_path):
    recording = _dataset(Location(str(tmp_path / "bids")))
    out = Location(str(tmp_path / "out"))
    (frames,) = decode([recording], out, client=None, chunk_frames=4, progress=False)
    metadata = tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr" / "zarr.json"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(StorageError, match="damaged") as info:
        plan_decode(recording, out, chunk_frames=4)
    assert str(metadata) in str(info.value) and "--overwrite" in str(info.value)
    decode([recording], out, client=None, chunk_frames=4, overwrite=True, progress=False)
    assert open_dataset(frames, stage="decode").sizes["time"] == 12


# -- smaller ones -----------------------------------------------------------------------------------
def test_a_rerun_leaves_a_finished_store_untouched(tmp_path):
    recording = _dataset(Location(str(tmp_path / "bids")))
    out = Location(str(tmp_path / "out"))
    decode([recording], out, client=None, chunk_frames=4, progress=False)
    store = tmp_path / "out" / "sub-01" / "sub-01_task-x_frames.zarr"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    decode([recording], out, client=None, chunk_frames=4, progress=False)  # nothing to do: nothing written
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
