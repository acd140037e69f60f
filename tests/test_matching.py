"""The constant-memory matching gradients equal plain autograd through the unrolled student steps."""
import pytest
import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.distillation.matching import (MEMORY_MARGIN, MiniBatchSampler, TrajectoryMatcher,
                                                 room_for_another_graph, unrolled_autograd_loss)
from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
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


class ScriptedMemory:
    """A GPU gauge that reports given figures: ``allocated`` before and after the first kept graph,
    then one ``available`` per further decision."""

    def __init__(self, allocated, available, total):
        self._allocated, self._available, self.total = list(allocated), list(available), total
        self.asked = 0

    def allocated(self):
        return self._allocated.pop(0)

    def available(self):
        self.asked += 1
        return self._available.pop(0)


def match_and_compare(keep_graphs, memory=None, steps=5):
    """Match with ``keep_graphs``; assert the gradients equal the unrolled autograd ones; the result."""
    model, synthetic, start, target = build(True, "lowrank")
    criterion = MultilabelContrastiveLoss("WBCE")
    sampler = MiniBatchSampler(len(synthetic), 4, torch.Generator().manual_seed(1))
    batches = [sampler.next() for _ in range(steps)]
    torch.manual_seed(5)
    result = TrajectoryMatcher(model, criterion, steps, keep_graphs, memory).match(synthetic, start, target, batches)
    fast = grads_of(synthetic)
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    unrolled_autograd_loss(model, criterion, synthetic, start, target, batches).backward()
    for name, slow in grads_of(synthetic).items():
        assert torch.allclose(fast[name], slow, rtol=1e-7, atol=1e-10), name
    return result


def test_room_for_another_graph_keeps_a_second_graph_and_the_margin_free():
    total, graph = 1000, 100
    assert 2 * graph + MEMORY_MARGIN * total == 250
    assert room_for_another_graph(graph, 250, total)
    assert not room_for_another_graph(graph, 249, total)


def test_auto_keeps_graphs_while_the_gauge_has_room_and_stays_exact():
    # the first graph takes 100 bytes, so another needs 2 * 100 + 0.05 * 1000 = 250 available
    memory = ScriptedMemory(allocated=[5000, 5100], available=[600, 250, 249, 10_000], total=1000)
    result = match_and_compare("auto", memory)
    assert result.graph_bytes == 100
    assert result.kept_graphs == 3  # the first unasked, then 600 and 250 fit, 249 does not
    assert memory.asked == 3        # kept graphs are a prefix: no more questions after a refusal


def test_auto_without_a_gauge_keeps_every_graph():
    result = match_and_compare("auto", memory=None)
    assert result.kept_graphs == 5 and result.graph_bytes == 0


@pytest.mark.parametrize("keep_graphs", [0, 2, 9])
def test_a_fixed_count_never_asks_the_gauge(keep_graphs):
    memory = ScriptedMemory(allocated=[], available=[], total=1000)
    assert match_and_compare(keep_graphs, memory).kept_graphs == min(keep_graphs, 5)
    assert memory.asked == 0


@pytest.mark.parametrize("keep_graphs", [-1, "all", 2.5])
def test_keep_graphs_is_a_count_or_auto(keep_graphs):
    model, *_ = build(True, "full")
    with pytest.raises(ValueError, match="keep_graphs must be a count >= 0 or 'auto'"):
        TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), 3, keep_graphs)


@pytest.mark.parametrize("blend", [0.0, 0.4], ids=["plain", "blended"])
def test_a_frozen_encoder_run_once_per_iteration_gives_the_per_step_gradients(blend):
    """The frozen encoder's features are computed once per iteration and its gradient flows back once;
    that must equal running the encoder inside every step (the only way for a trainable encoder)."""
    model, synthetic, start, target = build(False, "full", seed=3)
    criterion = MultilabelContrastiveLoss("InfoNCE")
    batches = [torch.tensor([0, 2, 3]), torch.tensor([1, 2, 5]), torch.tensor([4, 0, 1])]  # 2 and 0 reused
    grads = {}
    for once in (True, False):
        torch.manual_seed(7)
        matcher = TrajectoryMatcher(model, criterion, syn_steps=3, keep_graphs=1, blend=blend, frozen_features=once)
        assert matcher.frozen_features is once
        loss = matcher.match(synthetic, start, target, batches).loss
        grads[once] = (loss, grads_of(synthetic))
        synthetic.zero_grad(set_to_none=True)
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-12)
    for name, value in grads[False][1].items():
        assert value.abs().sum() > 0, name
        assert torch.allclose(grads[True][1][name], value, rtol=1e-9, atol=1e-12), name


def test_a_trainable_encoder_never_takes_the_frozen_shortcut():
    model, *_ = build(True, "full")
    assert not TrajectoryMatcher(model, MultilabelContrastiveLoss("InfoNCE"), syn_steps=2).frozen_features
