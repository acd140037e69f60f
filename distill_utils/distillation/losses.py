"""Contrastive losses between a logit matrix ``z`` (B x B) and a soft target matrix ``S`` (B x B).

``MultilabelContrastiveLoss(loss_type)(logits, target)`` keeps the reference's call shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def infonce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (_soft_cross_entropy(logits, target) + _soft_cross_entropy(logits.t(), target.t()))


def cwcl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # the reference's denominators: each row's target sum + 1e-6
    rows = target / (target.sum(dim=1, keepdim=True) + _EPS)
    cols = target.t() / (target.t().sum(dim=1, keepdim=True) + _EPS)
    return 0.5 * (_soft_cross_entropy(logits, rows) + _soft_cross_entropy(logits.t(), cols))


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Positives (S > 0.5) and negatives are averaged separately so the n-1 negatives per row
    do not drown the single positive. Each sum is divided by its count + 1e-6, as the reference does."""
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p + _EPS) + (1 - target) * torch.log(1 - p + _EPS))
    pos = (target > 0.5).to(bce.dtype)
    neg = 1 - pos
    pos_mean = (bce * pos).sum() / (pos.sum() + _EPS)
    neg_mean = (bce * neg).sum() / (neg.sum() + _EPS)
    return 0.5 * (pos_mean + neg_mean)


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all entries of P (log P - log Q), rows and columns; written out because
    ``F.kl_div(reduction="mean")`` is slated to change meaning."""
    def one_direction(z, s):
        log_p = F.log_softmax(10.0 * s, dim=1)
        return (log_p.exp() * (log_p - F.log_softmax(z, dim=1))).mean()
    return 0.5 * (one_direction(logits, target) + one_direction(logits.t(), target.t()))


def mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(logits), target)


LOSSES = {
    "InfoNCE": infonce, "NCE": infonce,
    "WBCE": balanced_bce, "BalanceBCE": balanced_bce,
    "BCE": bce, "KL": kl, "MSE": mse, "CWCL": cwcl,
}


class MultilabelContrastiveLoss(nn.Module):
    """``criterion(logits, target_matrix)`` for any name in :data:`LOSSES`."""

    def __init__(self, loss_type: str = "InfoNCE"):
        super().__init__()
        if loss_type not in LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSSES)}")
        self.loss_type = loss_type
        self._fn = LOSSES[loss_type]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._fn(logits, target.to(logits.dtype))
