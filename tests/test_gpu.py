"""CUDA checks; skipped (marker ``gpu``) on machines without a GPU."""
import pytest
import torch

from distill_utils import MultilabelContrastiveLoss
from distill_utils.distillation.matching import TrajectoryMatcher
from tests.test_matching import build


def match_without_dropout(model, synthetic, start, target, batches, device):
    """Matching gradients of ``synthetic`` on ``device`` with the student in eval mode.

    The matcher puts its student in train mode when built, so eval mode is set afterwards: CPU and
    CUDA draw different dropout masks from their own generators and could not agree otherwise.
    """
    model, synthetic = model.to(device), synthetic.to(device)
    matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), 2)
    matcher.model.eval()
    matcher.match(synthetic, {s: v.to(device) for s, v in start.items()},
                  {s: v.to(device) for s, v in target.items()}, [b.to(device) for b in batches])
    return {n: p.grad.to("cpu", copy=True) for n, p in synthetic.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("sim_type", ["full", "lowrank"])
def test_cuda_gradients_match_cpu(sim_type):
    model, synthetic, start, target = build(True, sim_type)
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])]
    cpu = match_without_dropout(model, synthetic, start, target, batches, torch.device("cpu"))
    synthetic.zero_grad(set_to_none=True)
    cuda = match_without_dropout(model, synthetic, start, target, batches, torch.device("cuda"))
    for name, grad in cuda.items():
        assert torch.allclose(grad, cpu[name], rtol=1e-6, atol=1e-9), name


@pytest.mark.gpu
@pytest.mark.parametrize("keep_graphs", [0, 1, "auto"])
def test_dropout_masks_are_replayed_on_cuda(keep_graphs):
    from distill_utils.distillation.matching import unrolled_autograd_loss
    model, synthetic, start, target = build(False, "full")
    device = torch.device("cuda")
    model, synthetic = model.to(device), synthetic.to(device)
    start = {s: v.to(device) for s, v in start.items()}
    target = {s: v.to(device) for s, v in target.items()}
    batches = [torch.tensor([0, 1, 2, 3], device=device), torch.tensor([2, 3, 4, 5], device=device)]
    criterion = MultilabelContrastiveLoss("InfoNCE")
    torch.manual_seed(3)
    TrajectoryMatcher(model, criterion, 2, keep_graphs).match(synthetic, start, target, batches)
    fast = {n: p.grad.clone() for n, p in synthetic.named_parameters()}
    synthetic.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    unrolled_autograd_loss(model, criterion, synthetic, start, target, batches).backward()
    for name, parameter in synthetic.named_parameters():
        assert torch.allclose(fast[name], parameter.grad, rtol=1e-7, atol=1e-10), name


@pytest.mark.gpu
def test_the_cuda_gauge_sees_an_allocation_and_auto_measures_a_graph():
    from distill_utils.distillation.matching import CudaMemory
    device = torch.device("cuda")
    memory = CudaMemory(device)
    before_available, before_allocated = memory.available(), memory.allocated()
    block = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    assert memory.allocated() - before_allocated == block.numel()
    assert before_available - memory.available() == pytest.approx(block.numel(), rel=0.02)
    assert 0 < memory.available() < memory.total
    del block

    model, synthetic, start, target = build(True, "full")
    model, synthetic = model.to(device), synthetic.to(device)
    batches = [torch.tensor([0, 1, 2, 3], device=device), torch.tensor([2, 3, 4, 5], device=device)]
    result = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), 2, "auto").match(
        synthetic, {s: v.to(device) for s, v in start.items()}, {s: v.to(device) for s, v in target.items()}, batches)
    parameter_bytes = sum(v.numel() * v.element_size() for v in start.values())
    assert result.kept_graphs == 2  # a tiny model on a GPU: every graph fits
    assert result.graph_bytes > parameter_bytes  # at least the next theta and the step's gradients


@pytest.mark.gpu
def test_cuda_speed_switches_only_reorder_float32_arithmetic():
    from distill_utils.runtime.speed import SpeedOptions
    from tests.test_speed import train_a_little
    device = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    SpeedOptions(tf32=False).apply_globals()  # cuDNN allows TF32 by default: both runs in true float32
    try:
        plain = train_a_little(SpeedOptions(), device)
        fast = train_a_little(SpeedOptions(channels_last=True, fused_sgd=True), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
