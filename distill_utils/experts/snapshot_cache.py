"""Expert snapshots kept on the device while they fit, so each is copied from the host once.

Every iteration needs two flat snapshots per side (start and target). Read from the
memory-mapped expert files they cost a concatenation on the host and, on a GPU, a host-to-device
copy (about 320 MB per iteration at NFNet-L0 + BERT-base size). A phase only ever uses the
snapshots in ``[min_start, max_start + expert_epochs)`` of its experts, so they are usually few
enough to keep. The distiller cycles through the experts in turn, so once the budget is full the
rest are served from the host each time instead of evicting (any eviction order would throw away
what the next iterations need).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .trajectories import Expert

GIB = 1024 ** 3


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, asynchronous host-to-GPU copy (the snapshot is a fresh CPU tensor, so pinning is cheap)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def auto_budget_bytes(device: torch.device) -> int:
    """Half of the device memory that the run has not needed so far; nothing on the CPU, where the
    memory-mapped files already sit in the page cache."""
    if device.type != "cuda":
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    return max(0, (total - torch.cuda.max_memory_reserved(device)) // 2)


class SnapshotCache:
    """``get(expert, side, t)`` returns ``expert.flat(side, t)`` on ``device``, keeping it there while
    the total stays within the budget. A budget of None is automatic and keeps nothing until
    ``settle_budget()``, which the distiller calls after each iteration: the first call fixes it,
    once the matching's peak memory is known."""

    def __init__(self, device: torch.device, budget_bytes: Optional[int] = 0):
        self.device = device
        self.budget_bytes = budget_bytes
        self.kept: Dict[Tuple[str, str, int], torch.Tensor] = {}
        self.kept_bytes = 0
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_flag(cls, device: torch.device, expert_cache_gb: Optional[float]) -> "SnapshotCache":
        """``--expert_cache_gb``: a fixed amount, or None for the automatic budget."""
        return cls(device, None if expert_cache_gb is None else int(expert_cache_gb * GIB))

    def settle_budget(self) -> None:
        if self.budget_bytes is None:
            self.budget_bytes = auto_budget_bytes(self.device)

    def get(self, expert: Expert, side: str, t: int) -> torch.Tensor:
        key = (expert.name, side, t)
        tensor = self.kept.get(key)
        if tensor is not None:
            self.hits += 1
            return tensor
        self.misses += 1
        tensor = host_to_device(expert.flat(side, t), self.device)
        size = tensor.numel() * tensor.element_size()
        if self.budget_bytes is not None and self.kept_bytes + size <= self.budget_bytes:
            self.kept[key] = tensor
            self.kept_bytes += size
        return tensor

    def describe(self) -> str:
        budget = "undecided" if self.budget_bytes is None else f"{self.budget_bytes / GIB:.2f} GiB"
        return (f"{len(self.kept)} snapshots ({self.kept_bytes / GIB:.2f} GiB of {budget}) kept on {self.device}; "
                f"{self.hits} fetches served from there, {self.misses} from the expert files")
