"""Several expert segments per iteration: the mean of their exact matching gradients.

An iteration with K segments matches K (expert, start) problems on the same synthetic mini-batches
and steps the set once with the mean of their gradients. What a phase draws from its generator per
iteration, in this order: for each segment j = 0..K-1 its expert (the phase's expert cycle) and then
its start epoch(s); then the ``syn_steps`` mini-batches; then, when K > 1, one seed per segment
(a single ``torch.randint`` of K values). With K = 1 the segment draws its dropout masks and blend
weights from the global generators, exactly as a run always did; with K > 1 segment j draws them from
generators seeded with its own seed, so its gradient does not depend on which process computes it or
what ran before it there.

Each segment's gradient is computed into fresh ``.grad`` tensors and the segments of a process are
added in segment order; several processes (:mod:`.distributed`) add their sums with an all-reduce (one for the gradients, one for the float64 losses).
Two processes of one segment each therefore add exactly what one process adds (a + b), and in
general the result equals one process's to float rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from networks import SIDES

from .distributed import SINGLE, Ranks, sum_across
from .matching import MatchResult, TrajectoryMatcher
from .synthetic import SyntheticSet

SEED_RANGE = 2 ** 62


@dataclass
class Segment:
    """One expert segment to match: where the student starts, the snapshot it aims at, and the seed
    of its dropout and blend draws (None: the global generators, for a single segment)."""
    start: Dict[str, torch.Tensor]
    target: Dict[str, torch.Tensor]
    seed: Optional[int] = None


def draw_seeds(generator: torch.Generator, count: int) -> List[Optional[int]]:
    """The segments' seeds, drawn after the iteration's mini-batches; none for a single segment."""
    if count == 1:
        return [None]
    return torch.randint(SEED_RANGE, (count,), generator=generator).tolist()


@contextlib.contextmanager
def seeded_generators(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """The CPU's generator (and ``device``'s on a GPU) seeded with ``seed`` inside, restored after;
    nothing changes for ``seed`` None."""
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def match_segments(matcher: TrajectoryMatcher, synthetic: SyntheticSet, own: Sequence[Segment], count: int,
                   batches: Sequence[torch.Tensor], ranks: Ranks = SINGLE,
                   timeout_s: Optional[float] = None) -> MatchResult:
    """Match this process's segments ``own`` (its :func:`share_of` the iteration's ``count``, in
    segment order) and leave the mean of all ``count`` segments' gradients in ``synthetic``'s
    ``.grad``: the ranks add their sums. The result's losses are means over the ``count`` segments;
    ``kept_graphs`` is this process's mean."""
    if len(own) * ranks.world != count:
        raise ValueError(f"{len(own)} segments on each of {ranks.world} ranks are not {count}")
    if count == 1:
        return matcher.match(synthetic, own[0].start, own[0].target, batches)
    names = [name for name, _ in synthetic.named_parameters()]
    totals: Dict[str, torch.Tensor] = {}
    losses = torch.zeros(1 + 2 * len(SIDES), dtype=torch.float64)
    kept = []
    device = synthetic.images.device
    for segment in own:
        for p in synthetic.parameters():
            p.grad = None
        with seeded_generators(segment.seed, device):
            result = matcher.match(synthetic, segment.start, segment.target, batches)
        for name, p in synthetic.named_parameters():
            if p.grad is not None:
                totals[name] = p.grad if name not in totals else totals[name].add_(p.grad)
        losses += torch.tensor([result.loss, *(result.per_side[s] for s in SIDES),
                                *(result.start_distance[s] for s in SIDES)], dtype=torch.float64)
        kept.append(result.kept_graphs)
    summed = [totals[name] for name in names if name in totals]
    sum_across(summed, ranks, timeout_s)
    sum_across([losses], ranks, timeout_s)
    for name, p in synthetic.named_parameters():
        p.grad = totals[name].div_(count) if name in totals else None
    mean = (losses / count).tolist()
    sides = len(SIDES)
    return MatchResult(mean[0], dict(zip(SIDES, mean[1:1 + sides])), dict(zip(SIDES, mean[1 + sides:])),
                       round(sum(kept) / len(kept)), result.graph_bytes)
