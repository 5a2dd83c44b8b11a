"""A synthetic model with the cost of DECA/EMOCA's coarse reconstruction, to measure whether decode and
the frames store keep a GPU busy without any model files (``benchmarks/gpu_feeding.py``).

Per frame it does what a FLAME-family backend does, with random weights: optionally the real face
detector on the CPU (MediaPipe's face mesh, as DECA's default), a 224x224 crop resized on the device,
DECA's ResNet-50 encoder (~4.1 GFLOPs, optionally in float16/bfloat16 autocast) to 236 codes, and a
FLAME-sized linear blendshape layer (5,023 vertices x 156 shape/expression/pose codes) whose vertices
come back to host memory. Its outputs are meaningless; its cost is the point.
"""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar, Literal

import numpy as np

from gmfx.models._base import Backend, Face, Outputs, Topology

__all__ = ["SyntheticFlameBackend"]

N_VERTICES = 5023
#: DECA's code sizes (shape, texture, expression, pose, camera, light): 236 outputs of the encoder
_CODES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
_BLEND = ("shape", "exp", "pose")  # the codes the vertex layer uses
_OFFSETS = dict(zip(_CODES, np.cumsum([0, *_CODES.values()])[:-1].tolist(), strict=True))


@cache
def _topology() -> Topology:
    from gmfx.testing._synthetic import _template

    template, triangles = _template(N_VERTICES, np.random.default_rng(0))
    return Topology("synthetic-flame", template.astype(np.float32), triangles, "m", template[:, 1] > -0.03)


class SyntheticFlameBackend(Backend):
    """DECA-coarse cost with random weights (options: ``precision``, ``detector`` ``"mediapipe"`` or ``"none"``)."""

    name: ClassVar[str] = "synthetic-flame"
    version: ClassVar[str] = "1"
    devices: ClassVar[tuple[str, ...]] = ("cuda", "cpu")
    batch_size: ClassVar[int] = 32
    units: ClassVar[str] = "pixels"
    outputs: ClassVar[Outputs] = Outputs(codes={name: _CODES[name] for name in _BLEND})

    def __init__(self, device: str, precision: Literal["float32", "float16", "bfloat16"], detector: Literal["mediapipe", "none"]) -> None:
        import torch

        from gmfx.models._resnet import ResNetEncoder

        self.device = torch.device(device)
        self.precision = precision
        generator = torch.Generator().manual_seed(0)
        self.encoder = ResNetEncoder(sum(_CODES.values())).eval().to(self.device)
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        n_blend = sum(_CODES[name] for name in _BLEND)
        self.basis = (torch.randn(N_VERTICES * 3, n_blend, generator=generator) * 1e-3).to(self.device)
        self.template = torch.from_numpy(_topology().template.reshape(-1)).to(self.device)
        if detector == "mediapipe":
            from gmfx.models._detect import make_detector

            self.detector = make_detector("mediapipe", "cpu", 0.5)
        else:
            self.detector = None

    @classmethod
    def topology(cls) -> Topology:
        return _topology()

    @classmethod
    def load(cls, device: str, **options: Any) -> SyntheticFlameBackend:
        return cls(device, options.get("precision", "float32"), options.get("detector", "none"))

    @classmethod
    def attrs(cls, **options: Any) -> dict[str, Any]:
        return {"precision": options.get("precision", "float32"), "detector": options.get("detector", "none")}

    def reset(self) -> None:
        if self.detector is not None:
            self.detector.reset()

    def reconstruct(self, frames: np.ndarray, *, max_faces: int) -> list[list[Face]]:
        import torch
        import torch.nn.functional as F

        if self.detector is not None:
            self.detector(frames, max_faces)  # its cost, as DECA's crops pay it; the crop below is the centre
        height, width = frames.shape[1:3]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        with torch.inference_mode():
            images = torch.from_numpy(frames[:, top : top + side, left : left + side]).to(self.device, non_blocking=True)
            images = F.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(224, 224), mode="bilinear", antialias=False)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            if self.precision == "float32":
                codes = self.encoder(images).float()
            else:
                dtype = torch.float16 if self.precision == "float16" else torch.bfloat16
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    codes = self.encoder(images).float()
            blend = torch.cat([codes[:, _OFFSETS[name] : _OFFSETS[name] + _CODES[name]] for name in _BLEND], dim=1)
            vertices = (self.template + blend @ self.basis.T).reshape(len(frames), N_VERTICES, 3)
            vertices, blend = vertices.cpu().numpy(), blend.cpu().numpy()
        mat = np.eye(4, dtype=np.float32)
        faces = []
        for k in range(len(frames)):
            parts = np.split(blend[k], np.cumsum([_CODES[name] for name in _BLEND])[:-1])
            faces.append([Face(vertices[k], mat, 1.0, dict(zip(_BLEND, parts, strict=True)))][:max_faces])
        return faces
