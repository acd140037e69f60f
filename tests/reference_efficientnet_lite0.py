"""An independent EfficientNet-Lite0, written from the architecture's definition and run straight on the
package's state dict (its own key names), for checking the timm model with converted weights.

Lite0: stem 3x3/2 to 32 channels, seven stages of inverted-residual blocks (no squeeze-excitation,
ReLU6 everywhere), head 1x1 to 1280, average pool, linear classifier. Convolutions pad the TensorFlow
way ("same": the total padding max((ceil(n/s)-1)*s + k - n, 0), the smaller half first), BatchNorm
uses eps 1e-3, inputs are scaled to [-1, 1].
"""
import math

import torch
import torch.nn.functional as F

# (repeats, stride of the first block, expansion) per stage; kernel sizes and widths come from the weights
STAGES = ((1, 1, 1), (2, 2, 6), (2, 2, 6), (3, 2, 6), (3, 1, 6), (4, 2, 6), (1, 1, 6))
EPS = 1e-3


def same_pad(x, kernel, stride):
    def total(n):
        return max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    h, w = total(x.shape[-2]), total(x.shape[-1])
    return F.pad(x, (w // 2, w - w // 2, h // 2, h - h // 2))


def conv(x, weight, stride=1, groups=1):
    return F.conv2d(same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)


def bn(x, state, prefix):
    return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"], state[prefix + ".weight"],
                        state[prefix + ".bias"], training=False, eps=EPS)


def logits(state, images01):
    """ImageNet logits of (B, 3, H, W) images with values in [0, 1]."""
    x = images01 * 2.0 - 1.0
    x = F.relu6(bn(conv(x, state["_conv_stem.weight"], stride=2), state, "_bn0"))
    index = 0
    for repeats, first_stride, expansion in STAGES:
        for r in range(repeats):
            p = f"_blocks.{index}."
            stride = first_stride if r == 0 else 1
            inputs = x
            if expansion != 1:
                x = F.relu6(bn(conv(x, state[p + "_expand_conv.weight"]), state, p + "_bn0"))
            depthwise = state[p + "_depthwise_conv.weight"]
            x = F.relu6(bn(conv(x, depthwise, stride, groups=depthwise.shape[0]), state, p + "_bn1"))
            x = bn(conv(x, state[p + "_project_conv.weight"]), state, p + "_bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    x = F.relu6(bn(conv(x, state["_conv_head.weight"]), state, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])
