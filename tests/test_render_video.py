"""Videos and views of mesh stores: frame times kept (VFR stays VFR), colour maps, stills, the stage over a
real Dask cluster on a real face, and failures that leave no finished-looking file."""


import av
import numpy as np
import pytest
import xarray as xr

import gmfx
import gmfx.testing
from gmfx import GmfxError, ParameterError, StorageError
from gmfx.render import ViewOptions, render_frames, render_still, render_video
from gmfx.storage import Location, store_location
from gmfx.testing import synthetic_face, write_synthetic_recon


def decoded(path):
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return np.array([f.time for f in frames]), np.stack([f.to_ndarray(format="rgb24") for f in frames])


@pytest.fixture(scope="module")
def vfr_store(tmp_path_factory):
    """A synthetic face with irregular frame times (jitter of 40% of a frame interval), 70 frames."""
    face = synthetic_face(70, n_vertices=120, time_jitter=0.4, seed=3)
    location = Location(str(tmp_path_factory.mktemp("vfr") / "recon.zarr"))
    write_synthetic_recon(location, face, chunk=16)
    return location, face


def test_video_has_the_store_frame_count_and_times_and_variable_rate_stays_variable(vfr_store, tmp_path):
    location, face = vfr_store
    view = ViewOptions(space="world", size=(96, 80))
    out = render_video(location, tmp_path / "world.mp4", view=view, segment_frames=16, progress=False)
    times, images = decoded(out.url)
    assert len(times) == len(face.times) == 70
    np.testing.assert_allclose(times, face.times - face.times[0], atol=1 / 90000)
    assert np.std(np.diff(times)) > 0.1 * np.mean(np.diff(times))  # irregular, as the source
    assert images.shape[1:] == (80, 96, 3)
    assert (images.max(axis=-1) > 60).mean() > 0.1  # the mesh is drawn in every segment
    assert all((image.max(axis=-1) > 60).any() for image in images)


def test_odd_sizes_are_padded_to_even_for_the_codec(vfr_store, tmp_path):
    location, _ = vfr_store
    out = render_video(location, tmp_path / "odd.mp4", view=ViewOptions(space="local", size=(51, 37)), progress=False)
    _, images = decoded(out.url)
    assert images.shape[1:3] == (38, 52)


def test_a_vertex_variable_colours_the_mesh_through_the_colour_map(vfr_store):
    location, face = vfr_store
    ds = xr.open_zarr(location.url)
    side = (face.template[:, 0] > 0).astype(np.float32)  # 1 on one half of the face, 0 on the other
    ds["effect"] = ("vertex", side)
    view = ViewOptions(space="local", size=(120, 120), color="effect", cmap="gray", clim=(0.0, 1.0), shading="flat")
    (image,) = render_frames(ds, [0], view=view)
    (grey,) = render_frames(ds, [0], view=ViewOptions(space="local", size=(120, 120), shading="flat"))
    mask = grey.max(axis=-1) > 0  # where the mesh is (black is a colour of the map)
    columns = np.nonzero(mask.any(axis=0))[0]
    left = np.median(image[:, columns[0] : columns[0] + 10][mask[:, columns[0] : columns[0] + 10]])
    right = np.median(image[:, columns[-1] - 9 : columns[-1] + 1][mask[:, columns[-1] - 9 : columns[-1] + 1]])
    # local x maps to the image's x through the median pose; either way one side is black, the other lit
    assert min(left, right) == 0 and max(left, right) > 40
    with pytest.raises(ParameterError, match="no variable 'nope'"):
        render_frames(ds, [0], view=ViewOptions(space="local", color="nope"))


def test_still_at_a_time_is_the_nearest_frame(vfr_store, tmp_path):
    from PIL import Image

    location, face = vfr_store
    view = ViewOptions(space="world", size=(64, 64))
    out = render_still(location, tmp_path / "still.png", time=face.times[33] + 0.001, view=view)
    expected = render_frames(location, [33], view=view)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out.url)), expected)


def test_views_that_need_frames_or_vertices_say_so(vfr_store):
    location, _ = vfr_store
    with pytest.raises(ParameterError, match="no frames store"):
        render_frames(location, [0], view=ViewOptions(space="image"))
    ds = xr.open_zarr(location.url).drop_vars("tris")
    with pytest.raises(StorageError, match="no triangles"):
        render_frames(ds, [0], view=ViewOptions(space="world"))
    with pytest.raises(ParameterError, match="unknown space"):
        ViewOptions(space="camera")


