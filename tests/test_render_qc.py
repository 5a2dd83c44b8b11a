"""QC measures against the synthetic ground truth, and the gmfx qc / gmfx render commands on a dataset."""

import os
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

import gmfx
from gmfx.cli import app
from gmfx.render import ViewOptions, qc_measures, run_render
from gmfx.storage import Location, store_location
from gmfx.testing import synthetic_face, synthetic_recon_dataset, write_bids_recording, write_synthetic_recon


def test_qc_measures_recover_detection_rotation_and_translation_of_a_synthetic_face():
    face = synthetic_face(120, n_vertices=150, gaps=((30, 45),), noise=0.0, expression=0.0, seed=2)
    measures = qc_measures(synthetic_recon_dataset(face).load())
    assert measures.detected_fraction == pytest.approx(105 / 120)
    ok = np.isfinite(face.mat[:, 0, 0, 0])
    rotations = Rotation.from_matrix(face.mat[ok, 0, :3, :3])
    # relative to the median pose, as QC defines it: compare frame-to-frame rotations, independent of the reference
    pairs = rotations[1:] * rotations[:-1].inv()
    measured = Rotation.from_rotvec(np.deg2rad(measures.rotation[ok]))
    np.testing.assert_allclose((measured[1:] * measured[:-1].inv()).magnitude(), pairs.magnitude(), atol=1e-5)
    np.testing.assert_allclose(np.diff(measures.translation[ok], axis=0), np.diff(face.mat[ok, 0, :3, 3], axis=0), atol=1e-6)
    assert np.isnan(measures.rotation[~ok]).all()
    # rigid motion without noise moves vertices smoothly: jitter far below a noisy copy's
    noisy = synthetic_face(120, n_vertices=150, noise=2e-3, expression=0.0, seed=2)
    assert np.nanmedian(qc_measures(synthetic_recon_dataset(noisy).load()).jitter) > 5 * np.nanmedian(measures.jitter)


@pytest.fixture
def dataset(tmp_path):
    """One recording (a short video) whose recon store is a synthetic face (no MediaPipe needed)."""
    root = tmp_path / "bids"
    write_bids_recording(str(root), subject="01", task="mini", video={"n_frames": 40, "width": 64, "height": 48})
    (recording,) = gmfx.find_recordings(str(root))
    out = Location(str(root / "derivatives" / "gmfx"))
    write_synthetic_recon(store_location(out, recording, "recon"), synthetic_face(40, n_vertices=100, time_jitter=0.3), chunk=16)
    return root, out, recording


def test_gmfx_qc_writes_one_page_with_a_figure_per_recording(dataset):
    root, out, recording = dataset
    result = CliRunner().invoke(app, ["qc", str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    page = out.child("qc", "index.html")
    text = open(page.url).read()
    assert f"{recording.name}_qc.png" in text and "face found" in text
    figure = out.child("qc", f"{recording.name}_qc.png").url
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_gmfx_render_writes_a_video_and_a_still_and_reports_bad_options(dataset, dask_client):
    import av

    root, out, recording = dataset
    runner = CliRunner()
    scheduler = dask_client.scheduler.address  # a running cluster, as --scheduler gives one
    args = ["render", str(root), "--no-progress", "--space", "world", "--panels", "mesh", "--size", "64x48", "--scheduler", scheduler]
    result = runner.invoke(app, args + ["--segment-frames", "16"])
    assert result.exit_code == 0, result.output
    video = out.child(recording.relative_dir, f"{recording.name}_recon_world_mesh.mp4").url
    with av.open(video) as container:
        assert sum(1 for _ in container.decode(video=0)) == 40
    # a rerun keeps the finished video; another view under the same name (another opacity) redoes it
    written = os.stat(video).st_mtime_ns
    view = ViewOptions(space="world", panels=("mesh",), size=(64, 48))
    assert run_render([recording], out, client=None, view=view, progress=False)[0].url == video
    assert os.stat(video).st_mtime_ns == written
    run_render([recording], out, client=None, view=replace(view, opacity=0.3), progress=False)
    assert os.stat(video).st_mtime_ns != written
    result = runner.invoke(app, args + ["--frame", "3"])
    assert result.exit_code == 0 and result.output.strip().endswith("_recon_world_mesh_frame-3.png")
    result = runner.invoke(app, args[:5] + ["--panels", "mesh,face"])
    assert result.exit_code == 1 and "panels" in result.output and "how to fix" in result.output
