"""Speed switches: which ones each device gets, and that they leave expert training's results alone."""
import argparse

import pytest
import torch
from torch import nn

from distill_utils import MultilabelContrastiveLoss
from distill_utils.experts.training import ExpertOptim, make_optimizer, train_one_epoch
from distill_utils.runtime.speed import SpeedOptions
from networks import DualEncoderConfig


def test_defaults_per_device():
    assert SpeedOptions.for_device(torch.device("cpu"), bf16=True) == SpeedOptions()
    cuda = SpeedOptions.for_device(torch.device("cuda"))
    assert cuda.tf32 and cuda.channels_last and cuda.fused_sgd and not cuda.bf16
    assert SpeedOptions.for_device(torch.device("cuda"), bf16=True).bf16


def test_channels_last_only_for_convolutional_image_encoders():
    conv = DualEncoderConfig("convnet_tiny", 32, image_trainable=True).build(seed=0)
    options = SpeedOptions(channels_last=True).for_model(conv)
    assert options.channels_last
    options.prepare_model(conv)
    weight = conv.image_encoder.features[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    flat = argparse.Namespace(image_encoder=nn.Linear(4, 4))
    assert not SpeedOptions(channels_last=True).for_model(flat).channels_last


def train_a_little(speed: SpeedOptions, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    torch.manual_seed(0)
    model = DualEncoderConfig("convnet_tiny", 12, image_trainable=True).build(seed=0).to(device)
    speed = speed.for_model(model)
    speed.prepare_model(model)
    hyper = ExpertOptim(0.01, 0.01, momentum=0.9, weight_decay=5e-4)
    optimizer, _ = make_optimizer(model, hyper, speed)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8 * b, 8 * b + 8)) for b in range(3)]
    texts = torch.randn(24, 12, generator=generator)
    train_one_epoch(model, batches, texts, optimizer, MultilabelContrastiveLoss("InfoNCE"), device, speed,
                    progress=False)
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters() if p.requires_grad])


@pytest.fixture(scope="module")
def plain():
    return train_a_little(SpeedOptions())


def test_training_moved_the_parameters(plain):
    torch.manual_seed(0)
    start = torch.cat([p.detach().reshape(-1) for p in
                       DualEncoderConfig("convnet_tiny", 12, image_trainable=True).build(seed=0).parameters()
                       if p.requires_grad])
    assert (plain - start).abs().max() > 1e-3


@pytest.mark.parametrize("speed", [SpeedOptions(channels_last=True), SpeedOptions(fused_sgd=True),
                                   SpeedOptions(channels_last=True, fused_sgd=True)], ids=repr)
def test_float32_switches_only_reorder_arithmetic(plain, speed):
    # relative to the parameters' norm: oneDNN's channels-last kernels sum in another order, by how much
    # depends on the processor (6e-5 on the Xeon, less on the EPYC); bfloat16 moves them by ~2e-3
    moved = train_a_little(speed)
    assert torch.isfinite(moved).all()
    assert (moved - plain).norm() / plain.norm() < 5e-4


def test_bf16_autocast_stays_close_but_is_not_exact(plain):
    bf16 = train_a_little(SpeedOptions(bf16=True))
    assert torch.isfinite(bf16).all()
    assert not torch.equal(bf16, plain)  # the switch really ran in bfloat16
    assert (bf16 - plain).abs().max() / plain.abs().max() < 5e-2
