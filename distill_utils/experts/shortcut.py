"""Shortcut (convexified) trajectories: the formula, free of any file handling.

For a trajectory slice with snapshots 0..K and every parameter tensor l, the step lengths
n[p, l] = ||theta[p+1, l] - theta[p, l]||_2 give a per-layer pace
beta_l(t) = sum_{p<t} n[p, l] / sum_{p<K} n[p, l]  (0 where the layer never moves), and
snapshot t becomes (1 - beta_l(t)) * theta[0, l] + beta_l(t) * theta[K, l]: each layer travels the
straight line between its endpoints at the pace of its real accumulated steps.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

Snapshot = List[torch.Tensor]


def step_lengths(snapshots: Sequence[Snapshot]) -> torch.Tensor:
    """(K, L) float64 tensor of ||theta[p+1, l] - theta[p, l]||_2."""
    rows = []
    for before, after in zip(snapshots[:-1], snapshots[1:]):
        rows.append(torch.stack([(b.double() - a.double()).norm() for a, b in zip(before, after)]))
    return torch.stack(rows)


def shortcut_betas(snapshots: Sequence[Snapshot]) -> torch.Tensor:
    """(K + 1, L) float32 table of beta_l(t); row 0 is 0 and row K is 1 (0 for a layer that never moves)."""
    if len(snapshots) < 2:
        raise ValueError("a shortcut needs at least two snapshots")
    lengths = step_lengths(snapshots)
    cumulative = torch.cat([torch.zeros(1, lengths.shape[1], dtype=torch.float64), lengths.cumsum(dim=0)])
    total = cumulative[-1]
    betas = torch.where(total > 0, cumulative / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(cumulative))
    return betas.float()


def interpolate(first: Sequence[torch.Tensor], last: Sequence[torch.Tensor], betas_t: torch.Tensor) -> Snapshot:
    """One shortcut snapshot: (1 - beta_l) * first_l + beta_l * last_l, in float32.

    The single place this arithmetic happens, so a compact file and a full file agree bit for bit."""
    out = []
    for a, b, beta in zip(first, last, betas_t.float()):
        a32, b32 = a.float(), b.float()
        out.append((1 - beta) * a32 + beta * b32)
    return out


def shortcut_snapshot(first: Sequence[torch.Tensor], last: Sequence[torch.Tensor], betas: torch.Tensor,
                      t: int) -> Snapshot:
    """Snapshot ``t`` of a shortcut trajectory; the endpoints are returned exactly (copied)."""
    count = betas.shape[0]
    if not 0 <= t < count:
        raise IndexError(f"snapshot {t} out of range for a shortcut with {count} snapshots")
    if t == 0:
        return [a.float().clone() for a in first]
    if t == count - 1:
        return [b.float().clone() for b in last]
    return interpolate(first, last, betas[t])


def convexify_trajectory(trajectory: Sequence[Snapshot], start: int, end: int) -> List[Snapshot]:
    """The full shortcut of ``trajectory[start:end]`` (Python slice semantics)."""
    snapshots = list(trajectory[start:end])
    betas = shortcut_betas(snapshots)
    first, last = snapshots[0], snapshots[-1]
    out = [shortcut_snapshot(first, last, betas, t) for t in range(len(snapshots))]
    # Endpoints keep the input's exact tensors (and dtype), as the reference copies them.
    out[0] = [a.clone() for a in first]
    out[-1] = [b.clone() for b in last]
    return out
