"""NFNet's weight standardisation, taken out of the graph that trajectory matching differentiates twice.

timm's ``ScaledStdConv2d`` convolves with ``W^ = gain * scale * (W - mean) / sqrt(var + eps)``, one
standardisation per output channel, computed by ``F.batch_norm`` in every forward. Matching
differentiates ``v . g`` with respect to the synthetic batch, where ``g`` is the student's gradient
and its parameters ``theta`` are constants. Writing ``J`` for the Jacobian of ``W^`` with respect to
``(W, gain)`` and ``a`` for the gradient with respect to ``W^``, ``g = J^T a`` and so
``v . g = a . (J v)``. A step can therefore run the network on ``W^`` as given (a plain
convolution), differentiate twice with respect to ``W^`` alone, and push ``v`` forward through
``J`` once per step (:func:`standardization_jvp`, a few operations per layer, no images). The
student's own gradient ``J^T a`` is a first-order backward through ``W^`` alone.

Inside the graph, the derivative of batch_norm's backward expands to many small operations per
layer; factored out, the graphs differentiated twice hold none of them (benchmarks/README.md has the
operation counts and times).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def scaled_std_convs(model: nn.Module) -> Dict[str, nn.Module]:
    """The model's timm ``ScaledStdConv2d`` and ``ScaledStdConv2dSame`` layers by qualified name
    (exactly those classes: a subclass may compute its own forward). Empty if timm was never imported."""
    if "timm.layers" not in sys.modules:
        return {}
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame
    return {name: m for name, m in model.named_modules() if type(m) in (ScaledStdConv2d, ScaledStdConv2dSame)}


def standardize(weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """``W^`` computed exactly as timm's layers compute it (the same call, so the same values)."""
    rows = weight.reshape(1, len(gain), -1)
    return F.batch_norm(rows, None, None, weight=(gain * scale).reshape(-1), training=True, momentum=0.0,
                        eps=eps).reshape(weight.shape)


def standardization_jvp(weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float,
                        d_weight: torch.Tensor, d_gain: torch.Tensor) -> torch.Tensor:
    """``J (d_weight, d_gain)``: how ``W^`` moves when ``(weight, gain)`` moves along the direction,
    as ``(out_channels, fan_in)`` rows.

    With ``z = (W - mean) / s`` per row, ``s = sqrt(var + eps)`` (biased variance, as batch_norm):
    ``dz = (dW - mean(dW) - z mean(z dW)) / s`` and ``dW^ = scale (gain dz + d_gain z)``, gathered
    into ``a dW + b (W - mean) + c`` with per-row ``a, b, c``: few passes over the weight, few kernels."""
    rows, d_rows = weight.reshape(len(gain), -1), d_weight.reshape(len(gain), -1)
    var, mean = torch.var_mean(rows, dim=1, unbiased=False, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    centred = rows - mean
    a = (scale * inv_std) * gain.reshape(-1, 1)
    mean_z_d = torch.bmm(centred.unsqueeze(1), d_rows.unsqueeze(2)).reshape(-1, 1) * (inv_std / rows.shape[1])
    b = (scale * d_gain.reshape(-1, 1) - a * mean_z_d) * inv_std
    return torch.addcmul(-a * d_rows.mean(1, keepdim=True), a, d_rows).addcmul_(b, centred)


def _convolve_given_weight(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(conv, "same_pad", False):  # ScaledStdConv2dSame pads on the fly
        from timm.layers import pad_same
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass(frozen=True)
class _Slot:
    """Where one layer's weight and gain lie among the parameters a flat vector concatenates."""
    weight: int  # index into the side's parameter list
    gain: int
    shape: torch.Size
    scale: float
    eps: float


class FactoredStandardization:
    """The standardised layers of a model whose parameters travel as flat vectors, one per side.

    ``layout[side]`` lists ``(qualified name, numel)`` in the order the side's vector concatenates
    them. Only layers with both weight and gain in one vector are factored (a frozen encoder's layers
    stay as timm runs them). Within ``with factored.given_weights():`` those layers convolve with
    their weight as given, so the model must be handed :meth:`standardize`'s output.
    """

    def __init__(self, model: nn.Module, layout: Dict[str, Sequence[Tuple[str, int]]]):
        self.sizes = {side: [numel for _, numel in entries] for side, entries in layout.items()}
        self.slots: Dict[str, List[_Slot]] = {}
        self.layers: List[nn.Module] = []
        candidates = scaled_std_convs(model)
        for side, entries in layout.items():
            index = {name: i for i, (name, _) in enumerate(entries)}
            for name, layer in candidates.items():
                prefix = f"{name}." if name else ""
                weight, gain = index.get(f"{prefix}weight"), index.get(f"{prefix}gain")
                if weight is None or gain is None:
                    continue
                self.slots.setdefault(side, []).append(_Slot(weight, gain, layer.weight.shape, layer.scale, layer.eps))
                self.layers.append(layer)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def given_weights(self):
        return _GivenWeights(self.layers)

    def standardize(self, side: str, theta: torch.Tensor) -> torch.Tensor:
        """``phi``: ``theta`` with each factored weight replaced by its ``W^``; ``theta`` itself for a
        side without such layers. Differentiable, so ``J^T`` is autograd's backward (timm's own kernels).
        Gains stay in place, unread by the layers while weights are given."""
        if side not in self.slots:
            return theta
        # one split, not a slice per layer: the backward of each slice would add a zero-padded copy of
        # the whole vector
        pieces = list(theta.split(self.sizes[side]))
        for slot in self.slots[side]:
            pieces[slot.weight] = standardize(pieces[slot.weight].view(slot.shape), pieces[slot.gain], slot.scale,
                                              slot.eps).reshape(-1)
        return torch.cat(pieces)

    @torch.no_grad()
    def push_forward(self, side: str, theta: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``J direction`` at ``theta``: the vector ``u`` with ``u . grad_phi = direction . grad_theta``
        for every loss. Gain entries are left as they are: the gradient with respect to them in
        ``phi`` is zero."""
        if side not in self.slots:
            return direction
        at, pieces = theta.split(self.sizes[side]), list(direction.split(self.sizes[side]))
        for slot in self.slots[side]:
            pieces[slot.weight] = standardization_jvp(at[slot.weight], at[slot.gain], slot.scale, slot.eps,
                                                      pieces[slot.weight], pieces[slot.gain]).reshape(-1)
        return torch.cat(pieces)


class _GivenWeights:
    def __init__(self, layers: Sequence[nn.Module]):
        self.layers = layers

    def __enter__(self):
        for layer in self.layers:
            layer.forward = _convolve_given_weight.__get__(layer)  # an instance attribute shadows the class's
        return self

    def __exit__(self, *exc_info):
        for layer in self.layers:
            del layer.forward
