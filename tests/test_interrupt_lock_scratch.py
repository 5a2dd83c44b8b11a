"""Issue 9: Ctrl-C prints one line, concurrent runs on one store, the filter's scratch store."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from gmfx._example import write_example_dataset


def _gmfx() -> str:
    return str(pathlib.Path(sys.executable).parent / "gmfx")


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    study = write_example_dataset(tmp_path / "study")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [_gmfx(), "run", str(study), "--out", str(out), "--device", "cpu", "--workers", "1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit SIG_IGN
    )
    deadline = time.monotonic() + 120
    # interrupt once decode has written its first region: the cluster and the work are running
    while time.monotonic() < deadline and not any(out.rglob("_gmfx/regions/*")):
        assert process.poll() is None, "gmfx run ended before it could be interrupted"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group: gmfx and its cluster's processes
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr
    # the one line, once, last (a busy dashboard port may add distributed's start-up warning before it)
    assert stderr.count("interrupted") == 1 and stderr.rstrip().endswith("\ninterrupted: rerun the same command to resume") or \
        stderr.strip() == "interrupted: rerun the same command to resume", stderr


def _template():
    import numpy as np
    import xarray as xr

    return xr.Dataset({"v": (("time", "x"), np.zeros((8, 3), "float32"))}).chunk({"time": 4})


def test_two_runs_preparing_one_store_write_its_template_once(tmp_path, monkeypatch):
    import threading

    import xarray as xr

    from gmfx import Location
    from gmfx.storage import RegionStore

    location = Location(str(tmp_path / "derivatives" / "sub-01_frames.zarr"))
    plan = {"regions": 2, "inputs": "same"}
    writes = []
    to_zarr = xr.Dataset.to_zarr

    def slow_to_zarr(self, *args, **kwargs):  # widen the race: both runs see no store before either writes
        writes.append(threading.get_ident())
        time.sleep(0.5)
        return to_zarr(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", slow_to_zarr)
    barrier = threading.Barrier(2)
    done: list[set[int]] = []

    def run() -> None:
        store = RegionStore(location, "decode")
        barrier.wait()
        done.append(store.prepare(_template(), plan=plan))
        store.write_region(len(done) - 1, slice(0, 4) if len(done) == 1 else slice(4, 8), {"v": np.ones((4, 3))})

    import numpy as np

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(writes) == 1  # the second run resumed into the first's template instead of deleting it
    store = RegionStore(location, "decode")
    assert store.done_regions() == {0, 1}  # neither run's region was deleted by the other
    assert not (tmp_path / "derivatives" / "sub-01_frames.zarr.lock").exists()


def test_a_held_lock_is_a_clear_error_and_a_stale_one_is_removed(tmp_path, monkeypatch):
    import json
    import socket

    from gmfx import Location
    from gmfx._errors import StorageError
    from gmfx.storage import RegionStore, _regions

    monkeypatch.setattr(_regions, "LOCK_WAIT_S", 0.3)
    location = Location(str(tmp_path / "sub-01_frames.zarr"))
    lock = tmp_path / "sub-01_frames.zarr.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 4242, "time": time.time()}))
    with pytest.raises(StorageError) as error:
        RegionStore(location, "decode").prepare(_template(), plan={"regions": 2})
    assert "elsewhere" in str(error.value) and "4242" in str(error.value) and str(lock) in str(error.value)
    assert not (tmp_path / "sub-01_frames.zarr").exists()
    # a dead process of this host, and a lock from an hour ago, are stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    for holder in ({"host": socket.gethostname(), "pid": int(dead), "time": time.time()},
                   {"host": "elsewhere", "pid": 4242, "time": time.time() - 3600}):  # fmt: skip
        lock.write_text(json.dumps(holder))
        assert RegionStore(location, "decode").prepare(_template(), plan={"regions": 2}, overwrite=True) == set()
        assert not lock.exists()


def test_a_failed_filter_keeps_only_a_named_scratch_store_which_success_removes(tmp_path, monkeypatch):
    from gmfx import Location
    from gmfx._errors import StorageError
    from gmfx.stages import preproc as preproc_module
    from gmfx.storage import RegionStore, store_location
    from tests.test_preproc_stage import FILTER, _recording, _write_recon

    root = Location(str(tmp_path / "bids"))
    recording = _recording(root, events=False)
    out = root.child("derivatives", "gmfx")
    _write_recon(out, recording)
    target = store_location(out, recording, "preproc")
    real = preproc_module.execute_plans

    def failing_filter(client, plans, *, description, progress):
        if description == "preproc (filter)":
            raise StorageError("a filter block cannot be written", where=target.url, fix="check the disk")
        return real(client, plans, description=description, progress=progress)

    monkeypatch.setattr(preproc_module, "execute_plans", failing_filter)
    with pytest.raises(StorageError) as error:
        preproc_module.run_preproc([recording], out, filter=FILTER, progress=False)
    names = [p.name for p in pathlib.Path(target.url).parent.iterdir()]
    assert pathlib.Path(target.url).name.removesuffix(".zarr") + "-scratch.zarr" in names  # kept for the rerun, named as scratch
    assert not any(name.endswith("-unfiltered.zarr") for name in names)
    message = str(error.value)
    assert "check the disk" in message and "scratch" in message and "-scratch.zarr" in message and "removed when preproc succeeds" in message
    monkeypatch.setattr(preproc_module, "execute_plans", real)
    preproc_module.run_preproc([recording], out, filter=FILTER, progress=False)
    assert RegionStore(target, "preproc").is_complete()
    assert not any(p.name.endswith("-scratch.zarr") for p in pathlib.Path(target.url).parent.iterdir())
