"""Prototype initialisation (AMD's semantic-aware prototype mining): k-means on the joint
image/text features of the training pairs, with as many centres as synthetic pairs, and for each
centre the real pair nearest to it. A pair is used once: a centre whose nearest pair another centre
already took gets its nearest free one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def joint_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[unit image feature ; unit text feature] per pair, so neither modality outweighs the other
    through its scale."""
    return torch.cat([F.normalize(image_features.double(), dim=1), F.normalize(text_features.double(), dim=1)], dim=1)


def squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances."""
    return (points.square().sum(1, keepdim=True) - 2 * points @ centres.t() + centres.square().sum(1)).clamp_min(0)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared
    distance to the nearest centre so far."""
    first = int(torch.randint(len(points), (1,), generator=generator))
    centres = [points[first]]
    nearest = squared_distances(points, points[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = int(torch.multinomial(weights.float(), 1, generator=generator))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, squared_distances(points, points[pick:pick + 1]).squeeze(1))
    return torch.stack(centres)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Lloyd's iterations from k-means++ seeds until no assignment changes; returns the (k, d) centres.
    An empty cluster keeps its previous centre."""
    if not 1 <= k <= len(points):
        raise ValueError(f"k-means needs 1 <= k <= {len(points)} points, got k={k}")
    centres = kmeans_plus_plus(points, k, generator)
    assignment: Optional[torch.Tensor] = None
    for _ in range(iterations):
        new = squared_distances(points, centres).argmin(dim=1)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def nearest_distinct(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """For each centre in order, the index of the nearest point no earlier centre took."""
    distances = squared_distances(points, centres)
    taken = torch.zeros(len(points), dtype=torch.bool)
    picks = []
    for c in range(len(centres)):
        column = distances[:, c].masked_fill(taken, float("inf"))
        pick = int(column.argmin())
        taken[pick] = True
        picks.append(pick)
    return torch.tensor(picks, dtype=torch.long)


def prototype_pairs(image_features: torch.Tensor, text_features: torch.Tensor, k: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``k`` training pairs nearest the k-means centres of their joint features."""
    points = joint_features(image_features, text_features)
    return nearest_distinct(points, kmeans(points, k, generator))
