"""run_pipeline runs each recording's stages on its own: one recording's recon runs on the cluster while
another still decodes, the display keeps one row per stage, and a failure stays with its recording."""

import numpy as np
import pandas as pd
import pytest

from gmfx import ParameterError, find_recordings
from gmfx._execute import one_display
from gmfx.pipeline import run_pipeline
from gmfx.storage import Location, RegionStore, store_location
from gmfx.testing import BrightSquareBackend, write_bids_recording

SHORT, LONG = 48, 640  # frames of sub-01 and sub-02: sub-02 decodes in 80 tasks, sub-01 in 6
SEGMENTS = {
    "decode_options": {"segment_frames": 8, "chunk_frames": 8},
    "recon_options": {"model": BrightSquareBackend, "device": "cpu", "segment_frames": 8},
    "preproc_options": {"filter": False},
}


def _bright(n: int) -> list[np.ndarray]:
    return [np.full((32, 32, 3), 200, np.uint8)] * n


def _events() -> pd.DataFrame:
    return pd.DataFrame({"onset": [0.1], "duration": [0.1], "trial_type": ["a"]})


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory):
    """The pipeline over a short and a long recording on a 2-worker cluster, with its task stream and
    the rows of its progress display."""
    from distributed import Client, LocalCluster, get_task_stream

    root = Location(str(tmp_path_factory.mktemp("bids")))
    write_bids_recording(root, subject="01", task="x", video=dict(frames=_bright(SHORT)), events=_events())
    write_bids_recording(root, subject="02", task="x", video=dict(frames=_bright(LONG)), events=_events())
    recordings = find_recordings(root)
    out = Location(str(tmp_path_factory.mktemp("out")))
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        with one_display(enabled=False) as display, get_task_stream(client) as stream:
            summaries, timings = run_pipeline(recordings, out, client=client, progress=True, **SEGMENTS)
    return recordings, out, summaries, timings, stream.data, display.tasks


def _compute(record: dict) -> tuple[float, float]:
    (span,) = [(s["start"], s["stop"]) for s in record["startstops"] if s["action"] == "compute"]
    return span


@pytest.mark.slow  # the module's 2-worker run: ~16 s on 2 cores
def test_recon_of_one_recording_runs_while_the_other_still_decodes(overlapped):
    recordings, out, summaries, timings, records, _ = overlapped
    assert [s.failed_stage for s in summaries] == [None, None]
    assert [s.frames for s in summaries] == [SHORT, LONG]
    long_decodes = [_compute(r) for r in records if str(r["key"]).startswith("decode-sub-02_task-x-")]
    recons = [_compute(r) for r in records if str(r["key"]).startswith("recon-")]
    assert len(long_decodes) == LONG // 8 and len(recons) == (SHORT + LONG) // 8
    # sub-02's recon waits for its own decode: recon tasks that start earlier are sub-01's; they start
    # before sub-02's last decode task even starts (recon goes before queued decode tasks)
    early = [start for start, _ in recons if start < max(start for start, _ in long_decodes)]
    assert len(early) == SHORT // 8
    for recording in recordings:  # every store is finished
        for stage in ("decode", "recon", "preproc", "epoch"):
            assert RegionStore(store_location(out, recording, stage), stage).is_complete(), (recording.name, stage)


@pytest.mark.slow  # the module's 2-worker run: ~16 s on 2 cores
def test_a_stage_is_one_row_of_the_display_whose_total_grows_per_recording(overlapped):
    *_, rows = overlapped
    descriptions = [row.description for row in rows]
    assert sorted(descriptions) == ["decode", "epochs", "preproc", "recon"]
    by_name = {row.description: row for row in rows}
    assert by_name["decode"].total == by_name["recon"].total == SHORT + LONG  # frames of both recordings
    assert all(row.completed == row.total for row in rows)


@pytest.mark.slow  # the module's 2-worker run: ~16 s on 2 cores
def test_stage_seconds_run_from_the_first_start_to_the_last_end(overlapped):
    _, _, _, timings, records, _ = overlapped
    assert list(timings) == ["decode", "recon", "preproc", "epoch"]
    decodes = [_compute(r) for r in records if str(r["key"]).startswith("decode-")]
    recons = [_compute(r) for r in records if str(r["key"]).startswith("recon-")]
    # a stage's span holds its tasks' compute spans (tasks run inside their stage's calls)
    assert timings["decode"] >= max(e for _, e in decodes) - min(s for s, _ in decodes)
    assert timings["recon"] >= max(e for _, e in recons) - min(s for s, _ in recons)


def test_a_failing_recording_skips_its_later_stages_and_the_other_finishes(tmp_path):
    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=b"not a video at all", events=_events())
    write_bids_recording(root, subject="02", task="x", video=dict(frames=_bright(SHORT)), events=_events())
    recordings = find_recordings(root)
    out = Location(str(tmp_path / "out"))
    with one_display(enabled=False) as display:
        summaries, timings = run_pipeline(recordings, out, client=None, progress=True, **SEGMENTS)
    broken, fine = summaries
    assert broken.failed_stage == "decode" and "video" in broken.error
    assert fine.failed_stage is None and fine.frames == SHORT
    for stage in ("recon", "preproc", "epoch"):
        assert RegionStore(store_location(out, recordings[0], stage), stage).attrs() is None
        assert RegionStore(store_location(out, recordings[1], stage), stage).is_complete()
    assert set(timings) == {"decode", "recon", "preproc", "epoch"}
    assert sorted(row.description for row in display.tasks) == ["decode", "epochs", "preproc", "recon"]


def test_parallel_recordings_must_run_one(tmp_path):
    with pytest.raises(ParameterError, match="parallel_recordings=0"):
        run_pipeline([], Location(str(tmp_path)), client=None, parallel_recordings=0)


def test_a_bug_in_one_recording_cancels_the_others_work_in_flight_and_is_raised(tmp_path, monkeypatch, dask_client):
    """sub-01 (short) meets a client-side bug in recon while sub-02 still decodes: the run raises the bug
    at once, sub-02's queued decode tasks are cancelled and its frames store is not marked complete."""
    from distributed import get_task_stream

    import gmfx.stages.recon

    root = Location(str(tmp_path / "bids"))
    write_bids_recording(root, subject="01", task="x", video=dict(frames=_bright(SHORT)))
    write_bids_recording(root, subject="02", task="x", video=dict(frames=_bright(LONG)))
    recordings = find_recordings(root)
    real_recon = gmfx.stages.recon.run_recon

    def recon_with_a_bug(chosen, *args, **kwargs):
        if chosen[0].name == "sub-01_task-x":
            raise RuntimeError("a bug in recon")
        return real_recon(chosen, *args, **kwargs)

    monkeypatch.setattr(gmfx.stages.recon, "run_recon", recon_with_a_bug)
    out = Location(str(tmp_path / "out"))
    with get_task_stream(dask_client) as stream, pytest.raises(RuntimeError, match="a bug in recon"):
        run_pipeline(recordings, out, client=dask_client, progress=False, **SEGMENTS)
    long_decodes = [r for r in stream.data if str(r["key"]).startswith("decode-sub-02_task-x-")]
    assert len(long_decodes) < LONG // 8  # the rest were cancelled, not run
    assert not RegionStore(store_location(out, recordings[1], "decode"), "decode").is_complete()
