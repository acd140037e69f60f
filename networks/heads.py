"""The projection head, parameter order identical to the reference so trajectory files interoperate."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """projection -> GELU -> fc -> dropout, plus the projection as a residual, then LayerNorm.

    Parameters in order: projection.weight, projection.bias, fc.weight, fc.bias,
    layer_norm.weight, layer_norm.bias.
    """

    def __init__(self, embedding_dim: int, projection_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(embedding_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)
