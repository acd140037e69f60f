"""The classic dataset-distillation backbone: ``depth`` x (conv3x3 -> instance norm -> ReLU -> avg-pool)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_image_encoder


class ConvNet(nn.Module):
    def __init__(self, width: int = 128, depth: int = 3, in_channels: int = 3):
        super().__init__()
        layers = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1),
                       nn.GroupNorm(width, width, affine=True),  # instance norm with affine, no stats
                       nn.ReLU(inplace=True),
                       nn.AvgPool2d(kernel_size=2, stride=2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).mean(dim=(2, 3))


@register_image_encoder("convnet")
def convnet(pretrained: bool = False, **_):
    return ConvNet(width=128, depth=3)


@register_image_encoder("convnet_tiny")
def convnet_tiny(pretrained: bool = False, **_):
    """A 3-block, 16-channel variant for tests and CPU quick starts."""
    return ConvNet(width=16, depth=3)
