"""Speed switches: TF32, channels-last, fused SGD and bfloat16 autocast.

Each switch is its own field so that ``benchmarks/expert_step.py`` can measure it on and off; the
scripts use ``SpeedOptions.for_device``: everything on for CUDA (bfloat16 only when asked for,
because it is not bit-exact), everything off on the CPU, where these paths gain nothing for the
small models that run there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from networks import DualEncoder, is_convolutional


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def enable_fast_math(device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on GPUs (Ampere and newer; a rounding well within
    the noise of training; benchmarks/README.md has the measured speed-up)."""
    if device.type == "cuda":
        set_tf32(True)
        torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class SpeedOptions:
    tf32: bool = False
    channels_last: bool = False
    fused_sgd: bool = False
    bf16: bool = False

    @classmethod
    def for_device(cls, device: torch.device, bf16: bool = False) -> "SpeedOptions":
        cuda = device.type == "cuda"
        return cls(tf32=cuda, channels_last=cuda, fused_sgd=cuda, bf16=bf16 and cuda)

    def for_model(self, model: DualEncoder) -> "SpeedOptions":
        """Channels-last only where the image encoder has convolutions."""
        return replace(self, channels_last=self.channels_last and is_convolutional(model.image_encoder))

    def apply_globals(self) -> None:
        set_tf32(self.tf32)

    def prepare_model(self, model: DualEncoder) -> DualEncoder:
        if self.channels_last:
            model.image_encoder.to(memory_format=torch.channels_last)
        return model

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def sgd_fused_flag(self):
        """``fused=`` for torch.optim.SGD: True, or None (let torch pick its default foreach path)."""
        return True if self.fused_sgd else None
