"""Backends, their registry, the MediaPipe backend and the pure geometry/tracking functions."""

import itertools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gmfx import ModelError
from gmfx.models import Face, Outputs, Topology, available_backends, get_backend, load_backend, register_backend
from gmfx.models._geometry import similarity_fit
from gmfx.models._tracking import assign_slots, match_points, stitch_segments, track_faces
from gmfx.models.mediapipe import MediaPipeBackend, carried_scores, landmark_array, landmarks_to_pixels
from gmfx.models._output import pack_faces
from gmfx.models._tracking import segment_ends
from gmfx.testing._backends import BrightSquareBackend as SquareBackend, check_backend
from gmfx.testing._faces import astronaut_motion


@pytest.fixture(scope="module")
def motion():
    return astronaut_motion(12, max_angle=15)


# -- geometry -----------------------------------------------------------------------------------------
def test_similarity_fit_recovers_a_known_transform_and_matches_scipy():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(30, 3))
    rotation = Rotation.from_rotvec([0.3, -0.8, 0.5]).as_matrix()
    target = 2.5 * source @ rotation.T + [10, -4, 7] + rng.normal(scale=0.01, size=(30, 3))
    weights = rng.uniform(0.1, 1, 30)
    scale, fitted, translation = similarity_fit(source, target, weights)
    assert scale == pytest.approx(2.5, rel=1e-2)
    np.testing.assert_allclose(translation, [10, -4, 7], atol=0.05)
    centred_source = source - weights @ source / weights.sum()
    centred_target = target - weights @ target / weights.sum()
    oracle, _ = Rotation.align_vectors(centred_target, centred_source, weights=weights)
    np.testing.assert_allclose(fitted, oracle.as_matrix(), atol=1e-9)
    assert np.linalg.det(fitted) == pytest.approx(1.0)


def test_similarity_fit_in_a_batch_equals_one_fit_per_item():
    rng = np.random.default_rng(3)
    source, targets, weights = rng.normal(size=(12, 3)), rng.normal(size=(5, 12, 3)), rng.uniform(size=12)
    scales, rotations, translations = similarity_fit(source, targets, weights)
    for i, target in enumerate(targets):
        scale, rotation, translation = similarity_fit(source, target, weights)
        np.testing.assert_allclose([scales[i], *rotations[i].ravel(), *translations[i]], [scale, *rotation.ravel(), *translation])


def test_similarity_fit_never_returns_a_reflection():
    source = np.random.default_rng(1).normal(size=(10, 3))
    _, rotation, _ = similarity_fit(source, source * [1, 1, -1])
    assert np.linalg.det(rotation) == pytest.approx(1.0)


# -- tracking -----------------------------------------------------------------------------------------
def test_match_points_is_the_minimum_total_distance_matching():
    rng = np.random.default_rng(2)
    for n_points in (1, 2, 3):
        for _ in range(10):
            reference, points = rng.uniform(0, 10, (4, 2)), rng.uniform(0, 10, (n_points, 2))
            matches = match_points(reference, points, np.full(n_points, np.inf))
            best = min(
                itertools.permutations(range(4), n_points),
                key=lambda p: sum(np.linalg.norm(points[i] - reference[j]) for i, j in enumerate(p)),
            )
            assert tuple(matches) == best
    assert (match_points(np.array([[0.0, 0]]), np.array([[5.0, 0]]), np.array([4.0])) == -1).all()
    assert (match_points(np.full((2, 2), np.nan), np.zeros((1, 2)), np.ones(1)) == -1).all()


def test_faces_keep_their_slot_when_they_leave_and_come_back():
    left, right = np.array([10.0, 50]), np.array([200.0, 50])
    frames = [[right, left], [left + 2], [left + 4, right + 3], [right + 5, left + 3]]
    slots = track_faces([np.array(f) for f in frames], [np.full(len(f), 40.0) for f in frames], max_faces=2)
    assert [s.tolist() for s in slots] == [[1, 0], [0], [0, 1], [1, 0]]
    # a face far from every known one takes a never-used slot
    assert assign_slots(np.array([[0.0, 0], [np.nan, np.nan]]), np.array([[500.0, 0]]), np.array([10.0])).tolist() == [1]
    with pytest.raises(ValueError, match="3 detections for 2"):
        assign_slots(np.full((2, 2), np.nan), np.zeros((3, 2)), np.ones(3))


