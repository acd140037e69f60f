"""Frozen batch norms folded into the convolutions before them.

A frozen batch norm is a per-channel affine map ``x * scale + shift`` with constants; after a
convolution without bias it equals the same convolution with its weights scaled per output channel and
``shift`` as its bias. The folded network computes the same function (to float rounding) with one
elementwise pass fewer per norm, forward and backward: what a frozen image encoder costs the matching
on a CPU is mostly such passes (benchmarks/README.md has the figures).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch import nn

# timm's EfficientNet blocks: each convolution and the norm that directly follows it in ``forward``
BLOCK_PAIRS = {
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}
TOP_PAIRS = (("conv_stem", "bn1"), ("conv_head", "bn2"))


def norm_affine(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a frozen or evaluating batch norm, computed in float64."""
    var = norm.running_var.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = weight * (var + norm.eps).rsqrt()
    return scale, bias - norm.running_mean.double() * scale


def what_follows(norm: nn.Module) -> nn.Module:
    """What a norm module runs after its affine map: timm's norm-act layers hold a drop and an act."""
    tail = [m for name in ("drop", "act") if isinstance(m := getattr(norm, name, None), nn.Module)
            and not isinstance(m, nn.Identity)]
    return nn.Sequential(*tail) if tail else nn.Identity()


def fold_pair(owner: nn.Module, conv_name: str, norm_name: str) -> None:
    """Folds ``owner.norm_name`` into ``owner.conv_name`` and leaves only the norm's activation."""
    conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
    frozen = type(norm).__name__.startswith("Frozen") or not norm.training  # timm's Frozen* norms never update
    if not isinstance(conv, nn.Conv2d) or conv.bias is not None or not frozen:
        raise ValueError(f"cannot fold {norm_name} into {conv_name}: a bias-free convolution followed by a "
                         f"frozen norm is needed, got {type(conv).__name__} and {type(norm).__name__}")
    scale, shift = norm_affine(norm)
    with torch.no_grad():
        conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    setattr(owner, norm_name, what_follows(norm))


def efficientnet_pairs(net: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    for conv, norm in TOP_PAIRS:
        yield net, conv, norm
    for stage in net.blocks:
        for block in stage:
            pairs = BLOCK_PAIRS.get(type(block).__name__)
            if pairs is None:
                raise ValueError(f"no known folding for a {type(block).__name__} block")
            for conv, norm in pairs:
                yield block, conv, norm


def fold_efficientnet_norms(net: nn.Module) -> int:
    """Folds every batch norm of a timm EfficientNet whose norms are frozen; returns how many."""
    pairs = list(efficientnet_pairs(net))
    for owner, conv, norm in pairs:
        fold_pair(owner, conv, norm)
    return len(pairs)
