"""One trajectory-matching iteration with exact gradients; with ``keep_graphs=0`` its memory is
constant in ``syn_steps``, and each kept graph adds one step's graph.

Objective (per side s, student started at the expert's snapshot theta0 and aimed at theta*):
    theta_{i+1} = theta_i - eta_s * g_i,   g_i = grad_theta loss_i(theta_i; X[B_i], Y[B_i], S[B_i, B_i]),
with each theta_i treated as a constant (no graph across steps), G = sum_i g_i and
    L = sum_s ||theta0 - eta_s G - theta*||^2 / ||theta0 - theta*||^2.
Normalising by the start-to-target distance makes early (long) and late (short) expert segments
weigh alike. Because theta_i is constant, dL/dX = sum_i (2/D) v^T dg_i/dX with
v = eta (theta* - theta0) + eta^2 G fixed once G is known: so a first pass without any graph
computes G, and a second pass recomputes each step with a graph (one at a time) and back-propagates
(2/D) v^T g_i into the batch's images, texts and similarity entries. Optionally the first pass
keeps the graphs of its first ``keep_graphs`` steps, trading memory for not recomputing them;
``keep_graphs="auto"`` times both policies on the first iterations (:class:`KeepChoice`) and keeps
graphs only where that was faster, then as many as the GPU's free memory allows (every one on the CPU).
Every step runs NFNet's standardised layers on their standardised weights (see
:mod:`networks.weight_standardization`), so the graphs differentiated twice hold no standardisation.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.func import functional_call

from networks import SIDES, Blend, DualEncoder
from networks.weight_standardization import FactoredStandardization

from .synthetic import SyntheticSet

log = logging.getLogger("ptmst.matching")


class MiniBatchSampler:
    """Successive chunks of a random permutation; reshuffled when too few indices remain."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    def next(self) -> torch.Tensor:
        if self._position + self.batch_size > len(self._order):
            self._order = torch.randperm(self.n, generator=self.generator)
            self._position = 0
        batch = self._order[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"order": self._order, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._order, self._position = state["order"], state["position"]


class StudentParameters:
    """Maps flat per-side vectors to the named parameter dict that ``functional_call`` takes."""

    def __init__(self, model: DualEncoder):
        self.names = {side: list(model.side_named_parameters(side)) for side in SIDES}
        self.shapes = {side: [p.shape for p in model.side_named_parameters(side).values()] for side in SIDES}
        self.sizes = {side: [s.numel() for s in self.shapes[side]] for side in SIDES}

    def as_dict(self, flat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        params = {}
        for side in SIDES:
            for name, piece, shape in zip(self.names[side], flat[side].split(self.sizes[side]), self.shapes[side]):
                params[name] = piece.view(shape)
        return params


def capture_rng_state(device: torch.device):
    """The generators a step's dropout draws from: the CPU's, plus ``device``'s own on a GPU."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def restore_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def draw_blend(batch_size: int, strength: float, device: torch.device) -> Optional[Blend]:
    """RepBlend's mixing for one student step: on each side a random permutation of the batch as
    partners and weights uniform in [0, ``strength``]; None when ``strength`` is 0. Drawn from the
    CPU's generator, whose state pass 2 restores with the dropout masks', so a recomputed step
    blends exactly as its first pass did."""
    if strength <= 0:
        return None
    partner = {side: torch.randperm(batch_size).to(device) for side in SIDES}
    weight = {side: (torch.rand(batch_size, dtype=torch.float64) * strength).to(device) for side in SIDES}
    return Blend(partner, weight)


@dataclass(frozen=True)
class StepNoise:
    """One student step's random draws, given instead of drawn inside the step: the blend (None:
    none) and, per side with a projection head, its dropout as 0 and 1/(1-p) entries."""
    blend: Optional[Blend]
    dropout: Dict[str, torch.Tensor]


@dataclass(frozen=True)
class SegmentNoise:
    """The draws of one segment's student steps, from a generator of its own seeded with ``seed``
    on the CPU: per step, in order, the blend's partners (a permutation per side), its weights
    (uniform in [0, ``blend``) per side), then each head's dropout (uniform draws, kept where >= p).
    The same seed gives the same draws on any device, on any process, and on every pass over the
    steps (:meth:`steps` starts afresh each time), so a step recomputed in the second pass, or
    computed batched with other segments, sees what its first pass saw."""
    seed: int
    blend: float
    dropout: Dict[str, Tuple[float, int]]  # side -> (p, width), as DualEncoder.dropout_layout gives

    def steps(self, batches: Sequence[torch.Tensor], like: torch.Tensor) -> Iterator[StepNoise]:
        """One :class:`StepNoise` per batch, on ``like``'s device and in its dtype."""
        generator = torch.Generator().manual_seed(self.seed)
        for idx in batches:
            size = len(idx)
            blend = None
            if self.blend > 0:
                partner = {s: torch.randperm(size, generator=generator).to(like.device) for s in SIDES}
                weight = {s: (torch.rand(size, dtype=torch.float64, generator=generator) * self.blend)
                          .to(like.device) for s in SIDES}
                blend = Blend(partner, weight)
            dropout = {}
            for side, (p, width) in self.dropout.items():
                if p > 0:
                    kept = torch.rand(size, width, generator=generator) >= p
                    dropout[side] = kept.to(device=like.device, dtype=like.dtype) * (1.0 / (1.0 - p))
                else:
                    dropout[side] = like.new_ones((size, width))
            yield StepNoise(blend, dropout)


def step_noises(noise: Optional[SegmentNoise], batches: Sequence[torch.Tensor],
                like: torch.Tensor) -> Iterator[Optional[StepNoise]]:
    """Each step's given draws, or None for every step where they are drawn inside (``noise`` None)."""
    return itertools.repeat(None) if noise is None else noise.steps(batches, like)


def student_autocast(dtype: Optional[torch.dtype], device: torch.device):
    """Autocast of a student step's forward (and so of its backward and double backward) to ``dtype``
    (None: off). The loss and everything outside the step stay in the parameters' precision."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# How the per-side distances are normalised: each by its own start-to-target distance (MTT, LoRS,
# PTM-ST, AMD), or both by their sum (RepBlend's symmetric projection matching).
NORMALIZATIONS = ("per_side", "joint")


def denominators(distance: Dict[str, torch.Tensor], normalization: str) -> Dict[str, torch.Tensor]:
    if normalization == "per_side":
        return dict(distance)
    if normalization == "joint":
        total = sum(distance.values())
        return {s: total for s in distance}
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


AUTO = "auto"
# Share of the GPU left unplanned when choosing how many graphs to keep: the allocator's cached blocks
# are not all usable for one large request, and cuDNN takes workspaces of its own.
MEMORY_MARGIN = 0.05


class CudaMemory:
    """The two figures ``keep_graphs="auto"`` plans with, in bytes, on one GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.cuda.get_device_properties(device).total_memory

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def available(self) -> int:
        """Free on the device plus held by the caching allocator but unused (so other processes count)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - self.allocated()


def memory_gauge(device: torch.device) -> Optional[CudaMemory]:
    """The GPU's gauge; None on the CPU, where ``auto`` keeps every graph (``syn_steps`` step graphs;
    the authors' iteration holds about one at a time)."""
    return CudaMemory(device) if device.type == "cuda" else None


def room_for_another_graph(graph_bytes: int, available: int, total: int) -> bool:
    """Whether one more kept graph of ``graph_bytes`` leaves room for a second of its size (the
    temporaries of building a graph and of back-propagating through one stay below that size) plus
    the margin."""
    return available >= 2 * graph_bytes + MEMORY_MARGIN * total


class GraphKeeping:
    """Which first-pass steps keep their graph for the second pass: always a prefix of the steps, at
    most ``keep_graphs`` of them, or under ``"auto"`` as long as ``memory`` (a GPU's gauge) leaves room
    for another graph of the size the first kept one measured (with no gauge, every step)."""

    def __init__(self, keep_graphs: Union[int, str], memory: Optional[CudaMemory] = None):
        self.limit = keep_graphs
        self.memory = memory
        self.kept = 0
        self.graph_bytes = 0  # what the first kept graph took, its gradients and the next theta included
        self._open = True
        self._before = 0

    def keep_next(self) -> bool:
        """Whether the next step keeps its graph; once one does not, no later one does."""
        self._open = self._open and self._room_for_one_more()
        if self._open and self.memory is not None and self.kept == 0:
            self._before = self.memory.allocated()
        return self._open

    def kept_one(self) -> None:
        """A step kept its graph (and the next theta exists): count it, measure the first."""
        if self.memory is not None and self.kept == 0:
            self.graph_bytes = self.memory.allocated() - self._before
        self.kept += 1

    def _room_for_one_more(self) -> bool:
        if self.limit != AUTO:
            return self.kept < self.limit
        # the first graph adds little to the peak, which holds one graph anyway (pass 2 frees the kept
        # ones before recomputing any other step); keeping it also measures what a graph takes
        if self.memory is None or self.kept == 0:
            return True
        return room_for_another_graph(self.graph_bytes, self.memory.available(), self.memory.total)


KEEP, RECOMPUTE = AUTO, 0  # the two policies ``auto`` chooses between


class TimedChoice:
    """A choice between two exact ways of computing the same thing, by timing both on the first
    ``trials`` uses: the faster by the best of its trials is kept from then on (a tie keeps the first).
    ``agree`` (several ranks) replaces the best times by their sum over the ranks, so every rank
    makes the same choice. Subclasses name the two (``OPTIONS``: how their times are saved, the
    choice each gives) and say how to log the outcome."""
    OPTIONS: Tuple[Tuple[str, object], Tuple[str, object]]

    def __init__(self, trials: int = 2, agree: Optional[Callable[[torch.Tensor], None]] = None):
        self.trials = trials
        self.agree = agree
        self.times: List[List[float]] = [[], []]
        self.choice: Optional[object] = None

    @property
    def deciding(self) -> bool:
        return self.choice is None

    def _observe(self, first_s: float, second_s: float) -> None:
        self.times[0].append(first_s)
        self.times[1].append(second_s)
        if len(self.times[0]) < self.trials:
            return
        best = torch.tensor([min(self.times[0]), min(self.times[1])], dtype=torch.float64)
        if self.agree is not None:
            self.agree(best)
        first, second = best.tolist()
        self.choice = self.OPTIONS[0][1] if first <= second else self.OPTIONS[1][1]
        self._log(first, second)

    def _log(self, first_s: float, second_s: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {**{f"{name}_s": list(t) for (name, _), t in zip(self.OPTIONS, self.times)}, "choice": self.choice}

    def load_state_dict(self, state: dict) -> None:
        self.times = [list(state[f"{name}_s"]) for name, _ in self.OPTIONS]
        self.choice = state["choice"]


class KeepChoice(TimedChoice):
    """How ``keep_graphs="auto"`` decides between keeping graphs (as memory allows) and recomputing
    every step: on each of its first ``trials`` matches it runs both on the same inputs, the
    recomputing one first and thrown away (generators and gradients restored), then the keeping one,
    whose result is used, so the trials leave the run as keeping would. Both are exact; with a
    trainable image encoder they differ in the last bits (a step's gradients are computed with and
    without a graph), which is why the choice is part of a run's resume state."""
    OPTIONS = (("keep", KEEP), ("recompute", RECOMPUTE))

    def observe(self, keep_s: float, recompute_s: float) -> None:
        self._observe(keep_s, recompute_s)

    @property
    def keep_s(self) -> List[float]:
        return self.times[0]

    def _log(self, keep_s: float, recompute_s: float) -> None:
        log.info("--keep_graphs auto: a matching took %.3g s keeping graphs and %.3g s recomputing them (best of "
                 "%d); %s from here", keep_s, recompute_s, self.trials,
                 "keeping them" if self.choice == KEEP else "recomputing them (--keep_graphs 0)")


def synchronized_clock(device: torch.device) -> float:
    """Seconds, after the device's queued work has finished (a GPU runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class MatchResult:
    loss: float
    per_side: Dict[str, float]
    start_distance: Dict[str, float]
    kept_graphs: int = 0  # first-pass graphs reused in the second pass
    graph_bytes: int = 0  # what keeping the first of them took, where ``auto`` measured it


@dataclass
class _StepGraph:
    """One student step computed with a graph back to the batch's synthetic entries."""
    idx: torch.Tensor
    theta: Dict[str, torch.Tensor]  # where the step started
    grads: Dict[str, torch.Tensor]  # with the graph, w.r.t. the standardised parameters phi
    inputs: List[torch.Tensor]  # images[idx], texts[idx], then the similarity leaves


class FrozenFeatureView:
    """The synthetic set as the steps of one iteration see it when the image encoder is frozen: its
    images replaced by their features, computed once with a graph to the images. The encoder's
    weights never move along a trajectory (only the projection heads do) and it holds no dropout or
    batch statistics, so every step would compute these same features again: doing it once and
    back-propagating the steps' summed feature gradients through the encoder once gives the same
    gradients with one encoder pass per image used, however often the steps draw it and whether or not
    a step's graph is recomputed (benchmarks/README.md has what that saves, and where it does not)."""

    def __init__(self, synthetic: SyntheticSet, encoder: torch.nn.Module, batches: Sequence[torch.Tensor]):
        self.synthetic = synthetic
        self.used = torch.unique(torch.cat(list(batches)))
        self._features = encoder(synthetic.images[self.used])  # graph to synthetic.images
        images = synthetic.images.new_zeros((len(synthetic), self._features.shape[1]))
        images[self.used] = self._features.detach()
        self.images = images.requires_grad_(True)
        self.images.grad = torch.zeros_like(self.images)
        self.texts, self.similarity = synthetic.texts, synthetic.similarity
        self.learn_similarity = synthetic.learn_similarity

    def similarity_inputs(self, idx):
        return self.synthetic.similarity_inputs(idx)

    def finish(self) -> None:
        """Back-propagate the features' accumulated gradient into the synthetic images."""
        self._features.backward(self.images.grad[self.used])


class TrajectoryMatcher:
    """Computes the matching loss and writes exact gradients into the synthetic set's ``.grad``.

    ``keep_graphs`` steps (the first ones) keep their first-pass graph for the second pass instead
    of recomputing it: no second forward and backward for those steps, one step's graph of memory
    each (benchmarks/README.md has what that saves, and where it does not). 0 gives memory constant
    in ``syn_steps``. ``"auto"`` first times keeping against recomputing (:class:`KeepChoice`, in
    ``keep_choice``) and, where keeping won, measures the first kept graph and keeps
    further ones while :func:`room_for_another_graph` holds for ``memory`` (by default the GPU's
    :class:`CudaMemory`; with no gauge, as on the CPU, every graph is kept).
    ``factor_standardization=False`` leaves NFNet's weight standardisation inside the graphs (as
    timm's layers run it; for comparison, since it only adds work). ``blend`` > 0 blends the
    representations of each step's batch (:func:`draw_blend`); ``normalization="joint"`` divides
    both sides' distances by the sum of their start-to-target distances.
    """

    def __init__(self, model: DualEncoder, criterion, syn_steps: int, keep_graphs: Union[int, str] = 0,
                 memory: Optional[CudaMemory] = None, factor_standardization: bool = True,
                 blend: float = 0.0, normalization: str = "per_side", frozen_features: bool = True,
                 autocast: Optional[torch.dtype] = None):
        if keep_graphs != AUTO and not (isinstance(keep_graphs, int) and keep_graphs >= 0):
            raise ValueError(f"keep_graphs must be a count >= 0 or {AUTO!r}, got {keep_graphs!r}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.blend = blend
        self.autocast = autocast
        self.normalization = normalization
        # a frozen image encoder runs once per iteration (FrozenFeatureView); False: once per step, as a
        # trainable one must (kept for the parity test)
        self.frozen_features = frozen_features and not model.image_trainable
        self._on_features = False
        self.model = model.train()
        self.params = StudentParameters(model)
        self.criterion = criterion
        self.syn_steps = syn_steps
        self.keep_graphs = keep_graphs
        self.keep_choice = KeepChoice() if keep_graphs == AUTO else None
        self.memory = memory
        layout = {s: list(zip(self.params.names[s], self.params.sizes[s])) for s in SIDES}
        self.standardization = FactoredStandardization(model, layout if factor_standardization else {})

    def _step_loss(self, flat: Dict[str, torch.Tensor], images, texts, target,
                   noise: Optional[StepNoise] = None) -> torch.Tensor:
        blend = draw_blend(len(images), self.blend, images.device) if noise is None else noise.blend
        with student_autocast(self.autocast, images.device):
            logits = functional_call(self.model, self.params.as_dict(flat), (images, texts),
                                     {"blend": blend, "images_are_features": self._on_features,
                                      "dropout": None if noise is None else noise.dropout})
        return self.criterion(logits.to(target.dtype), target)

    def _grads(self, flat_leaves: Dict[str, torch.Tensor], loss: torch.Tensor, create_graph: bool):
        grads = torch.autograd.grad(loss, [flat_leaves[s] for s in SIDES], create_graph=create_graph)
        return dict(zip(SIDES, grads))

    def _step_grads(self, theta, images, texts, target, create_graph: bool, noise: Optional[StepNoise] = None):
        """The step's gradients w.r.t. phi (theta with NFNet's weights standardised; the graph, if any,
        holds no standardisation) and g_i w.r.t. theta, without a graph."""
        theta = {s: theta[s].detach().requires_grad_(True) for s in SIDES}
        phi = {s: self.standardization.standardize(s, theta[s]) for s in SIDES}
        leaves = {s: phi[s].detach().requires_grad_(True) for s in SIDES}
        with self.standardization.given_weights():
            loss = self._step_loss(leaves, images, texts, target, noise)
        grads = self._grads(leaves, loss, create_graph)
        update = {s: grads[s].detach() if phi[s] is theta[s] else
                  torch.autograd.grad(phi[s], theta[s], grads[s].detach())[0] for s in SIDES}  # J^T grad_phi
        return grads, update

    def _plain_step(self, synthetic: SyntheticSet, theta, idx, noise=None) -> Dict[str, torch.Tensor]:
        """g_i with no graph to the synthetic data."""
        with torch.no_grad():
            block = synthetic.similarity_inputs(idx)[1]
        return self._step_grads(theta, synthetic.images.detach()[idx], synthetic.texts.detach()[idx], block,
                                create_graph=False, noise=noise)[1]

    def _graph_step(self, synthetic: SyntheticSet, theta, idx, noise=None):
        """Step i with a graph to the batch's entries, and g_i."""
        images = synthetic.images.detach()[idx].requires_grad_(True)
        texts = synthetic.texts.detach()[idx].requires_grad_(True)
        sim_leaves, block = synthetic.similarity_inputs(idx)
        grads, update = self._step_grads(theta, images, texts, block, create_graph=True, noise=noise)
        return _StepGraph(idx, theta, grads, [images, texts, *sim_leaves]), update

    def _push_back(self, step: _StepGraph, weight: Dict[str, torch.Tensor], synthetic: SyntheticSet) -> None:
        """Back-propagate (2/D) v^T g_i = (2/D) (J v)^T grad_phi into the entries of the synthetic set
        that step i used."""
        objective = sum((self.standardization.push_forward(s, step.theta[s], weight[s]) * step.grads[s]).sum()
                        for s in SIDES)
        outputs = torch.autograd.grad(objective, step.inputs, allow_unused=True)
        outputs = [torch.zeros_like(x) if g is None else g for x, g in zip(step.inputs, outputs)]
        synthetic.images.grad.index_add_(0, step.idx, outputs[0])
        synthetic.texts.grad.index_add_(0, step.idx, outputs[1])
        if synthetic.learn_similarity:
            synthetic.similarity.scatter_grad(step.idx, outputs[2:])

    def match(self, synthetic: SyntheticSet, start: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
              batches: Sequence[torch.Tensor], noise: Optional[SegmentNoise] = None) -> MatchResult:
        """Run ``len(batches)`` student steps from ``start``; accumulate gradients into ``synthetic``.
        ``noise``: the steps' dropout and blend draws (default: drawn from the global generators)."""
        choice = self.keep_choice
        if choice is None:
            return self._match_keeping(self.keep_graphs, synthetic, start, target, batches, noise)
        if not choice.deciding:
            return self._match_keeping(choice.choice, synthetic, start, target, batches, noise)
        return self._timed_trial(synthetic, start, target, batches, noise)

    def segment_noise(self, seed: int) -> SegmentNoise:
        """The draws of a segment seeded with ``seed``, for this matcher's model and blend."""
        return SegmentNoise(seed, self.blend, self.model.dropout_layout())

    def _timed_trial(self, synthetic: SyntheticSet, start, target, batches, noise) -> MatchResult:
        """One of :class:`KeepChoice`'s trials: recompute (thrown away), then keep (the result)."""
        device = synthetic.images.device
        grads = {name: p.grad for name, p in synthetic.named_parameters()}
        for p in synthetic.parameters():
            p.grad = None
        rng = capture_rng_state(device)
        began = synchronized_clock(device)
        self._match_keeping(RECOMPUTE, synthetic, start, target, batches, noise)
        recompute_s = synchronized_clock(device) - began
        restore_rng_state(rng, device)
        for name, p in synthetic.named_parameters():
            p.grad = grads[name]
        began = synchronized_clock(device)
        result = self._match_keeping(KEEP, synthetic, start, target, batches, noise)
        self.keep_choice.observe(synchronized_clock(device) - began, recompute_s)
        return result

    def _match_keeping(self, keep_graphs, synthetic: SyntheticSet, start, target, batches, noise) -> MatchResult:
        if synthetic.images.grad is None:
            synthetic.images.grad = torch.zeros_like(synthetic.images)
        if not self.frozen_features:
            return self._match(keep_graphs, synthetic, synthetic, start, target, batches, noise)
        view = FrozenFeatureView(synthetic, self.model.image_encoder, batches)
        self._on_features = True
        try:
            result = self._match(keep_graphs, view, synthetic, start, target, batches, noise)
        finally:
            self._on_features = False
        view.finish()
        return result

    def _match(self, keep_graphs, synthetic, owner: SyntheticSet, start, target, batches, noise) -> MatchResult:
        """The matching itself; ``synthetic`` is the set or its feature view, ``owner`` the set whose
        step sizes are learned."""
        device = owner.images.device
        eta = {side: owner.step_size(side).detach() for side in SIDES}
        distance = {s: (start[s] - target[s]).square().sum() for s in SIDES}
        denominator = denominators(distance, self.normalization)
        policy = GraphKeeping(keep_graphs, (self.memory or memory_gauge(device)) if keep_graphs == AUTO else None)

        # Pass 1: the trajectory; graphs only for the kept steps (a prefix of them); remember the RNG
        # state of each step that pass 2 will recompute.
        rng_states, kept, total = [], [], {s: torch.zeros_like(start[s]) for s in SIDES}
        theta = {s: start[s].clone() for s in SIDES}
        theta_after_kept = theta
        for idx, drawn in zip(batches, step_noises(noise, batches, synthetic.texts)):
            keeping = policy.keep_next()
            if keeping:
                step, grads = self._graph_step(synthetic, theta, idx, drawn)
                kept.append(step)
            else:
                rng_states.append(capture_rng_state(device))
                grads = self._plain_step(synthetic, theta, idx, drawn)
            with torch.no_grad():
                theta = {s: theta[s].detach() - eta[s] * grads[s] for s in SIDES}
                for s in SIDES:
                    total[s] += grads[s]
            if keeping:
                theta_after_kept = theta
                policy.kept_one()
        kept_count, graph_bytes = len(kept), policy.graph_bytes
        rng_after = capture_rng_state(device)

        residual = {s: start[s] - eta[s] * total[s] - target[s] for s in SIDES}
        per_side = {s: (residual[s].square().sum() / denominator[s]) for s in SIDES}
        # dL/deta = (2/D) residual . (-G); v = -eta * residual = eta (theta* - theta0) + eta^2 G
        for s in SIDES:
            grad_eta = (2.0 / denominator[s]) * (residual[s] * -total[s]).sum()
            parameter = owner.step_size(s)
            parameter.grad = grad_eta.reshape(()) if parameter.grad is None else parameter.grad + grad_eta
        weight = {s: (2.0 / denominator[s]) * (-eta[s] * residual[s]) for s in SIDES}

        # Pass 2: the kept graphs first, then recompute the other steps with a graph, one at a time,
        # under the same RNG (dropout masks).
        if synthetic.images.grad is None:
            synthetic.images.grad = torch.zeros_like(synthetic.images)
        if synthetic.texts.grad is None:
            synthetic.texts.grad = torch.zeros_like(synthetic.texts)
        for i in range(kept_count):
            step, kept[i] = kept[i], None  # frees each graph as soon as it is used
            self._push_back(step, weight, synthetic)
        theta = {s: theta_after_kept[s].detach().clone() for s in SIDES}
        redrawn = itertools.islice(step_noises(noise, batches, synthetic.texts), kept_count, None)
        for idx, state, drawn in zip(batches[kept_count:], rng_states, redrawn):
            restore_rng_state(state, device)
            step, grads = self._graph_step(synthetic, theta, idx, drawn)
            self._push_back(step, weight, synthetic)
            with torch.no_grad():
                theta = {s: theta[s] - eta[s] * grads[s] for s in SIDES}
        restore_rng_state(rng_after, device)

        loss_value = sum(per_side.values())
        return MatchResult(float(loss_value), {s: float(v) for s, v in per_side.items()},
                           {s: float(v) for s, v in distance.items()}, kept_count, graph_bytes)


def unrolled_autograd_loss(model: DualEncoder, criterion, synthetic: SyntheticSet, start, target,
                           batches: Sequence[torch.Tensor], blend: float = 0.0,
                           normalization: str = "per_side", noise: Optional[SegmentNoise] = None) -> torch.Tensor:
    """The same objective by plain autograd through the unrolled steps (theta_i detached between
    steps, as the objective defines; each step blends as :func:`draw_blend` draws, from the same
    generator, or as ``noise`` gives, with its dropout). Memory grows with the number of steps: for
    tests only."""
    params = StudentParameters(model)
    theta = {s: start[s].clone() for s in SIDES}
    total = {s: 0.0 for s in SIDES}
    for idx, given in zip(batches, step_noises(noise, batches, synthetic.texts)):
        leaves = {s: theta[s].detach().requires_grad_(True) for s in SIDES}
        mix = draw_blend(len(idx), blend, synthetic.images.device) if given is None else given.blend
        logits = functional_call(model, params.as_dict(leaves), (synthetic.images[idx], synthetic.texts[idx]),
                                 {"blend": mix, "dropout": None if given is None else given.dropout})
        loss = criterion(logits, synthetic.similarity.block(idx))
        grads = torch.autograd.grad(loss, [leaves[s] for s in SIDES], create_graph=True)
        for s, g in zip(SIDES, grads):
            total[s] = total[s] + g
            theta[s] = leaves[s].detach() - synthetic.step_size(s).detach() * g.detach()
    denominator = denominators({s: (start[s] - target[s]).square().sum() for s in SIDES}, normalization)
    loss = 0.0
    for s in SIDES:
        end = start[s] - synthetic.step_size(s) * total[s]
        loss = loss + (end - target[s]).square().sum() / denominator[s]
    return loss
