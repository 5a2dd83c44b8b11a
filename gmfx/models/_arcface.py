"""MICA's identity network: an ArcFace iresnet100 and the mapping network to 300 FLAME shape codes.

Written from the published architecture (Deng et al. 2019, ArcFace; Zielon et al. 2022, MICA) with the
parameter names of MICA's ``mica.tar``:

* ``arcface.*``: iresnet100 = 3x3 stem (``conv1``, ``bn1``, ``prelu``), four stages of 3, 13, 30 and 3
  pre-activation basic blocks (``bn1``, ``conv1``, ``bn2``, ``prelu``, ``conv2`` (strided), ``bn3``,
  ``downsample.{0,1}``) of 64, 128, 256 and 512 channels, each stage halving the resolution, then
  ``bn2``, ``fc`` (25088 -> 512) and the 1-d batch norm ``features``; input ``(B, 3, 112, 112)`` RGB in
  ``[-1, 1]``, output the 512-d embedding (MICA L2-normalises it).
* ``flameModel.regressor.*``: four linear layers (``network.0`` 512 -> 300, ``network.{1,2,3}`` 300 ->
  300), each followed by LeakyReLU(0.2), then ``output`` (300 -> 300): the shape code.

The ArcFace crop (:func:`arcface_crop`) is the least-squares similarity of five face points (eye
centres, nose tip, mouth corners) onto ArcFace's 112-pixel template, as insightface's ``norm_crop``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from gmfx._errors import ModelError
from gmfx.models._crops import similarity_from_points, warp_crops
from gmfx.models._resnet import load_strict

__all__ = [
    "ARCFACE_SIZE",
    "ARCFACE_TEMPLATE",
    "IResNet100",
    "MicaNetwork",
    "MicaRegressor",
    "arcface_crop",
    "arcface_input",
    "five_points",
    "load_mica_state",
]

ARCFACE_SIZE = 112
#: where the five points (left eye, right eye, nose tip, left and right mouth corner, as seen in the
#: image) lie in ArcFace's 112 x 112 crop (insightface's ``arcface_dst``)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
IRESNET100_LAYERS = (3, 13, 30, 3)
IRESNET_WIDTHS = (64, 128, 256, 512)
EMBEDDING = 512
N_SHAPE = 300
REGRESSOR_HIDDEN = 3

#: MediaPipe face-mesh ids of the five points: each eye the mean of an upper and a lower lid point,
#: the nose tip, the inner mouth corners (the choice of inferno's MediaPipe preprocessing for MICA)
MEDIAPIPE_FIVE = ((158, 144), (386, 374), (4,), (78,), (308,))
#: the same from 68 iBUG landmarks (MICA's FAN preprocessing: eye lids 38/41 and 44/46, nose tip 30,
#: inner mouth corners 60 and 64)
IBUG68_FIVE = ((38, 41), (44, 46), (30,), (60,), (64,))


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """``(..., 5, 2)`` ArcFace points from ``(..., 478 or 468, 2+)`` MediaPipe or ``(..., 68, 2+)`` FAN landmarks."""
    n = landmarks.shape[-2]
    if n in (468, 478):
        ids = MEDIAPIPE_FIVE
    elif n == 68:
        ids = IBUG68_FIVE
    else:
        raise ModelError(
            f"ArcFace's five points need 68 (FAN) or 468/478 (MediaPipe) landmarks, not {n}",
            where="MICA crop",
            fix="use --detector mediapipe or fan",
        )
    return np.stack([landmarks[..., list(group), :2].mean(axis=-2) for group in ids], axis=-2)


def arcface_crop(points: np.ndarray) -> np.ndarray:
    """``(..., 3, 3)`` image -> crop similarities taking ``(..., 5, 2)`` points onto :data:`ARCFACE_TEMPLATE`."""
    points = np.asarray(points, np.float64)
    flat = points.reshape(-1, 5, 2)
    matrices = np.stack([similarity_from_points(p, ARCFACE_TEMPLATE) for p in flat]) if len(flat) else np.zeros((0, 3, 3))
    return matrices.reshape(*points.shape[:-2], 3, 3)


def arcface_input(frames: torch.Tensor, matrices: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """``(N, 3, 112, 112)`` ArcFace inputs: bilinear crops of ``frames`` (``(B, H, W, 3)`` uint8 RGB)
    through ``matrices``, scaled as ``(pixel - 127.5) / 127.5``."""
    return warp_crops(frames, matrices, frame_index, out=ARCFACE_SIZE) * 2.0 - 1.0


class IBasicBlock(nn.Module):
    """Pre-activation basic block: BN, 3x3, BN, PReLU, 3x3 (strided), BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet100(nn.Module):
    """ArcFace's iresnet100: ``(B, 3, 112, 112)`` in ``[-1, 1]`` -> ``(B, 512)`` embeddings (not normalised)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (blocks, planes) in enumerate(zip(IRESNET100_LAYERS, IRESNET_WIDTHS)):
            layer = [IBasicBlock(inplanes, planes, 2)] + [IBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, EMBEDDING)
        self.features = nn.BatchNorm1d(EMBEDDING, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


class MicaRegressor(nn.Module):
    """MICA's mapping network: normalised 512-d embedding -> 300 FLAME shape codes."""

    def __init__(self) -> None:
        super().__init__()
        sizes = [EMBEDDING] + [N_SHAPE] * (REGRESSOR_HIDDEN + 1)
        self.network = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(N_SHAPE, N_SHAPE)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = embedding
        for layer in self.network:
            x = nn.functional.leaky_relu(layer(x), 0.2)
        return self.output(x)


class MicaNetwork(nn.Module):
    """ArcFace + mapping network: ArcFace inputs -> ``(normalised embeddings (B, 512), shape codes (B, 300))``."""

    def __init__(self) -> None:
        super().__init__()
        self.arcface = IResNet100()
        self.regressor = MicaRegressor()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = nn.functional.normalize(self.arcface(images).float(), dim=1)
        return embedding, self.regressor(embedding)


def load_mica_state(network: MicaNetwork, arcface: Mapping[str, torch.Tensor], regressor: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load the ArcFace and regressor state dicts strictly (every key and shape)."""
    load_strict(network.arcface, arcface, where=f"{where} [arcface]")
    load_strict(network.regressor, regressor, where=f"{where} [flameModel.regressor]")