def test_stitch_segments_restores_a_shared_index():
    left, right, nan = [10.0, 50], [200.0, 50], [np.nan, np.nan]
    first = [np.array([left, right]), np.array([right, left]), np.array([nan, right])]
    last = first
    sizes = [np.array([40.0, 40]), np.array([40.0, 40]), np.array([np.nan, 40])]
    perms = stitch_segments(first, last, sizes)
    assert [p.tolist() for p in perms] == [[0, 1], [1, 0], [0, 1]]


def test_segment_ends_finds_first_and_last_sightings():
    from gmfx.types import split_regions

    detected = np.array([[False, True], [True, True], [True, False], [False, False]])
    centroid = np.arange(16, dtype=float).reshape(4, 2, 2)
    size = np.arange(8, dtype=float).reshape(4, 2)
    first, last, sizes = segment_ends(detected, centroid, size, split_regions(4, 2))
    np.testing.assert_array_equal(first[0], [centroid[1, 0], centroid[0, 1]])
    np.testing.assert_array_equal(last[0], [centroid[1, 0], centroid[1, 1]])
    np.testing.assert_array_equal(sizes[0], [2, 3])
    assert np.isnan(first[1][1]).all() and np.isnan(sizes[1][1]) and sizes[1][0] == 4


# -- registry -----------------------------------------------------------------------------------------
def test_registry_finds_entry_points_registers_and_names_the_installed_models():
    assert get_backend("mediapipe") is MediaPipeBackend
    register_backend("square", SquareBackend)  # a tiny real backend (gmfx.testing)
    assert {"mediapipe", "square"} <= set(available_backends())
    assert get_backend("square") is SquareBackend and get_backend(SquareBackend) is SquareBackend
    with pytest.raises(ModelError) as info:
        get_backend("flame-nope")
    assert "flame-nope" in str(info.value) and "mediapipe" in str(info.value)
    with pytest.raises(ModelError, match="not a gmfx.models.Backend"):
        register_backend("bad", object)


def test_a_worker_loads_a_model_once_per_options():
    first = load_backend(SquareBackend, "cpu", {"log": None})
    assert load_backend(SquareBackend, "cpu", {"log": None}) is first
    assert load_backend(SquareBackend, "cpu", {"exit_once": None}) is not first


# -- conformance kit ----------------------------------------------------------------------------------
def test_conformance_kit_accepts_the_test_backend_and_lists_what_a_broken_one_breaks(motion):
    check_backend(SquareBackend, frames=motion.frames[:4])

    class Broken(SquareBackend):
        name = "broken"
        devices = ("tpu",)

        @classmethod
        def topology(cls):
            topology = SquareBackend.topology()
            return Topology("broken", topology.template, topology.triangles + 10, "unit", topology.rigid)

    with pytest.raises(ModelError) as info:
        check_backend(Broken)
    assert "devices" in str(info.value) and "triangles index vertices" in str(info.value)

    class WrongCodes(SquareBackend):
        outputs = Outputs(codes={"brightness": 2})

    with pytest.raises(ModelError, match="code 'brightness' of shape"):
        check_backend(WrongCodes, frames=motion.frames[:2])


def test_mediapipe_backend_follows_the_contract(motion):
    check_backend(MediaPipeBackend, frames=motion.frames[:6])


