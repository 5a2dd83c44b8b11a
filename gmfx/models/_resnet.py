"""ResNet-50 (He et al. 2016, "v1.5": stride on the 3x3 convolution) with torchvision's parameter names.

gmfx builds the network itself, so no ImageNet weights are ever downloaded; checkpoints of DECA,
EMOCA (``encoder.*`` inside a :class:`ResNetEncoder`) and Deep3DFaceRecon (``backbone.*``) load into
it by name. The classifier (``fc``) is left out: these models use the 2048 pooled features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gmfx._errors import ModelError

__all__ = ["Bottleneck", "ResNet50", "ResNetEncoder", "load_strict"]

LAYERS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convolutions with batch norm, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * EXPANSION)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """The ResNet-50 trunk: ``(B, 3, H, W)`` -> ``(B, 2048)`` globally averaged features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (blocks, planes) in enumerate(zip(LAYERS, WIDTHS)):
            stride = 1 if index == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * EXPANSION, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            inplanes = planes * EXPANSION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


class ResNetEncoder(nn.Module):
    """DECA's image encoder: :class:`ResNet50` (``encoder.*``) then Linear(2048, 1024), ReLU,
    Linear(1024, ``n_outputs``) (``layers.0``, ``layers.2``)."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.encoder = ResNet50()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, n_outputs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is a :class:`ModelError` naming it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped))
        if keys
    ]
    if problems:
        raise ModelError(
            f"the weights do not fit the network: {'; '.join(problems)}",
            where=where,
            fix="use the original, unmodified checkpoint of this model",
        )
    module.load_state_dict(state, strict=True)
