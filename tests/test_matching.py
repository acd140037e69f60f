"""The constant-memory matching gradients equal plain autograd through the unrolled student steps."""
import pytest
import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.matching import MiniBatchSampler, TrajectoryMatcher, unrolled_autograd_loss
from distill_utils.synthetic import SyntheticSet, make_similarity
from networks import SIDES, DualEncoderConfig


def build(trainable: bool, sim_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = DualEncoderConfig("convnet_tiny", text_dim=7, image_trainable=trainable, out_embedding=6).build(seed=seed)
    model = model.double().train()
    n = 6
    generator = torch.Generator().manual_seed(seed)
    similarity = make_similarity(sim_type, n, rank=2, alpha=1.0, generator=generator).double()
    if sim_type == "lowrank":  # move R off zero so every low-rank factor gets a non-trivial gradient
        with torch.no_grad():
            similarity.right.normal_(0, 0.3, generator=generator)
    else:
        with torch.no_grad():
            similarity.matrix.add_(0.1 * torch.randn(n, n, generator=generator, dtype=torch.float64))
    synthetic = SyntheticSet(torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64),
                             torch.randn(n, 7, generator=generator, dtype=torch.float64), similarity, 0.05, 0.07).double()
    start, target = {}, {}
    for side in SIDES:
        flat = torch.cat([p.detach().flatten() for p in model.side_parameters(side)])
        start[side] = flat
        target[side] = flat + 0.05 * torch.randn(flat.shape, generator=generator, dtype=torch.float64)
    return model, synthetic, start, target


def grads_of(synthetic):
    return {name: p.grad.clone() for name, p in synthetic.named_parameters()}


@pytest.mark.parametrize("trainable", [True, False], ids=["image_trainable", "image_frozen"])
@pytest.mark.parametrize("sim_type", ["full", "lowrank"])
@pytest.mark.parametrize("loss_type", ["WBCE", "InfoNCE"])
@pytest.mark.parametrize("keep_graphs", [0, 1, 2, 5], ids=["recompute_all", "keep_1_of_3", "keep_2_of_3", "keep_all"])
def test_fast_gradients_equal_unrolled_autograd(trainable, sim_type, loss_type, keep_graphs):
    model, synthetic, start, target = build(trainable, sim_type)
    criterion = MultilabelContrastiveLoss(loss_type)
    sampler = MiniBatchSampler(len(synthetic), 4, torch.Generator().manual_seed(1))
    batches = [sampler.next() for _ in range(3)]  # crosses a reshuffle: 6 pairs, 4 per batch

    torch.manual_seed(42)  # dropout in the projection heads is active: masks must be replayed
    matcher = TrajectoryMatcher(model, criterion, syn_steps=3, keep_graphs=keep_graphs)
    result = matcher.match(synthetic, start, target, batches)
    fast = grads_of(synthetic)
    synthetic.zero_grad(set_to_none=True)

    torch.manual_seed(42)
    reference = unrolled_autograd_loss(model, criterion, synthetic, start, target, batches)
    reference.backward()
    slow = grads_of(synthetic)

    assert result.loss == pytest.approx(reference.item(), rel=1e-10)
    assert set(fast) == set(slow)
    for name in slow:
        assert slow[name].abs().sum() > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
        assert torch.allclose(fast[name], slow[name], rtol=1e-7, atol=1e-10), name


def test_a_lost_rng_state_would_be_caught():
    """Sanity check of the test itself: with different dropout masks the gradients differ."""
    model, synthetic, start, target = build(True, "full")
    criterion = MultilabelContrastiveLoss("WBCE")
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])]
    torch.manual_seed(1)
    TrajectoryMatcher(model, criterion, 2).match(synthetic, start, target, batches)
    fast = grads_of(synthetic)
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    unrolled_autograd_loss(model, criterion, synthetic, start, target, batches).backward()
    assert not torch.allclose(fast["images"], synthetic.images.grad, rtol=1e-7, atol=1e-10)


def test_minibatches_are_distinct_and_cover_the_set():
    sampler = MiniBatchSampler(10, 4, torch.Generator().manual_seed(0))
    first, second, third = sampler.next(), sampler.next(), sampler.next()
    assert len(set(first.tolist()) | set(second.tolist())) == 8  # no repeats within a permutation
    assert len(set(third.tolist())) == 4                          # reshuffled: still distinct
    assert len(MiniBatchSampler(3, 40, torch.Generator()).next()) == 3
