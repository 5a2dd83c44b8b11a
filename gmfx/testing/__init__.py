"""Helpers for testing gmfx and code built on it.

- real test videos whose frames show their index, and BIDS-like datasets (:func:`write_video`,
  :func:`write_bids_recording`);
- synthetic face sequences with known rigid motion, and recon stores made from them
  (:func:`synthetic_face`, :func:`write_synthetic_recon`);
- a real S3-compatible server on 127.0.0.1 (:func:`local_s3_server`; needs the ``test`` extra);
- fault injection for storage (:class:`FlakyFileSystem`, ``flaky://`` URLs; :class:`ThrottlingProxy`, S3's
  ``503 SlowDown`` on a deterministic schedule in front of the local S3 server);
- a conformance check for reconstruction backends (:func:`check_backend`) and tiny real backends
  (one with a per-face identity: :class:`ColourIdentityBackend`);
- a real-face video with known head motion (:func:`astronaut_motion`; needs scikit-image);
- face-model files in the official formats with random values (FLAME, DECA, EMOCA:
  :func:`write_model_dir`, :func:`write_flame_pkl`, ...);
- preprocessed recordings with a known response to each condition (:func:`synthetic_responses`);
- meshes to render at known poses, and a photo's face re-rendered at a known yaw and pitch
  (:func:`random_face_meshes`, :func:`textured_face`, :func:`rotation`);
- BFM-family files in the official formats with random values (:func:`write_bfm_model`, ...).
"""

from gmfx.testing._backends import BrightSquareBackend, GpuBrightSquareBackend, check_backend
from gmfx.testing._faces import FaceMotion, astronaut_motion
from gmfx.testing._flaky import FlakyFileSystem
from gmfx.testing._identity import ColourIdentityBackend
from gmfx.testing._model_files import (
    write_deca_model,
    write_emoca_model,
    write_flame_pkl,
    write_landmark_embedding,
    write_model_dir,
)
from gmfx.testing._s3 import local_s3_server, make_bucket, s3_storage_options
from gmfx.testing._s3_proxy import ThrottlingProxy
from gmfx.testing._responses import SyntheticResponses, synthetic_responses
from gmfx.testing._synthetic import SyntheticFace, synthetic_face, synthetic_recon_dataset, write_synthetic_recon
from gmfx.testing._videos import frame_pattern, read_frame_number, write_bids_recording, write_video
from gmfx.testing._render import random_face_meshes, rotation, textured_face
from gmfx.testing._bfm_files import write_bfm09_sources, write_bfm_lm3d, write_bfm_model, write_deep3d_checkpoint, write_deep3d_model_dir

__all__ = [
    "BrightSquareBackend",
    "ColourIdentityBackend",
    "FaceMotion",
    "FlakyFileSystem",
    "GpuBrightSquareBackend",
    "astronaut_motion",
    "check_backend",
    "SyntheticFace",
    "frame_pattern",
    "local_s3_server",
    "make_bucket",
    "read_frame_number",
    "s3_storage_options",
    "synthetic_face",
    "synthetic_recon_dataset",
    "write_bids_recording",
    "write_deca_model",
    "write_emoca_model",
    "write_flame_pkl",
    "write_landmark_embedding",
    "write_model_dir",
    "write_synthetic_recon",
    "write_video",
    "SyntheticResponses",
    "synthetic_responses",
    "random_face_meshes",
    "rotation",
    "textured_face",
    "ThrottlingProxy",
    # BFM family (Deep3DFaceRecon, 3DMM fitting)
    "write_bfm09_sources",
    "write_bfm_lm3d",
    "write_bfm_model",
    "write_deep3d_checkpoint",
    "write_deep3d_model_dir",
]
