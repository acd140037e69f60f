"""A dataset as the stages use it: the three splits and the frozen text features of their captions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .datasets import RetrievalEvalDataset, RetrievalTrainDataset


@dataclass
class DataContext:
    train: RetrievalTrainDataset
    val: RetrievalEvalDataset
    test: RetrievalEvalDataset
    train_text: torch.Tensor  # (train captions, text_dim)
    test_text: torch.Tensor   # (test captions, text_dim)
    val_text: Optional[torch.Tensor]

    @property
    def text_dim(self) -> int:
        return self.train_text.shape[1]
