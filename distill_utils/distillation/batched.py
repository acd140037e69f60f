"""Several expert segments matched as one batched computation on one device.

K segments share the iteration's mini-batches and the synthetic set and differ in where their
students start and what they aim at, so each student step of all K is one call of a pure function
vectorised over the K parameter vectors with ``torch.func.vmap``:

* ``step_gradient(theta, images, texts, target, noise)``: g_i = grad_theta loss_i, by
  ``torch.func.grad`` of the closed-form step loss, with the step's dropout and blend given as inputs
  (:class:`~distill_utils.distillation.matching.SegmentNoise`), never drawn inside;
* pass 1 runs the K trajectories without any graph to the synthetic data and gives each segment's
  G, residual and adjoint weight v (the closed form of :mod:`distill_utils.distillation.matching`);
* pass 2 recomputes each step for all K with a graph to the batch's entries and back-propagates
  sum_k (2/D_k) v_k^T g_{k,i} into them in one backward.

A frozen image encoder's features are computed once for all K segments; a trainable encoder runs
inside the vectorised step. The result equals matching the segments one after another with the same
noise, to float rounding (the batched products sum in another order). Every random draw must be an
input, so an image encoder that draws its own dropout does not qualify; :func:`supports_batching`
says whether a matcher does.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch.func import functional_call, grad, vmap

from networks import SIDES, Blend

from .matching import (FrozenFeatureView, MatchResult, SegmentNoise, StepNoise, TrajectoryMatcher, denominators,
                       student_autocast)
from .synthetic import SyntheticSet


def draws_inside(module: torch.nn.Module) -> bool:
    """Whether running ``module`` in training mode draws random numbers (dropout, stochastic depth)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.dropout._DropoutNd) and layer.p > 0:
            return True
        if getattr(layer, "drop_prob", 0) > 0:  # timm's DropPath
            return True
    return False


def supports_batching(matcher: TrajectoryMatcher) -> bool:
    """Batching needs every random draw of a step given as an input: the heads' dropout is, so a
    frozen image encoder always qualifies, a trainable one where it draws nothing itself."""
    return matcher.frozen_features or not draws_inside(matcher.model.image_encoder)


def _stacked(noises: Sequence[StepNoise]) -> Dict:
    """The K segments' draws for one step as one pytree with K leading."""
    stacked: Dict = {"dropout": {side: torch.stack([n.dropout[side] for n in noises]) for side in noises[0].dropout}}
    if noises[0].blend is not None:
        stacked["partner"] = {s: torch.stack([n.blend.partner[s] for n in noises]) for s in SIDES}
        stacked["weight"] = {s: torch.stack([n.blend.weight[s] for n in noises]) for s in SIDES}
    return stacked


def batched_step_gradients(matcher: TrajectoryMatcher, on_features: bool) -> Callable:
    """g(theta, images, texts, target, noise) of a matcher's student step, vectorised over K parameter
    vectors and their draws (``theta`` and ``noise`` with K leading; the batch shared). A trainable
    NFNet standardises its weights inside its layers here, as timm runs them (the sequential matcher
    factors that out of its graphs; the gradients are the same)."""
    model, params, criterion, autocast = matcher.model, matcher.params, matcher.criterion, matcher.autocast

    def step_loss(theta: Dict[str, torch.Tensor], images, texts, target, noise: Dict) -> torch.Tensor:
        blend = Blend(noise["partner"], noise["weight"]) if "partner" in noise else None
        with student_autocast(autocast, images.device):
            logits = functional_call(model, params.as_dict(theta), (images, texts),
                                     {"blend": blend, "images_are_features": on_features,
                                      "dropout": noise["dropout"]})
        return criterion(logits.to(target.dtype), target)

    return vmap(grad(step_loss), in_dims=(0, None, None, None, 0))


