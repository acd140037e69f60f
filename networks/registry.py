"""Name -> builder maps for image and text encoders.

Image builders return an ``nn.Module`` mapping (B, 3, H, W) images to (B, num_features) features and
exposing ``num_features``. Any name not registered here is passed to ``timm.create_model``.
Text builders return a :class:`networks.text_encoders.TextEncoder`.
"""
from __future__ import annotations

from typing import Callable, Dict

IMAGE_ENCODERS: Dict[str, Callable] = {}
TEXT_ENCODERS: Dict[str, Callable] = {}


def register_image_encoder(name: str):
    def decorate(builder):
        IMAGE_ENCODERS[name] = builder
        return builder
    return decorate


def register_text_encoder(name: str):
    def decorate(builder):
        TEXT_ENCODERS[name] = builder
        return builder
    return decorate


class EncoderError(RuntimeError):
    """An encoder cannot be built as asked: the message says which flag to change and how."""


class PretrainedWeightsUnavailable(EncoderError):
    """Pretrained weights were asked for but could not be found or fetched."""


class UnknownEncoder(EncoderError, ValueError):
    """An encoder name that is neither registered nor (for images) a timm model."""
