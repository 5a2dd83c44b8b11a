"""Resume, observed: for every stage, a rerun executes exactly the regions (or vertex blocks) whose data
and marker are gone, and a crash between data and marker, or between the last marker and
``gmfx_complete``, reruns correctly. Stages run here without a cluster (a thread per core) so the task
bodies that actually execute can be recorded."""

import json
import pathlib
import shutil
import threading

import numpy as np
import pytest
import xarray as xr

import gmfx.stages.decode as decode_module
import gmfx.stages.preproc as preproc_module
import gmfx.stages.recon as recon_module
from _gmfx_cli_helpers import square_dataset
from gmfx.dataset import find_recordings
from gmfx.storage import Location, RegionStore, store_location
from gmfx.testing import BrightSquareBackend

#: stage -> (module, task body, position of the region index in its arguments)
BODIES = {
    "decode": (decode_module, "decode_region"),
    "recon": (recon_module, "reconstruct_region"),
    "region": (preproc_module, "_write_region"),
    "block": (preproc_module, "_write_vertex_block"),
}


@pytest.fixture
def executed(monkeypatch):
    """(stage, store, region index) of every task body that runs."""
    ran: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    def recording(name, body):
        def wrapper(*args):
            region = next(a for a in args if hasattr(a, "index") and hasattr(a, "slice")) if name in ("decode", "recon") else None
            store = args[0].location if name == "decode" else next(a for a in args[::-1] if hasattr(a, "url"))
            index = region.index if region is not None else args[2]
            with lock:
                ran.append((name, store.name, index))
            return body(*args)

        return wrapper

    for name, (module, attribute) in BODIES.items():
        monkeypatch.setattr(module, attribute, recording(name, getattr(module, attribute)))
    return ran


def _run_all(recordings, out):
    decode_module.run_decode(recordings, out, client=None, chunk_frames=8, segment_frames=8, progress=False)
    recon_module.run_recon(recordings, out, client=None, model=BrightSquareBackend, segment_frames=8, progress=False)
    preproc_module.run_preproc(recordings, out, client=None, filter={"highpass": None, "lowpass": 3.0}, progress=False)
    preproc_module.run_epochs(recordings, out, client=None, progress=False, start=-0.2, end=0.4)
    unfiltered = Location(out.url + "-unfiltered")
    shutil.copytree(pathlib.Path(out.url, "sub-01", "sub-01_task-square_recon.zarr"),
                    pathlib.Path(unfiltered.url, "sub-01", "sub-01_task-square_recon.zarr"))  # fmt: skip
    preproc_module.run_preproc(recordings, unfiltered, client=None, filter=False, progress=False)
    return unfiltered


def _paths(out, unfiltered, recording):
    return {
        "decode": store_location(out, recording, "decode"),
        "recon": store_location(out, recording, "recon"),
        "preproc-filtered": store_location(out, recording, "preproc"),
        "preproc": store_location(unfiltered, recording, "preproc"),
        "epoch": store_location(out, recording, "epoch"),
    }


def _rerun(stage, recordings, out, unfiltered):
    if stage == "decode":
        decode_module.run_decode(recordings, out, client=None, chunk_frames=8, segment_frames=8, progress=False)
    elif stage == "recon":
        recon_module.run_recon(recordings, out, client=None, model=BrightSquareBackend, segment_frames=8, progress=False)
    elif stage == "preproc-filtered":
        preproc_module.run_preproc(recordings, out, client=None, filter={"highpass": None, "lowpass": 3.0}, progress=False)
    elif stage == "preproc":
        preproc_module.run_preproc(recordings, unfiltered, client=None, filter=False, progress=False)
    else:
        preproc_module.run_epochs(recordings, out, client=None, progress=False, start=-0.2, end=0.4)


def _set_complete(location: Location, value: bool) -> None:
    """What a crash before the end of the stage leaves: the store not marked complete."""
    for name in ("zarr.json",):
        path = pathlib.Path(location.url, name)
        meta = json.loads(path.read_text())
        meta["attributes"]["gmfx_complete"] = value
        meta.pop("consolidated_metadata", None)
        path.write_text(json.dumps(meta))


