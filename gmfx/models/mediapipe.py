"""MediaPipe face mesh (478 points, CPU) as a gmfx backend, with a pose fitted to the canonical model.

Vertices
    MediaPipe's 478 landmarks in pixels: ``(x * width, y * height, z * width)`` (x right, y down, z
    away from the camera; MediaPipe's z is relative depth on the x scale).
Pose (``mat``)
    MediaPipe gives no pose offline. Like its face-geometry pipeline, gmfx fits the canonical face
    model to the mesh with a weighted Procrustes fit on 33 stable landmarks (weights from MediaPipe's
    geometry metadata). Unlike that pipeline, the fit is a similarity (scale, rotation, translation) in
    the pixel space of the vertices, not in a metric space behind a perspective camera: ``mat`` maps
    the template (cm) to the vertices (pixels), so ``mat[:3, :3] / scale`` is the head rotation.
Score
    The face-mesh graph scores a face only when its face detector (BlazeFace) runs, i.e. when a track
    starts; while the landmark model tracks the face from frame to frame it checks presence against
    ``min_tracking_confidence`` internally but exposes no number. ``score`` is therefore the
    detector's score of the detection that started (or last refreshed) the face's track, carried along
    the track. A track that cannot be tied to a detection (no detector output near it) gets
    ``min_detection_confidence``, the lower bound every detection passed.
Topology
    The 468-vertex canonical model with its 898 triangles, plus the 10 iris points of the refined mesh
    (468-472: the subject's right iris centre then its right, top, left and bottom edge in the image;
    473-477: the left iris, same order). The iris points are in no triangle and not rigid; their
    template positions are placed from the eye landmarks with an iris radius of 0.585 cm.
Segments
    MediaPipe tracks a face using the previous frame's landmarks. :meth:`reset` restarts the graph, so
    every time segment starts with a detection and a segment's output does not depend on the others
    (retries and resumes write the same bytes). Inside a segment the landmarks are identical to those
    of ``mediapipe.solutions.face_mesh.FaceMesh`` run over the same frames; after a segment boundary
    they differ from one tracker run over the whole video by the re-detection's jitter (under 5% of
    the face's size on ``tests/data/single_face.mp4``, checked in the tests). Restarting costs about
    20 ms, which is why gmfx's segments are a few hundred frames long.
"""

from __future__ import annotations

import importlib.metadata
import json
from functools import cache
from importlib.resources import files
from typing import Any

import numpy as np

from gmfx.models._base import Backend, Face, Topology
from gmfx.models._geometry import fit_transforms
from gmfx.models._tracking import match_points

__all__ = ["MediaPipeBackend", "N_MESH_VERTICES", "N_VERTICES"]

N_MESH_VERTICES = 468
N_VERTICES = 478
IRIS_RADIUS_CM = 0.585
#: per eye: iris centre index, then the eye landmarks whose mean places it (corners, upper and lower lid)
_IRIS_EYES = ((468, (33, 133, 159, 145)), (473, (362, 263, 386, 374)))
#: edge point offsets from the iris centre in template axes (x right, y up): right, top, left, bottom
_IRIS_EDGE = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)


@cache
def _resources() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = files("gmfx") / "data" / "mediapipe_face"
    with (folder / "canonical_face_model.npz").open("rb") as handle:
        model = np.load(handle)
        canonical, triangles = model["vertices"].astype(np.float64), model["triangles"].astype(np.int32)
    basis = json.loads((folder / "procrustes_landmark_basis.json").read_text())["landmark_weights"]
    indices = np.array([item["index"] for item in basis])
    weights = np.array([item["weight"] for item in basis])
    return canonical, triangles, indices, weights


def mediapipe_template() -> np.ndarray:
    """The ``(478, 3)`` template in cm: the canonical model plus the 10 iris points."""
    canonical, *_ = _resources()
    template = np.empty((N_VERTICES, 3))
    template[:N_MESH_VERTICES] = canonical
    for centre, eye in _IRIS_EYES:
        template[centre] = canonical[list(eye)].mean(axis=0)
        template[centre + 1 : centre + 5] = template[centre] + IRIS_RADIUS_CM * _IRIS_EDGE
    return template


