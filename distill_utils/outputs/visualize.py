"""Pictures and decoded captions of a synthetic set, for people to look at."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from ..data import denormalize
from ..runtime.atomic import atomic_write_text


def save_grid(images: torch.Tensor, path: Path, max_images: int = 100, min_side: int = 64) -> None:
    """A PNG grid of (up to ``max_images``) CLIP-normalised images, upscaled so small ones are visible."""
    images = denormalize(images[:max_images].detach().float().cpu())
    if images.shape[-1] < min_side:
        images = F.interpolate(images, size=(min_side, min_side), mode="nearest")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    save_image(images, temporary, nrow=max(1, math.ceil(math.sqrt(len(images)))), padding=2)
    temporary.replace(path)


def nearest_captions(texts: torch.Tensor, train_features: torch.Tensor, captions: Sequence[str]) -> List[str]:
    """For each synthetic text feature, the training caption whose feature is closest in cosine."""
    query = F.normalize(texts.detach().float().cpu(), dim=1)
    keys = F.normalize(train_features.float().cpu(), dim=1)
    best = torch.cat([(query[s:s + 256] @ keys.t()).argmax(dim=1) for s in range(0, len(query), 256)])
    return [captions[i] for i in best.tolist()]


def write_captions(path: Path, lines: Sequence[str]) -> None:
    atomic_write_text(Path(path), "".join(f"{i}\t{line}\n" for i, line in enumerate(lines)))