def _delete_region(location: Location, index: int, *, axis_of: dict[str, int]) -> None:
    """Remove region ``index``'s chunks (along each array's region axis) and its marker."""
    root = pathlib.Path(location.url)
    for array, axis in axis_of.items():
        for chunk in (root / array / "c").rglob("*"):
            if chunk.is_file() and int(chunk.relative_to(root / array / "c").parts[axis]) == index:
                chunk.unlink()
    (root / "_gmfx" / "regions" / f"{index:06d}").unlink()


def _load(location):
    """The store's data and attributes, less the identity of its template (``gmfx_instance``, copied to
    ``gmfx_completion``): a fresh token for each store written anew, so it differs between two runs by design."""
    ds = xr.open_zarr(location.url, consolidated=False).load()
    for token in ("gmfx_instance", "gmfx_completion"):
        ds.attrs.pop(token, None)
    return ds


@pytest.mark.slow
def test_each_stage_reruns_exactly_the_missing_region(tmp_path, executed, monkeypatch):
    # this recording is too small for several filter blocks by work: split it anyway, to lose one of them
    monkeypatch.setattr("gmfx.stages.preproc._MIN_TASK_BYTES", 1)
    recordings = find_recordings(square_dataset(tmp_path))
    out = Location(str(tmp_path / "out"))
    unfiltered = _run_all(recordings, out)
    stores = _paths(out, unfiltered, recordings[0])
    reference = {stage: _load(location) for stage, location in stores.items()}
    assert RegionStore(stores["recon"], "recon").attrs()["gmfx_regions"] == 10
    # stage -> (region to delete, arrays and the axis their regions run along, expected task body)
    cases = {
        "decode": (3, {"y_plane": 0, "u_plane": 0, "v_plane": 0}, "decode"),
        "recon": (7, {"v": 0, "mat": 0, "detected": 0, "score": 0}, "recon"),
        "preproc": (1, {"v": 0, "mat": 0, "motion": 0}, "region"),
        "preproc-filtered": (2, {"v": 2}, "block"),  # vertex block 2 of the filtered store
        "epoch": (0, {"v": 0}, "region"),
    }
    for stage, (index, arrays, body) in cases.items():
        location = stores[stage]
        _delete_region(location, index, axis_of=arrays)
        _set_complete(location, False)
        executed.clear()
        _rerun(stage, recordings, out, unfiltered)
        if stage == "preproc-filtered":  # its unfiltered scratch was removed when the stage finished: redone whole
            scratch = [entry for entry in executed if entry[1].endswith("_preproc-scratch.zarr")]
            assert sorted(i for _, _, i in scratch) == list(range(10))
            executed[:] = [entry for entry in executed if entry not in scratch]
        assert executed == [(body, location.name, index)], stage
        assert RegionStore(location, stage).is_complete()
        xr.testing.assert_identical(_load(location), reference[stage])


@pytest.mark.slow
def test_crash_between_data_and_marker_and_between_marker_and_complete(tmp_path, executed):
    recordings = find_recordings(square_dataset(tmp_path))
    out = Location(str(tmp_path / "out"))
    unfiltered = _run_all(recordings, out)
    recon = _paths(out, unfiltered, recordings[0])["recon"]
    reference = _load(recon)
    # data written, marker not: the region is redone (same bytes)
    (pathlib.Path(recon.url) / "_gmfx" / "regions" / "000004").unlink()
    _set_complete(recon, False)
    executed.clear()
    _rerun("recon", recordings, out, unfiltered)
    assert executed == [("recon", recon.name, 4)]
    # every marker in, gmfx_complete not set: nothing is redone, the store is finalized
    _set_complete(recon, False)
    executed.clear()
    _rerun("recon", recordings, out, unfiltered)
    assert executed == [] and RegionStore(recon, "recon").is_complete()
    xr.testing.assert_identical(_load(recon), reference)
    np.testing.assert_array_equal(_load(recon).v.values, reference.v.values)
