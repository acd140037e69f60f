"""NFNet's weight standardisation factored out of the matching graph: the standardised weight is
timm's, its Jacobian-vector product equals autograd through the formula written by hand,
and the matching step that uses them still equals plain autograd through timm's own layers."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jvp
from torch.func import functional_call
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

import networks
from distill_utils import MultilabelContrastiveLoss
from distill_utils.distillation.matching import (MiniBatchSampler, StudentParameters, TrajectoryMatcher,
                                                 unrolled_autograd_loss)
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig
from networks.weight_standardization import (FactoredStandardization, scaled_std_convs, standardization_jvp,
                                             standardize)


def standardized_conv(kind=ScaledStdConv2d, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = kind(6, 8, kernel_size=3, groups=2, gamma=1.7, eps=1e-5, **kwargs).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.bias.normal_()
    return conv


def by_hand(weight, gain, scale, eps):
    rows = weight.reshape(len(gain), -1)
    centred = rows - rows.mean(1, keepdim=True)
    std = torch.sqrt(centred.square().mean(1, keepdim=True) + eps)
    return (gain.reshape(-1, 1) * scale * centred / std).reshape(weight.shape)


def test_the_standardised_weight_is_the_one_timms_layer_convolves_with():
    conv = standardized_conv()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    weight = standardize(conv.weight, conv.gain, conv.scale, conv.eps)
    assert torch.equal(F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups), conv(x))
    assert torch.allclose(weight, by_hand(conv.weight, conv.gain, conv.scale, conv.eps), rtol=1e-12)


def test_the_jacobian_vector_product_equals_autograd_through_the_formula():
    conv = standardized_conv()
    generator = torch.Generator().manual_seed(1)
    w, g = conv.weight.detach(), conv.gain.detach()
    dw, dg = (torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in (w, g))
    _, expected = jvp(lambda w, g: by_hand(w, g, conv.scale, conv.eps), (w, g), (dw, dg))
    ours = standardization_jvp(w, g, conv.scale, conv.eps, dw, dg).reshape(w.shape)
    assert expected.abs().max() > 0.1
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-12)
    # each half of the direction on its own: a wrong gain term cannot hide behind the weight term
    for direction in ((dw, torch.zeros_like(dg)), (torch.zeros_like(dw), dg)):
        _, expected = jvp(lambda w, g: by_hand(w, g, conv.scale, conv.eps), (w, g), direction)
        assert torch.allclose(standardization_jvp(w, g, conv.scale, conv.eps, *direction).reshape(w.shape), expected,
                              rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", [ScaledStdConv2d, ScaledStdConv2dSame], ids=["plain", "same_padding"])
def test_with_weights_given_a_layer_fed_its_standardised_weight_gives_timms_output(kind):
    conv = standardized_conv(kind, stride=2)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = conv(x)
    factored = FactoredStandardization(conv, {"image": [("weight", conv.weight.numel()), ("gain", 8), ("bias", 8)]})
    flat = torch.cat([conv.weight.detach().flatten(), conv.gain.detach().flatten(), conv.bias.detach()])
    phi = factored.standardize("image", flat)
    with factored.given_weights():
        assert "forward" in vars(conv)
        given = functional_call(conv, {"weight": phi[:flat.numel() - 16].view(conv.weight.shape),
                                       "gain": phi[-16:-8].view(conv.gain.shape), "bias": phi[-8:]}, (x,))
    assert "forward" not in vars(conv)
    assert torch.equal(given, expected)


def flat_layout(model):
    params = StudentParameters(model)
    return params, {s: list(zip(params.names[s], params.sizes[s])) for s in SIDES}


def test_factoring_finds_the_trainable_standardised_layers_of_each_side():
    config = DualEncoderConfig("test_nfnet", text_dim=7, image_trainable=True, image_pretrained=False, out_embedding=6)
    model = config.build(seed=0)
    keys = list(model.state_dict())
    factored = FactoredStandardization(model, flat_layout(model)[1])
    assert len(factored.layers) == 25 == len(scaled_std_convs(model)) and list(factored.slots) == ["image"]
    with factored.given_weights():
        assert list(model.state_dict()) == keys
    frozen = DualEncoderConfig("test_nfnet", text_dim=7, image_trainable=False, image_pretrained=False,
                               out_embedding=6).build(seed=0)
    assert not FactoredStandardization(frozen, flat_layout(frozen)[1])  # its weights are not in the vectors
    tiny = DualEncoderConfig("convnet_tiny", text_dim=7, image_trainable=True, image_pretrained=False).build(seed=0)
    assert not FactoredStandardization(tiny, flat_layout(tiny)[1])


def standardized_by_hand(factored, side, theta):
    """``phi`` through :func:`by_hand`, differentiable, for autograd to check the products against."""
    pieces = list(theta.split(factored.sizes[side]))
    for slot in factored.slots[side]:
        pieces[slot.weight] = by_hand(pieces[slot.weight].view(slot.shape), pieces[slot.gain], slot.scale,
                                      slot.eps).reshape(-1)
    return torch.cat(pieces)


def test_a_whole_side_standardised_and_pushed_forward_agrees_with_autograd():
    config = DualEncoderConfig("test_nfnet", text_dim=7, image_trainable=True, image_pretrained=False, out_embedding=6)
    model = config.build(seed=0).double()
    factored = FactoredStandardization(model, flat_layout(model)[1])
    generator = torch.Generator().manual_seed(2)
    theta = torch.cat([p.detach().flatten() for p in model.side_parameters("image")])
    with torch.no_grad():
        theta += 0.1 * torch.randn(theta.shape, generator=generator, dtype=torch.float64)  # gains away from 1
    probe, direction = (torch.randn(theta.shape, generator=generator, dtype=torch.float64) for _ in range(2))
    leaf = theta.clone().requires_grad_(True)
    phi = standardized_by_hand(factored, "image", leaf)
    ours = factored.standardize("image", leaf)
    assert torch.allclose(ours, phi, rtol=1e-12, atol=1e-14)
    grad_theta, grad_phi = torch.autograd.grad((torch.sin(phi) * probe).sum(), (leaf, phi))
    (pulled_back,) = torch.autograd.grad(ours, leaf, grad_phi)
    assert torch.allclose(pulled_back, grad_theta, rtol=1e-10, atol=1e-12)
    _, pushed_by_autograd = jvp(lambda t: standardized_by_hand(factored, "image", t), (theta,), (direction,))
    pushed = factored.push_forward("image", theta, direction)
    gains = torch.zeros_like(theta, dtype=torch.bool)
    for slot in factored.slots["image"]:  # gains are unread in phi, so what is pushed there is free
        gains.split(factored.sizes["image"])[slot.gain].fill_(True)
    assert torch.allclose(pushed[~gains], pushed_by_autograd[~gains], rtol=1e-10, atol=1e-12)
    assert torch.allclose((pushed * grad_phi).sum(), (direction * grad_theta).sum(), rtol=1e-10)
    assert factored.push_forward("text", theta, direction) is direction
    assert factored.standardize("text", theta) is theta


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "timm"])
@pytest.mark.parametrize("keep_graphs", [0, 2, 3], ids=["recompute_all", "keep_2_of_3", "keep_all"])
def test_matching_an_nfnet_student_equals_autograd_through_timms_layers(keep_graphs, factored, device):
    torch.manual_seed(0)
    config = DualEncoderConfig("test_nfnet", text_dim=7, image_trainable=True, image_pretrained=False, out_embedding=6)
    model = config.build(seed=0).double().train().to(device)
    n = 6
    generator = torch.Generator().manual_seed(0)
    synthetic = SyntheticSet(torch.randn(n, 3, 16, 16, generator=generator, dtype=torch.float64),
                             torch.randn(n, 7, generator=generator, dtype=torch.float64),
                             make_similarity("full", n), 0.05, 0.07).double().to(device)
    start = {s: torch.cat([p.detach().flatten() for p in model.side_parameters(s)]) for s in SIDES}
    target = {s: v + 0.01 * torch.randn(v.shape, generator=generator, dtype=torch.float64).to(device)
              for s, v in start.items()}
    sampler = MiniBatchSampler(n, 4, torch.Generator().manual_seed(1))
    batches = [sampler.next().to(device) for _ in range(3)]
    criterion = MultilabelContrastiveLoss("WBCE")

    torch.manual_seed(3)
    matcher = TrajectoryMatcher(model, criterion, 3, keep_graphs, factor_standardization=factored)
    assert bool(matcher.standardization) == factored
    matcher.match(synthetic, start, target, batches)
    assert all("forward" not in vars(m) for m in model.modules())
    fast = {name: p.grad.clone() for name, p in synthetic.named_parameters()}
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    unrolled_autograd_loss(model, criterion, synthetic, start, target, batches).backward()  # timm's layers
    for name, parameter in synthetic.named_parameters():
        assert parameter.grad.abs().max() > 0, name
        assert torch.allclose(fast[name], parameter.grad, rtol=1e-8, atol=1e-12), name
