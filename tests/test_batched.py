"""The projection head under torch.func's batched second derivatives (what distill_utils.distillation.batched runs)."""
import torch
from torch.func import functional_call, grad, vmap

from networks.heads import ProjectionHead


def head_and_inputs(k: int = 3):
    torch.manual_seed(0)
    head = ProjectionHead(5, 4, dropout=0.3).double().train()
    names = [name for name, _ in head.named_parameters()]
    base = torch.cat([p.detach().flatten() for p in head.parameters()])
    thetas = base + 0.3 * torch.randn(k, base.numel(), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(k, 6, 4) >= 0.3).double() / 0.7
    return head, names, thetas, x, keep


def as_params(head, names, theta):
    shapes = [p.shape for p in head.parameters()]
    return {n: piece.view(shape) for n, piece, shape in zip(names, theta.split([s.numel() for s in shapes]), shapes)}


def test_a_given_dropout_of_ones_is_the_head_without_dropout():
    head, _, _, x, _ = head_and_inputs()
    expected = head.eval()(x)
    assert torch.allclose(head.train()(x, torch.ones(6, 4, dtype=torch.float64)), expected, rtol=1e-14, atol=1e-15)


def test_batched_second_derivatives_through_the_head_match_autograd_per_parameter_set():
    """d/dx of sum_k w_k . grad_theta f(theta_k, x), once batched over k and once by plain autograd
    for each k; the LayerNorm with batched affine terms is where the fused kernel went wrong."""
    head, names, thetas, x, keep = head_and_inputs()
    weights = torch.randn_like(thetas)

    def loss(theta, inputs, mask):
        return functional_call(head, as_params(head, names, theta), (inputs, mask)).sin().sum()

    batched = vmap(grad(loss), in_dims=(0, None, 0))(thetas, x, keep)
    got, = torch.autograd.grad((batched * weights).sum(), x)
    expected = torch.zeros_like(x)
    for theta, mask, weight in zip(thetas, keep, weights):
        leaf = theta.clone().requires_grad_(True)
        g, = torch.autograd.grad(loss(leaf, x, mask), leaf, create_graph=True)
        expected += torch.autograd.grad((g * weight).sum(), x)[0]
    assert expected.abs().max() > 1e-3
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_of_the_student_steps_is_near_float32_and_batches_alike():
    from distill_utils import MultilabelContrastiveLoss
    from distill_utils.distillation.matching import TrajectoryMatcher
    from distill_utils.distillation.segments import match_segments
    from tests.test_segments import STEPS, problem
    grads = {}
    for autocast in (None, torch.bfloat16):
        for batching in (False, True):
            model, synthetic, segments, batches = problem(2, trainable=False)
            model, synthetic = model.float(), synthetic.float()
            for segment in segments:
                segment.start = {s: v.float() for s, v in segment.start.items()}
                segment.target = {s: v.float() for s, v in segment.target.items()}
            matcher = TrajectoryMatcher(model, MultilabelContrastiveLoss("WBCE"), STEPS, autocast=autocast)
            match_segments(matcher, synthetic, segments, 2, batches, batching=batching)
            grads[autocast, batching] = synthetic.images.grad.clone()
    full = grads[None, False]
    for batching in (False, True):
        error = ((grads[torch.bfloat16, batching] - full).abs().max() / full.abs().max()).item()
        assert 1e-5 < error < 0.1, (batching, error)  # bf16's rounding, and no more than that
    sequential, batched = grads[torch.bfloat16, False], grads[torch.bfloat16, True]
    assert ((sequential - batched).abs().max() / sequential.abs().max()).item() < 0.05
