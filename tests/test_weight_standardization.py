"""NFNet's weight standardisation in elementwise form equals timm's batch_norm form, to the second
derivative, and the matching step that uses it still equals plain autograd through timm's layers."""
import pytest
import torch
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

import networks
from distill_utils import MultilabelContrastiveLoss
from distill_utils.matching import MiniBatchSampler, TrajectoryMatcher, unrolled_autograd_loss
from distill_utils.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig
from networks.weight_standardization import ElementwiseStandardization, elementwise_standardized_weight


def standardized_conv(seed=0):
    torch.manual_seed(seed)
    conv = ScaledStdConv2d(6, 8, kernel_size=3, groups=2, gamma=1.7, eps=1e-5).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.bias.normal_()
    return conv


def derivatives(conv, x, probe, direction):
    """Output, the gradient of <output, probe> w.r.t. weight and gain (with a graph), and the gradient
    of that gradient's projection on ``direction`` w.r.t. the input: what matching differentiates."""
    out = conv(x)
    grads = torch.autograd.grad((out * probe).sum(), (conv.weight, conv.gain), create_graph=True)
    (second,) = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, direction)), (x,))
    return out, grads, second


def test_the_elementwise_weight_is_timms_batch_norm_standardisation_written_out():
    conv = standardized_conv()
    flat = conv.weight.detach().reshape(8, -1)
    by_hand = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    by_hand = by_hand * conv.gain.detach().reshape(-1, 1) * conv.scale
    assert torch.allclose(elementwise_standardized_weight(conv), by_hand.reshape_as(conv.weight), rtol=1e-12)


def test_inside_the_switch_a_layer_has_timms_values_and_derivatives_and_after_it_timms_forward():
    conv = standardized_conv()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 7, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 8, 7, 7, generator=generator, dtype=torch.float64)
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in (conv.weight, conv.gain)]
    timm_own = derivatives(conv, x, probe, direction)
    switch = ElementwiseStandardization(conv)
    assert switch.layers == [conv]
    with switch:
        assert "forward" in vars(conv)
        elementwise = derivatives(conv, x, probe, direction)
    assert "forward" not in vars(conv)
    for ours, theirs in zip([elementwise[0], *elementwise[1], elementwise[2]], [timm_own[0], *timm_own[1], timm_own[2]]):
        assert theirs.abs().max() > 0
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_only_timms_plain_standardised_layers_are_switched():
    model = networks.create_image_encoder("test_nfnet")
    keys = list(model.state_dict())
    switch = ElementwiseStandardization(model)
    assert len(switch.layers) == 25 and all(type(m) is ScaledStdConv2d for m in switch.layers)
    same_padding = ScaledStdConv2dSame(3, 4, kernel_size=3)
    assert ElementwiseStandardization(torch.nn.Sequential(same_padding)).layers == []  # pads in its own forward
    with switch:
        assert list(model.state_dict()) == keys
    assert ElementwiseStandardization(networks.create_image_encoder("convnet_tiny")).layers == []


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "timm"])
@pytest.mark.parametrize("keep_graphs", [0, 2, 3], ids=["recompute_all", "keep_2_of_3", "keep_all"])
def test_matching_an_nfnet_student_equals_autograd_through_timms_layers(keep_graphs, elementwise):
    torch.manual_seed(0)
    config = DualEncoderConfig("test_nfnet", text_dim=7, image_trainable=True, image_pretrained=False, out_embedding=6)
    model = config.build(seed=0).double().train()
    n = 6
    generator = torch.Generator().manual_seed(0)
    synthetic = SyntheticSet(torch.randn(n, 3, 16, 16, generator=generator, dtype=torch.float64),
                             torch.randn(n, 7, generator=generator, dtype=torch.float64),
                             make_similarity("full", n), 0.05, 0.07).double()
    start = {s: torch.cat([p.detach().flatten() for p in model.side_parameters(s)]) for s in SIDES}
    target = {s: v + 0.01 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for s, v in start.items()}
    sampler = MiniBatchSampler(n, 4, torch.Generator().manual_seed(1))
    batches = [sampler.next() for _ in range(3)]
    criterion = MultilabelContrastiveLoss("WBCE")

    torch.manual_seed(3)
    matcher = TrajectoryMatcher(model, criterion, 3, keep_graphs, elementwise_standardization=elementwise)
    matcher.match(synthetic, start, target, batches)
    fast = {name: p.grad.clone() for name, p in synthetic.named_parameters()}
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    unrolled_autograd_loss(model, criterion, synthetic, start, target, batches).backward()  # timm's layers
    for name, parameter in synthetic.named_parameters():
        assert parameter.grad.abs().max() > 0, name
        assert torch.allclose(fast[name], parameter.grad, rtol=1e-8, atol=1e-12), name
