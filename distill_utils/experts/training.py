"""Training experts: the SGD they use, one epoch over the data, parameter snapshots. ``buffer.py``
(:mod:`distill_utils.app.buffer`) runs them and writes the trajectories; eval.py's full-data baseline
trains with the same pieces.

Differences from the reference: captions enter as cached frozen-text features (BERT is not run on
every batch, and never with dropout active).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from networks import DualEncoder

from ..runtime.progress import progress as progress_bar
from ..runtime.speed import SpeedOptions


def side_snapshot(model: DualEncoder) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    return ([p.detach().cpu().clone() for p in model.side_parameters("image")],
            [p.detach().cpu().clone() for p in model.side_parameters("text")])


@dataclass(frozen=True)
class ExpertOptim:
    """The SGD an expert (or the full-data baseline) trains with."""
    lr_img: float
    lr_txt: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    decay: bool = False  # x0.1 at epoch epochs // 2 + 1


def make_optimizer(model: DualEncoder, optim: ExpertOptim, speed: SpeedOptions = SpeedOptions()):
    optimizer = torch.optim.SGD([
        {"params": model.side_parameters("image"), "lr": optim.lr_img},
        {"params": model.side_parameters("text"), "lr": optim.lr_txt},
    ], lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay, fused=speed.sgd_fused_flag())
    milestones = [optim.epochs // 2 + 1] if optim.decay else []
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def train_one_epoch(model: DualEncoder, loader: DataLoader, text_features: torch.Tensor, optimizer,
                    criterion, device: torch.device, speed: SpeedOptions = SpeedOptions(), desc: str = "",
                    progress: bool = True, observe: Optional[Callable] = None) -> float:
    """One pass over ``loader``; ``observe(caption_index, logits)`` sees every batch's logits (the
    forgetting-event count of buffer.py)."""
    model.train()
    total, batches = 0.0, 0
    for images, caption_index in progress_bar(loader, desc=desc, unit="batch", leave=False, disable=not progress, inner=True):
        images = speed.prepare_images(images.to(device, non_blocking=True))
        texts = text_features[caption_index].to(device, non_blocking=True)
        with speed.autocast(device):
            logits = model(images, texts)
        if observe is not None:
            observe(caption_index, logits)
        loss = criterion(logits.float(), torch.eye(len(images), device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        batches += 1
    return total / max(batches, 1)
