"""NFNet's weight standardisation written so that trajectory matching's double backward is cheap.

timm's ``ScaledStdConv2d`` standardises its weight with ``F.batch_norm``. Forward and backward are one
fused kernel each, but the derivative of that backward, which the matching step's second pass takes
at every student step, expands to about 95 small operations per layer, each over the whole weight.
Written with ``var_mean`` and elementwise operations the same values take about 57 operations for the
forward, the backward with a graph and the double backward together, against about 106. For a plain
forward and backward ``batch_norm`` stays cheaper (11 operations against 31), so
:class:`ElementwiseStandardization` switches the layers only where a step keeps a graph.

Across a whole NFNet-L0 matching iteration (8 steps, all graphs kept) that is 43k operations instead
of 66k. Whether it is faster depends on where the time goes: on a GPU that waits for kernel launches
it should be; on the CPU, where NFNet-L0 at 32 px is bound by passes over its 35M weights, it
measured slower and its kept graphs larger (``benchmarks.distill_step --config nfnet_small``: 0.57x
of the reference-style time against 0.45x, 9.1 GB against 7.2 GB). So ``TrajectoryMatcher`` uses it only when asked
(``elementwise_standardization=True``; ``benchmarks.distill_step --standardization elementwise``).
"""
from __future__ import annotations

import sys
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def scaled_std_convs(model: nn.Module) -> List[nn.Module]:
    """The model's timm ``ScaledStdConv2d`` layers (exactly that class: the padding-on-the-fly
    ``...Same`` variant computes its own forward). None if timm was never imported."""
    if "timm.layers" not in sys.modules:
        return []
    from timm.layers import ScaledStdConv2d
    return [m for m in model.modules() if type(m) is ScaledStdConv2d]


def elementwise_standardized_weight(conv: nn.Module) -> torch.Tensor:
    """``gain * scale * (w - mean) / sqrt(var + eps)`` per output channel, as timm's batch_norm computes it."""
    flat = conv.weight.reshape(conv.out_channels, -1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    factor = torch.rsqrt(var + conv.eps) * (conv.gain.reshape(-1, 1) * conv.scale)
    return ((flat - mean) * factor).reshape_as(conv.weight)


def _elementwise_forward(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, elementwise_standardized_weight(conv), conv.bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class ElementwiseStandardization:
    """``with switch:`` runs the model's standardised layers with :func:`elementwise_standardized_weight`;
    outside, they are timm's own. Parameters, state-dict keys and values are untouched; a model
    without such layers passes through unchanged."""

    def __init__(self, model: nn.Module):
        self.layers = scaled_std_convs(model)

    def __enter__(self):
        for layer in self.layers:
            layer.forward = _elementwise_forward.__get__(layer)  # an instance attribute shadows the class's
        return self

    def __exit__(self, *exc_info):
        for layer in self.layers:
            del layer.forward
