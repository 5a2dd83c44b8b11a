"""DECA's detail generator (``D_detail`` of ``deca_model.tar``): (jaw, expression, detail code) -> a
256 x 256 UV displacement map, written from DECA's published architecture with its parameter names.

``l1.0`` Linear(181, 128 * 8 * 8) reshaped to (128, 8, 8); ``conv_blocks``: BatchNorm(128), then five
times [nearest 2x upsampling, 3x3 convolution, BatchNorm(eps 0.8), LeakyReLU(0.2)] to 128, 64, 64, 32
and 16 channels, a 3x3 convolution to one channel and tanh; the result times 0.01.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["DETAIL_INPUT", "DetailGenerator", "displacement_input"]

#: the generator's input: jaw axis-angle 3 + expression 50 + detail code 128
DETAIL_INPUT = 3 + 50 + 128
DETAIL_SCALE = 0.01
_CHANNELS = (128, 128, 64, 64, 32, 16)


class DetailGenerator(nn.Module):
    """``(B, 181)`` -> ``(B, 1, 256, 256)`` UV displacements (DECA's ``D_detail``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Sequential(nn.Linear(DETAIL_INPUT, _CHANNELS[0] * 8 * 8))
        blocks: list[nn.Module] = [nn.BatchNorm2d(_CHANNELS[0])]
        for inputs, outputs in zip(_CHANNELS[:-1], _CHANNELS[1:]):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs, 0.8), nn.LeakyReLU(0.2)]
        blocks += [nn.Conv2d(_CHANNELS[-1], 1, 3, padding=1), nn.Tanh()]
        self.conv_blocks = nn.Sequential(*blocks)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.l1(latent).view(latent.shape[0], _CHANNELS[0], 8, 8)
        return self.conv_blocks(x) * DETAIL_SCALE


def displacement_input(pose, exp, detail):
    """The generator's input ``(..., 181)`` from ``(..., 6)`` pose (global, jaw), ``(..., >=50)``
    expression and ``(..., 128)`` detail codes (NumPy or Dask arrays, concatenated on the last axis)."""
    import dask.array as da

    concatenate = da.concatenate if any(isinstance(a, da.Array) for a in (pose, exp, detail)) else np.concatenate
    return concatenate([pose[..., 3:6], exp[..., :50], detail], axis=-1)