def test_a_failed_segment_leaves_no_video(vfr_store, tmp_path, monkeypatch):
    import gmfx.render._api as api

    location, _ = vfr_store
    real = api.encode_segment
    calls = []

    def failing(images, times, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(images, times, **kwargs)

    monkeypatch.setattr(api, "encode_segment", failing)
    with pytest.raises(GmfxError, match="disk full"):
        render_video(location, tmp_path / "broken.mp4", view=ViewOptions(space="world", size=(64, 64)), segment_frames=16, progress=False)
    assert not (tmp_path / "broken.mp4").exists()


@pytest.mark.slow
def test_overlay_of_the_astronaut_lands_inside_an_independent_face_detector_box(astronaut_recon, dask_client):
    """OpenCV's Haar cascade (not MediaPipe) finds the face box; the rendered mesh's pixels lie inside
    it (grown by 30% about its centre: Haar boxes stop at the chin, the mesh reaches below it) and fill
    much of it."""
    import cv2

    from gmfx.render import run_render

    recordings, out, motion = astronaut_recon(10, max_angle=10, max_shift=8)
    view = ViewOptions(space="image", panels=("mesh", "overlay", "original"))
    (video,) = run_render(recordings, out, client=dask_client, view=view, segment_frames=4, progress=False)
    assert video.url.endswith("sub-01_task-faces_recon_image_mesh-overlay-original.mp4")
    times, images = decoded(video.url)
    frames = gmfx.open_frames(store_location(out, recordings[0], "decode"))
    np.testing.assert_allclose(times, frames.time.values - frames.time.values[0], atol=1 / 90000)
    width = motion.frames.shape[2]
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    for image, original in zip(images[::3], motion.frames[::3]):
        boxes = cascade.detectMultiScale(cv2.cvtColor(original, cv2.COLOR_RGB2GRAY), 1.1, 5)
        assert len(boxes) == 1
        x, y, w, h = boxes[0]
        mesh = image[:, :width].max(axis=-1) > 40
        rows, cols = np.nonzero(mesh)
        inside = (np.abs(cols + 0.5 - (x + w / 2)) <= 0.65 * w) & (np.abs(rows + 0.5 - (y + h / 2)) <= 0.65 * h)
        assert inside.mean() > 0.98
        assert mesh.sum() > 0.4 * w * h
        # the original panel is the frame itself (through the codec)
        assert np.abs(image[:, 2 * width :].astype(int) - original).mean() < 6


def test_videos_go_to_object_storage_with_the_same_times(vfr_store, s3_root):
    location, face = vfr_store
    target = s3_root.child("renders", "world.mp4")
    render_video(location, target, view=ViewOptions(space="world", size=(64, 64)), segment_frames=32, progress=False)
    with target.open("rb") as handle:
        data = handle.read()
    from gmfx.render._encode import read_times

    np.testing.assert_allclose(read_times(data), face.times - face.times[0], atol=1 / 90000)
    fs, path = s3_root.filesystem()
    assert not fs.exists(path + "/renders/world.mp4.partial")


def test_displacement_colours_the_moving_mouth_brighter_than_the_still_forehead():
    from gmfx.render._views import plan_view

    face = synthetic_face(60, n_vertices=300, noise=0.0, expression=0.01, seed=4)
    ds = gmfx.testing.synthetic_recon_dataset(face).load()
    view = ViewOptions(space="local", size=(160, 160), color="displacement", cmap="gray", shading="flat")
    plan = plan_view(ds, view)
    frame = 7  # the mouth is open: sin(2 pi 1.3 t) is far from 0
    (image,) = render_frames(ds, [frame], view=view)
    local = face.local[frame, 0]
    pixels = (local @ plan.view[:, :3].T + plan.view[:, 3])[:, :2].astype(int)
    brightness = image[pixels[:, 1].clip(0, 159), pixels[:, 0].clip(0, 159)].mean(axis=-1)
    assert np.median(brightness[~face.rigid]) > 3 * np.median(brightness[face.rigid]) + 20
