"""CLIP-style dual encoder over an image encoder and cached text features.

The text encoder never appears here: texts enter as its cached feature vectors (``text_dim`` wide).
"Image side" and "text side" name the parameter lists that trajectories store and that
trajectory matching moves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .heads import ProjectionHead
from .image_encoders import create_image_encoder

SIDES = ("image", "text")


@dataclass(frozen=True)
class Blend:
    """Representation blending within a batch: on each side, row m of the representation r becomes
    (1 - w[m]) r[m] + w[m] r[partner[m]]. The representation is what the side's projection head takes
    (the frozen image encoder's features, the text features), or, for a trainable image encoder,
    its output before normalisation."""
    partner: Dict[str, torch.Tensor]  # side -> (B,) long
    weight: Dict[str, torch.Tensor]   # side -> (B,) in [0, 1]

    def apply(self, side: str, representation: torch.Tensor) -> torch.Tensor:
        weight = self.weight[side].to(representation.dtype)[:, None]
        return (1.0 - weight) * representation + weight * representation[self.partner[side]]


@dataclass(frozen=True)
class DualEncoderConfig:
    image_encoder: str
    text_dim: int
    image_trainable: bool = False
    out_embedding: int = 2048
    temperature: float = 0.07
    image_pretrained: bool = False
    checkpoint_dir: Optional[str] = None
    init_seed: int = 0  # seeds the random weights of a frozen, non-pretrained image encoder
    input_size: Optional[int] = None  # resize images to this side first (a student of another architecture)
    fold_frozen_norms: bool = True  # a frozen encoder's batch norms folded into its convolutions (only faster)

    def build(self, seed: Optional[int] = None) -> "DualEncoder":
        """A fresh model. ``seed`` draws the trainable parts; the image encoder's random start is
        always drawn from ``init_seed`` when frozen, so every script sees the same frozen encoder."""
        encoder_seed = seed if (self.image_trainable and seed is not None) else self.init_seed
        image_encoder = create_image_encoder(self.image_encoder, self.image_pretrained,
                                             self.checkpoint_dir, init_seed=encoder_seed)
        if self.fold_frozen_norms and not self.image_trainable and hasattr(image_encoder, "fold_frozen_norms"):
            image_encoder.fold_frozen_norms()
        if self.input_size is not None:
            image_encoder = ResizedInput(image_encoder, self.input_size)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return DualEncoder(image_encoder, self.text_dim, self.image_trainable,
                               self.out_embedding, self.temperature)


class ResizedInput(nn.Module):
    """An image encoder that first resizes its input to ``size`` x ``size`` (bilinear, antialiased)."""

    def __init__(self, encoder: nn.Module, size: int):
        super().__init__()
        self.encoder = encoder
        self.size = size
        self.num_features = encoder.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.encoder(images)


class DualEncoder(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_dim: int, image_trainable: bool,
                 out_embedding: int = 2048, temperature: float = 0.07):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_trainable = image_trainable
        width = image_encoder.num_features
        if image_trainable:
            self.image_projection = None
            self.text_projection = ProjectionHead(text_dim, width)
        else:
            for parameter in image_encoder.parameters():
                parameter.requires_grad_(False)
            self.image_projection = ProjectionHead(width, out_embedding)
            self.text_projection = ProjectionHead(text_dim, out_embedding)
        # Fixed, not trained (as in the reference): log(1 / temperature).
        self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.image_trainable:
            self.image_encoder.eval()  # frozen: no dropout, no batch-norm statistics updates
        return self

    def side_module(self, side: str) -> nn.Module:
        if side == "image":
            return self.image_encoder if self.image_trainable else self.image_projection
        if side == "text":
            return self.text_projection
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")

    def side_prefix(self, side: str) -> str:
        if side == "image":
            return "image_encoder." if self.image_trainable else "image_projection."
        return "text_projection."

    def side_named_parameters(self, side: str) -> Dict[str, nn.Parameter]:
        """Full parameter names (as ``named_parameters`` of the whole model gives them), in order."""
        prefix = self.side_prefix(side)
        return {prefix + name: p for name, p in self.side_module(side).named_parameters()}

    def side_parameters(self, side: str) -> List[nn.Parameter]:
        return list(self.side_module(side).parameters())

    def dropout_layout(self) -> Dict[str, Tuple[float, int]]:
        """Per side whose module is a projection head: its dropout probability and width, what a
        given dropout (``forward``'s ``dropout``) must match. A trainable image encoder is absent."""
        return {side: module.dropout_layout() for side in SIDES
                if isinstance(module := self.side_module(side), ProjectionHead)}

    def encode_image(self, images: torch.Tensor, blend: Optional[Blend] = None,
                     images_are_features: bool = False, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``images_are_features``: ``images`` already are the image encoder's outputs (a frozen
        encoder's features, computed once for many steps)."""
        features = images if images_are_features else self.image_encoder(images)
        if blend is not None:
            features = blend.apply("image", features)
        if self.image_projection is not None:
            features = self.image_projection(features, keep)
        return F.normalize(features, dim=-1)

    def encode_text(self, text_features: torch.Tensor, blend: Optional[Blend] = None,
                    keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        if blend is not None:
            text_features = blend.apply("text", text_features)
        return F.normalize(self.text_projection(text_features, keep), dim=-1)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor, blend: Optional[Blend] = None,
                images_are_features: bool = False,
                dropout: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Logits (B_img x B_txt) = exp(logit_scale) * img @ txt.T; ``blend`` mixes representations
        between the batch's instances first (RepBlend's student steps); ``dropout`` gives the heads'
        dropout per side (:meth:`ProjectionHead.forward`) instead of drawing it."""
        dropout = dropout or {}
        return (self.logit_scale.exp() * self.encode_image(images, blend, images_are_features, dropout.get("image"))
                @ self.encode_text(text_features, blend, dropout.get("text")).t())