def test_pack_faces_fills_nan_rows_and_names_the_frame_of_a_broken_face():
    faces = SquareBackend().reconstruct(np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)]), max_faces=2)
    packed = pack_faces(faces, SquareBackend, max_faces=2)
    assert packed["detected"].tolist() == [[False, False], [True, False]]
    assert np.isnan(packed["v"][0]).all() and np.isnan(packed["v"][1, 1]).all() and np.isfinite(packed["v"][1, 0]).all()
    assert np.isnan(packed["score"][0]).all() and packed["code_brightness"][1, 0, 0] == 200
    broken = [[Face(np.zeros((3, 3), np.float32), np.eye(4, dtype=np.float32), 1.0, {"brightness": np.ones(1)})]]
    with pytest.raises(ModelError, match="vertices of shape") as info:
        pack_faces(broken, SquareBackend, max_faces=1, first_frame=40)
    assert "frame 40" in str(info.value)


# -- MediaPipe ----------------------------------------------------------------------------------------
def test_mediapipe_topology_covers_the_478_point_mesh():
    topology = MediaPipeBackend.topology()
    assert topology.n_vertices == 478 and topology.template.shape == (478, 3)
    assert topology.triangles.shape == (898, 3) and topology.triangles.max() == 467
    assert topology.rigid.sum() == 33 and not topology.rigid[468:].any()
    assert topology.rigid_weight[topology.rigid].min() > 0 and topology.units == "cm"
    # iris centres sit between the eye corners; edges are 0.585 cm away
    np.testing.assert_allclose(np.linalg.norm(topology.template[469:473] - topology.template[468], axis=1), 0.585, rtol=1e-5)
    assert topology.template[33, 0] < topology.template[468, 0] < topology.template[133, 0]


def test_mediapipe_matches_mediapipe_called_directly(motion):
    import mediapipe as mp

    backend = MediaPipeBackend.load("cpu")
    backend.reset()
    faces = backend.reconstruct(motion.frames, max_faces=1)
    height, width = motion.frames.shape[1:3]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, refine_landmarks=True, max_num_faces=1) as mesh:
        for frame, found in zip(motion.frames, faces):
            result = mesh.process(frame)
            direct = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark])
            np.testing.assert_array_equal(found[0].vertices, landmarks_to_pixels(direct, width, height).astype(np.float32))


def test_landmark_array_reads_serialised_landmarks_like_their_fields():
    from mediapipe.framework.formats import landmark_pb2

    rng = np.random.default_rng(4)
    values = rng.normal(size=(478, 3)).astype(np.float32)
    values[5] = 0.0  # zeros are still serialised (proto2 optional fields)
    landmarks = landmark_pb2.NormalizedLandmarkList()
    for x, y, z in values:
        landmarks.landmark.add(x=x, y=y, z=z)
    np.testing.assert_array_equal(landmark_array(landmarks), values.astype(np.float64))
    landmarks.landmark[3].visibility = 0.5  # another layout: read field by field
    np.testing.assert_array_equal(landmark_array(landmarks), values.astype(np.float64))
    assert landmark_array(landmark_pb2.NormalizedLandmarkList()).shape == (0, 3)


def test_mediapipe_pose_follows_the_head_rotation(motion):
    backend = MediaPipeBackend.load("cpu")
    backend.reset()
    mats = np.array([f[0].mat for f in backend.reconstruct(motion.frames, max_faces=1)], dtype=np.float64)
    relative = mats[:, :3, :3] @ np.linalg.inv(mats[0, :3, :3])
    angles = np.degrees(np.arctan2(relative[:, 1, 0], relative[:, 0, 0]))
    np.testing.assert_allclose(angles, motion.angles - motion.angles[0], atol=2.0)


def test_scores_come_from_detections_and_are_carried_along_tracks():
    centres, sizes = np.array([[10.0, 10], [100, 100]]), np.array([30.0, 30])
    scores = carried_scores(centres, sizes, np.array([[12.0, 9]]), np.array([0.9]), np.array([[101.0, 99]]), np.array([0.7]), default=0.5)
    np.testing.assert_allclose(scores, [0.9, 0.7])
    lonely = carried_scores(centres[:1], sizes[:1], np.empty((0, 2)), np.empty(0), np.empty((0, 2)), np.empty(0), default=0.5)
    np.testing.assert_allclose(lonely, [0.5])
