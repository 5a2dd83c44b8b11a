"""gmfx.open_study: every complete store of a stage over a study of several recordings, local and S3."""

import numpy as np
import pytest
import xarray as xr

import gmfx
from gmfx.dataset import find_recordings
from gmfx.storage import RegionStore, store_location

# (participant, session, task, run, has events, store state)
RECORDINGS = [
    ("01", None, "faces", None, True, "complete"),
    ("02", "1", "faces", "1", False, "complete"),
    ("02", "1", "faces", "2", True, "incomplete"),
    ("03", None, "faces", None, False, "missing"),
]
EVENTS = "onset\tduration\ttrial_type\n1.0\t0.5\tsmile\n2.5\t0.5\tneutral\n"


def _write_study(root: gmfx.Location) -> dict[str, np.ndarray]:
    """A BIDS tree with a preproc store per recording as RECORDINGS says; returns each store's ``v``."""
    fs, path = root.filesystem()
    for participant, session, task, run, events, _ in RECORDINGS:
        folder = "/".join([path, f"sub-{participant}", *([f"ses-{session}"] if session else [])])
        name = "_".join([f"sub-{participant}", *([f"ses-{session}"] if session else []), f"task-{task}", *([f"run-{run}"] if run else [])])
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(f"{folder}/{name}_video.mp4", b"not decoded here")
        if events:
            fs.pipe_file(f"{folder}/{name}_events.tsv", EVENTS.encode())
    values = {}
    out = root.child("derivatives", "gmfx")
    for recording, (*_, state) in zip(find_recordings(root), RECORDINGS, strict=True):
        if state == "missing":
            continue
        v = np.random.default_rng(len(values)).normal(size=(6, 1, 4, 3)).astype(np.float32)
        ds = xr.Dataset({"v": (("time", "face", "vertex", "coord"), v)}, coords={"time": np.arange(6) / 30})
        store = RegionStore(store_location(out, recording, "preproc"), "preproc")
        store.prepare(ds.chunk({"time": 3}), plan={"regions": 2})
        store.write_region(0, slice(0, 3), {"v": v[:3]})
        if state == "complete":
            store.write_region(1, slice(3, 6), {"v": v[3:]})
            store.finalize()
            values[recording.name] = v
    return values


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_open_study_gives_every_complete_store_lazily(storage, tmp_path, request):
    root = gmfx.Location(str(tmp_path / "study")) if storage == "local" else request.getfixturevalue("s3_root")
    values = _write_study(root)
    with pytest.warns(gmfx.IncompleteStudyWarning) as caught:
        tree = gmfx.open_study(root.url, storage_options=root.storage_options)
    (warning,) = caught
    message = str(warning.message)
    assert "2 of 4 recordings" in message
    assert "sub-02_ses-1_task-faces_run-2_preproc.zarr" in message and "sub-03_task-faces_preproc.zarr" in message
    assert sorted(tree.children) == sorted(values) == ["sub-01_task-faces", "sub-02_ses-1_task-faces_run-1"]
    first = tree["sub-01_task-faces"]
    assert first.dataset["v"].chunks is not None  # lazy: dask arrays
    np.testing.assert_array_equal(first.dataset["v"].values, values["sub-01_task-faces"])
    assert first.coords["participant"].item() == "01" and first.coords["task"].item() == "faces"
    second = tree["sub-02_ses-1_task-faces_run-1"]
    assert (second.coords["session"].item(), second.coords["run"].item()) == ("1", "1")
    np.testing.assert_array_equal(second.dataset["v"].values, values["sub-02_ses-1_task-faces_run-1"])
    events = first["events"].dataset
    np.testing.assert_array_equal(events["onset"].values, [1.0, 2.5])
    assert list(events["trial_type"].values) == ["smile", "neutral"]
    assert "events" not in second.children  # no _events.tsv


def test_open_study_checks_the_stage(tmp_path):
    with pytest.raises(gmfx.ParameterError, match=r"did you mean 'preproc'"):
        gmfx.open_study(tmp_path, stage="preprocessed")
