"""Several expert segments per iteration: the mean of their exact matching gradients.

An iteration with K segments matches K (expert, start) problems on the same synthetic mini-batches
and steps the set once with the mean of their gradients. What a phase draws from its generator per
iteration, in this order: for each segment j = 0..K-1 its expert (the phase's expert cycle) and then
its start epoch(s); then the ``syn_steps`` mini-batches; then, when K > 1, one seed per segment
(a single ``torch.randint`` of K values). With K = 1 the segment draws its dropout masks and blend
weights from the global generators, exactly as a run always did; with K > 1 segment j draws them
from a generator of its own seeded with its seed (:class:`~distill_utils.distillation.matching.SegmentNoise`),
so its gradient does not depend on which process or device computes it, what ran before it there,
or whether it ran batched with others.

A process matches its segments as one batched computation (:mod:`.batched`) or one after another
into fresh ``.grad`` tensors added in segment order, as ``batching`` asks (:class:`BatchingChoice`
times both) and the matcher allows; several processes (:mod:`.distributed`) add their sums with an all-reduce (one for
the gradients, one for the float64 losses). One after another, two processes of one segment each
add exactly what one process adds (a + b); batched, and in general, the result equals one
process's to float rounding.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from networks import SIDES

from ..runtime.distributed import SINGLE, Ranks, sum_across
from .batched import match_batched, supports_batching
from .matching import MatchResult, TimedChoice, TrajectoryMatcher, synchronized_clock
from .synthetic import SyntheticSet

log = logging.getLogger("ptmst.segments")

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


BATCHED, SEQUENTIAL = "vmap", "sequential"


class BatchingChoice(TimedChoice):
    """How ``--segment_batching auto`` decides between matching a process's segments one after another
    and batched: on each of its first ``trials`` iterations with more than one segment here (after
    ``--keep_graphs auto`` has made its own choice, which the sequential matching uses) it runs both
    on the same inputs, the batched one thrown away. Both give the same gradients to float rounding;
    the choice is part of a run's resume state."""
    OPTIONS = (("sequential", SEQUENTIAL), ("batched", BATCHED))

    def observe(self, batched_s: float, sequential_s: float) -> None:
        self._observe(sequential_s, batched_s)

    @property
    def sequential_s(self) -> List[float]:
        return self.times[0]

    @property
    def batched_s(self) -> List[float]:
        return self.times[1]

    def _log(self, sequential_s: float, batched_s: float) -> None:
        log.info("--segment_batching auto: the segments took %.3g s one after another and %.3g s batched (best of "
                 "%d); %s from here", sequential_s, batched_s, self.trials,
                 "batched" if self.choice == BATCHED else "one after another")


Batching = Union[bool, BatchingChoice]


def _match_own(matcher: TrajectoryMatcher, synthetic: SyntheticSet, own: Sequence[Segment],
               batches: Sequence[torch.Tensor], batching: Batching,
               totals: Dict[str, torch.Tensor]) -> List[MatchResult]:
    """This process's segments, batched or one after another; their summed gradients into ``totals``."""
    noises = [matcher.segment_noise(segment.seed) for segment in own]
    if len(own) == 1 or not supports_batching(matcher) or batching is False:
        return _match_sequential(matcher, synthetic, own, batches, noises, totals)
    if batching is True:
        return _match_batched(matcher, synthetic, own, batches, noises, totals)
    if batching.choice is not None:
        run = _match_batched if batching.choice == BATCHED else _match_sequential
        return run(matcher, synthetic, own, batches, noises, totals)
    if matcher.keep_choice is not None and matcher.keep_choice.deciding:  # its trials first, alone
        return _match_sequential(matcher, synthetic, own, batches, noises, totals)
    device = synthetic.images.device
    began = synchronized_clock(device)
    _match_batched(matcher, synthetic, own, batches, noises, {})
    batched_s = synchronized_clock(device) - began
    began = synchronized_clock(device)
    results = _match_sequential(matcher, synthetic, own, batches, noises, totals)
    batching.observe(batched_s, synchronized_clock(device) - began)
    return results


def _match_batched(matcher, synthetic, own, batches, noises, totals) -> List[MatchResult]:
    for p in synthetic.parameters():
        p.grad = None
    results = match_batched(matcher, synthetic, [s.start for s in own], [s.target for s in own], batches, noises)
    _add_grads(synthetic, totals)
    return results


def _match_sequential(matcher, synthetic, own, batches, noises, totals) -> List[MatchResult]:
    results = []
    device = synthetic.images.device
    for segment, noise in zip(own, noises):
        for p in synthetic.parameters():
            p.grad = None
        with seeded_generators(segment.seed, device):  # any draw besides the heads' (a trainable encoder's)
            results.append(matcher.match(synthetic, segment.start, segment.target, batches, noise))
        _add_grads(synthetic, totals)
    return results


def _add_grads(synthetic: SyntheticSet, totals: Dict[str, torch.Tensor]) -> None:
    for name, p in synthetic.named_parameters():
        if p.grad is not None:
            totals[name] = p.grad if name not in totals else totals[name].add_(p.grad)


def match_segments(matcher: TrajectoryMatcher, synthetic: SyntheticSet, own: Sequence[Segment], count: int,
                   batches: Sequence[torch.Tensor], ranks: Ranks = SINGLE,
                   timeout_s: Optional[float] = None, batching: Batching = False) -> MatchResult:
    """Match this process's segments ``own`` (its :func:`share_of` the iteration's ``count``, in
    segment order) and leave the mean of all ``count`` segments' gradients in ``synthetic``'s
    ``.grad``: the ranks add their sums. The result's losses are means over the ``count`` segments;
    ``kept_graphs`` is this process's mean (none when batched). ``batching``: True runs a process's
    segments as one computation (:mod:`.batched`) where the matcher allows it and it holds more than
    one, False one after another, a :class:`BatchingChoice` as it decides."""
    if len(own) * ranks.world != count:
        raise ValueError(f"{len(own)} segments on each of {ranks.world} ranks are not {count}")
    if count == 1:
        return matcher.match(synthetic, own[0].start, own[0].target, batches)
    names = [name for name, _ in synthetic.named_parameters()]
    totals: Dict[str, torch.Tensor] = {}
    losses = torch.zeros(1 + 2 * len(SIDES), dtype=torch.float64)
    results = _match_own(matcher, synthetic, own, batches, batching, totals)
    for result in results:
        losses += torch.tensor([result.loss, *(result.per_side[s] for s in SIDES),
                                *(result.start_distance[s] for s in SIDES)], dtype=torch.float64)
    summed = [totals[name] for name in names if name in totals]
    sum_across(summed, ranks, timeout_s)
    sum_across([losses], ranks, timeout_s)
    for name, p in synthetic.named_parameters():
        p.grad = totals[name].div_(count) if name in totals else None
    mean = (losses / count).tolist()
    sides = len(SIDES)
    return MatchResult(mean[0], dict(zip(SIDES, mean[1:1 + sides])), dict(zip(SIDES, mean[1 + sides:])),
                       round(sum(r.kept_graphs for r in results) / len(results)), results[-1].graph_bytes)
