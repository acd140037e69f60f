"""The projection head, parameter order identical to the reference so trajectory files interoperate."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
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

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``keep``: the dropout given, as a (B, projection_dim) tensor of 0 and 1/(1-p) (see
        :meth:`dropout_layout`), instead of drawn here; what a batched computation over several
        parameter sets needs, where no draw may happen inside. With ``keep`` the LayerNorm's affine
        terms are applied after the normalisation instead of inside it: under ``torch.func.vmap``
        of ``torch.func.grad`` with batched affine terms, the fused kernel's gradient of the
        gradient with respect to its input is wrong (torch 2.14; tests/test_batched.py checks the
        split one against autograd)."""
        projected = self.projection(x)
        x = self.fc(self.gelu(projected))
        if keep is None:
            return self.layer_norm(self.dropout(x) + projected)
        norm = self.layer_norm
        return F.layer_norm(x * keep + projected, norm.normalized_shape, eps=norm.eps) * norm.weight + norm.bias

    def dropout_layout(self) -> Tuple[float, int]:
        """The dropout probability and the width of the activations it applies to."""
        return self.dropout.p, self.fc.out_features
