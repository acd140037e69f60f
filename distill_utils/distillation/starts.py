"""Where a matching iteration starts on an expert's trajectory.

Synchronous (MTT-VL, LoRS, PTM-ST): both sides start at one snapshot s, drawn from the phase's
[min, max). Asynchronous (AMD): the image side and the text side draw their own start, each from
its own range; ``uniform`` gives both sides the phase's range, ``dynamic`` derives each side's
range from how fast that side's experts move per epoch (:func:`dynamic_ranges`).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

ASYNC_MODES = ("off", "uniform", "dynamic")
EPSILON = 1e-12  # keeps the ratio finite where the text side did not move at all


@dataclass(frozen=True)
class StartRanges:
    """Start snapshots per side, each [low, high)."""
    image: Tuple[int, int]
    text: Tuple[int, int]

    def side(self, side: str) -> Tuple[int, int]:
        return self.image if side == "image" else self.text


def mean_change_per_epoch(experts: Sequence, side: str, last: int,
                          read: Callable[[object, str, int], torch.Tensor]) -> List[float]:
    """||mean_i theta_i(t) - mean_i theta_i(t-1)|| for t = 1..last, the means over ``experts``
    (AMD's linear-kernel MMD between consecutive epochs). ``read(expert, side, t)`` gives a flat
    snapshot; each is read once."""
    previous, changes = None, []
    for t in range(last + 1):
        mean = sum(read(expert, side, t).double() for expert in experts) / len(experts)
        if previous is not None:
            changes.append(float((mean - previous).norm()))
        previous = mean
    return changes


def dynamic_ranges(image_change: Sequence[float], text_change: Sequence[float], low: int, high: int) -> StartRanges:
    """AMD's ranges from the per-epoch changes of both sides (entry t-1 is epoch t's change).

    With r_t = change_image(t) / (change_text(t) + eps) and m its median over the epochs, the image
    side's last start is R_V = min{t : r_t > m} (or the last epoch if r never exceeds m) and the
    text side's is R_L = max{t : r_t <= m}. Each range is then [low, R + 1) cut to the phase's
    [low, high), and never empty."""
    if len(image_change) != len(text_change) or not image_change:
        raise ValueError("dynamic start ranges need the same, non-zero number of epochs on both sides")
    ratio = [i / (t + EPSILON) for i, t in zip(image_change, text_change)]
    median = statistics.median(ratio)
    epochs = range(1, len(ratio) + 1)
    above = [t for t, r in zip(epochs, ratio) if r > median]
    image_last = min(above) if above else len(ratio)
    text_last = max(t for t, r in zip(epochs, ratio) if r <= median)

    def cut(last: int) -> Tuple[int, int]:
        return low, max(low + 1, min(high, last + 1))
    return StartRanges(cut(image_last), cut(text_last))


class StartSampler:
    """Draws each iteration's start snapshot per side from ``generator``. A synchronous sampler
    draws one number per iteration (as before asynchronous starts existed, so runs repeat)."""

    def __init__(self, ranges: StartRanges, asynchronous: bool, generator: torch.Generator):
        if not asynchronous and ranges.image != ranges.text:
            raise ValueError("synchronous starts need one range for both sides")
        self.ranges = ranges
        self.asynchronous = asynchronous
        self.generator = generator

    def draw(self) -> Dict[str, int]:
        if not self.asynchronous:
            low, high = self.ranges.image
            start = int(torch.randint(low, high, (1,), generator=self.generator))
            return {"image": start, "text": start}
        return {side: int(torch.randint(*self.ranges.side(side), (1,), generator=self.generator))
                for side in ("image", "text")}