class MediaPipeBackend(Backend):
    """MediaPipe face mesh with refined (iris) landmarks, on CPU.

    Options of :meth:`load`: ``min_detection_confidence`` and ``min_tracking_confidence`` (both 0.5 by
    default, as in MediaPipe).
    """

    name = "mediapipe"
    version = "face_mesh-478"
    requires_gpu = False
    devices = ("cpu",)
    batch_size = 64
    units = "pixels"

    def __init__(self, *, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5) -> None:
        self.min_detection_confidence = float(min_detection_confidence)
        self.min_tracking_confidence = float(min_tracking_confidence)
        self._graph = None
        self._max_faces = 0
        self._previous = np.empty((0, 2))
        self._previous_scores = np.empty(0)

    @classmethod
    def topology(cls) -> Topology:
        _, triangles, indices, weights = _resources()
        rigid = np.zeros(N_VERTICES, dtype=bool)
        rigid[indices] = True
        rigid_weight = np.zeros(N_VERTICES, dtype=np.float32)
        rigid_weight[indices] = weights
        return Topology(
            name="mediapipe-478",
            template=mediapipe_template().astype(np.float32),
            triangles=triangles,
            units="cm",
            rigid=rigid,
            rigid_weight=rigid_weight,
        )

    @classmethod
    def load(cls, device: str, **options: Any) -> MediaPipeBackend:
        if device != "cpu":
            raise ValueError(f"MediaPipe's face mesh runs on the CPU only, not on {device!r}")
        return cls(**options)

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        backend = cls(**options)  # checks the options; loads nothing
        return {
            # from the installed package's metadata: importing mediapipe costs the client 1.3 s
            "mediapipe_version": importlib.metadata.version("mediapipe"),
            "min_detection_confidence": backend.min_detection_confidence,
            "min_tracking_confidence": backend.min_tracking_confidence,
            "refine_landmarks": True,
            "score": "face detector score of the detection that started the track",
            "pose_fit": "weighted similarity Procrustes of the canonical model on 33 landmarks, pixel space",
        }

    def reset(self) -> None:
        if self._graph is not None:
            self._graph.close()
        self._graph = None
        self._previous = np.empty((0, 2))
        self._previous_scores = np.empty(0)

    def reconstruct(self, frames: np.ndarray, *, max_faces: int) -> list[list[Face]]:
        if self._graph is None or self._max_faces != max_faces:
            self.reset()
            self._graph = self._new_graph(max_faces)
            self._max_faces = max_faces
        found = [self._frame(np.ascontiguousarray(frame)) for frame in frames]
        meshes = [mesh for frame_meshes, _ in found for mesh in frame_meshes]
        mats = iter(pose_matrices(np.array(meshes).reshape(-1, N_VERTICES, 3)))
        return [[Face(m.astype(np.float32), next(mats), float(s)) for m, s in zip(*frame)] for frame in found]

    def _new_graph(self, max_faces: int):
        # The graph of mediapipe.solutions.face_mesh.FaceMesh(static_image_mode=False,
        # refine_landmarks=True), built the same way, plus the detector's output for the score.
        from mediapipe.python.solution_base import SolutionBase
        from mediapipe.python.solutions import face_mesh

        return SolutionBase(
            binary_graph_path=face_mesh._BINARYPB_FILE_PATH,
            side_inputs={"num_faces": max_faces, "with_attention": True, "use_prev_landmarks": True},
            calculator_params={
                "facedetectionshortrangecpu__facedetectionshortrange__facedetection__"
                "TensorsToDetectionsCalculator.min_score_thresh": self.min_detection_confidence,
                "facelandmarkcpu__ThresholdingCalculator.threshold": self.min_tracking_confidence,
            },
            outputs=["multi_face_landmarks", "face_detections"],
        )

    def _frame(self, frame: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """The meshes (pixels) found in ``frame`` and their scores."""
        height, width = frame.shape[:2]
        result = self._graph.process(frame)
        meshes = [landmarks_to_pixels(landmark_array(face), width, height) for face in result.multi_face_landmarks or []]
        detections = [_detection_centre_and_score(d, width, height) for d in result.face_detections or []]
        centres = np.array([m[:, :2].mean(axis=0) for m in meshes]).reshape(-1, 2)
        sizes = np.array([np.ptp(m[:, :2], axis=0).max() for m in meshes])
        scores = carried_scores(
            centres,
            sizes,
            np.array([d[0] for d in detections]).reshape(-1, 2),
            np.array([d[1] for d in detections]),
            self._previous,
            self._previous_scores,
            default=self.min_detection_confidence,
        )
        self._previous, self._previous_scores = centres, scores
        return meshes, scores


#: one serialised ``NormalizedLandmark`` holding x, y, z only: field header, then tag + float32 for each
_LANDMARK_RECORD = 17
_LANDMARK_TAGS = {0: 0x0A, 1: 0x0F, 2: 0x0D, 7: 0x15, 12: 0x1D}
_LANDMARK_FLOATS = [3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16]


def landmark_array(landmarks) -> np.ndarray:
    """``(n, 3)`` float64 x, y, z of a MediaPipe ``NormalizedLandmarkList``.

    Reads the message's serialised bytes at once when every landmark holds exactly x, y and z (what
    the face mesh gives: 17 bytes each), about ten times faster than reading each field in Python;
    any other message is read field by field.
    """
    raw = np.frombuffer(landmarks.SerializeToString(), dtype=np.uint8)
    if raw.size % _LANDMARK_RECORD == 0 and raw.size:
        records = raw.reshape(-1, _LANDMARK_RECORD)
        if all((records[:, column] == tag).all() for column, tag in _LANDMARK_TAGS.items()):
            return records[:, _LANDMARK_FLOATS].copy().view("<f4").reshape(-1, 3).astype(np.float64)
    return np.array([(p.x, p.y, p.z) for p in landmarks.landmark], dtype=np.float64).reshape(-1, 3)


def landmarks_to_pixels(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """MediaPipe's normalised ``(n, 3)`` landmarks in pixels: ``(x * width, y * height, z * width)``."""
    return landmarks * np.array([width, height, width], dtype=landmarks.dtype)


def pose_matrices(meshes: np.ndarray) -> np.ndarray:
    """The ``(n, 4, 4)`` float32 template -> mesh similarities of ``(n, 478, 3)`` meshes, fitted on the
    Procrustes basis."""
    canonical, _, indices, weights = _resources()
    return fit_transforms(canonical[indices], meshes[:, indices], weights, scale=True).astype(np.float32)


def carried_scores(
    centres: np.ndarray,
    sizes: np.ndarray,
    detection_centres: np.ndarray,
    detection_scores: np.ndarray,
    previous_centres: np.ndarray,
    previous_scores: np.ndarray,
    *,
    default: float,
) -> np.ndarray:
    """Each face's score: its detection's score, else the score its track carried, else ``default``.

    Faces are tied to detections and to the previous frame's faces by nearest centre (one-to-one,
    within the face's size).
    """
    scores = np.full(len(centres), float(default))
    from_previous = match_points(previous_centres, centres, sizes)
    scores[from_previous >= 0] = previous_scores[from_previous[from_previous >= 0]]
    from_detection = match_points(detection_centres, centres, sizes)
    scores[from_detection >= 0] = detection_scores[from_detection[from_detection >= 0]]
    return scores


def _detection_centre_and_score(detection, width: int, height: int) -> tuple[np.ndarray, float]:
    box = detection.location_data.relative_bounding_box
    centre = np.array([(box.xmin + box.width / 2) * width, (box.ymin + box.height / 2) * height])
    return centre, float(detection.score[0])