def match_batched(matcher: TrajectoryMatcher, synthetic: SyntheticSet, starts: Sequence[Dict[str, torch.Tensor]],
                  targets: Sequence[Dict[str, torch.Tensor]], batches: Sequence[torch.Tensor],
                  noises: Sequence[SegmentNoise]) -> List[MatchResult]:
    """Match K segments at once; add the sum of their gradients into ``synthetic``'s ``.grad`` and
    return each segment's losses, in order."""
    if not supports_batching(matcher):
        raise ValueError("batched matching needs every random draw of a step given: this model's image "
                         "encoder draws its own (dropout or stochastic depth)")
    step_gradients = batched_step_gradients(matcher, matcher.frozen_features)
    if synthetic.images.grad is None:
        synthetic.images.grad = torch.zeros_like(synthetic.images)
    view = FrozenFeatureView(synthetic, matcher.model.image_encoder, batches) if matcher.frozen_features else synthetic
    if view.texts.grad is None:
        view.texts.grad = torch.zeros_like(view.texts)
    start = {s: torch.stack([segment[s] for segment in starts]) for s in SIDES}
    target = {s: torch.stack([segment[s] for segment in targets]) for s in SIDES}
    eta = {s: synthetic.step_size(s).detach() for s in SIDES}
    distance = {s: (start[s] - target[s]).square().sum(dim=1) for s in SIDES}
    denominator = denominators(distance, matcher.normalization)

    def draws():
        return (_stacked(step) for step in zip(*(noise.steps(batches, view.texts) for noise in noises)))

    # Pass 1: the K trajectories, no graph to the synthetic data.
    total = {s: torch.zeros_like(start[s]) for s in SIDES}
    theta = {s: start[s].clone() for s in SIDES}
    with torch.no_grad():
        for idx, noise in zip(batches, draws()):
            g = step_gradients(theta, view.images[idx], view.texts[idx], view.similarity_inputs(idx)[1], noise)
            theta = {s: theta[s] - eta[s] * g[s] for s in SIDES}
            for s in SIDES:
                total[s] += g[s]
        residual = {s: start[s] - eta[s] * total[s] - target[s] for s in SIDES}
        per_side = {s: residual[s].square().sum(dim=1) / denominator[s] for s in SIDES}
        for s in SIDES:
            grad_eta = ((2.0 / denominator[s]) * (residual[s] * -total[s]).sum(dim=1)).sum()
            parameter = synthetic.step_size(s)
            parameter.grad = grad_eta.reshape(()) if parameter.grad is None else parameter.grad + grad_eta
        weight = {s: (2.0 / denominator[s])[:, None] * (-eta[s] * residual[s]) for s in SIDES}

    # Pass 2: every step again for all K, with a graph to the batch's entries.
    theta = {s: start[s].clone() for s in SIDES}
    for idx, noise in zip(batches, draws()):
        images = view.images.detach()[idx].requires_grad_(True)
        texts = view.texts.detach()[idx].requires_grad_(True)
        sim_leaves, block = view.similarity_inputs(idx)
        g = step_gradients(theta, images, texts, block, noise)
        objective = sum((weight[s] * g[s]).sum() for s in SIDES)
        inputs = [images, texts, *sim_leaves]
        outputs = torch.autograd.grad(objective, inputs, allow_unused=True)
        outputs = [torch.zeros_like(x) if o is None else o for x, o in zip(inputs, outputs)]
        view.images.grad.index_add_(0, idx, outputs[0])
        view.texts.grad.index_add_(0, idx, outputs[1])
        if view.learn_similarity:
            view.similarity.scatter_grad(idx, outputs[2:])
        with torch.no_grad():
            theta = {s: theta[s] - eta[s] * g[s].detach() for s in SIDES}
    if view is not synthetic:
        view.finish()

    results = []
    for k in range(len(starts)):
        sides = {s: float(per_side[s][k]) for s in SIDES}
        results.append(MatchResult(sum(sides.values()), sides, {s: float(distance[s][k]) for s in SIDES}))
    return results
