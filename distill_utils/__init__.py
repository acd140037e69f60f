"""PTM-ST library code: data, losses, metrics, trajectories, distillation and evaluation."""
from .losses import MultilabelContrastiveLoss
from .metrics import itm_eval

__all__ = ["MultilabelContrastiveLoss", "itm_eval"]
