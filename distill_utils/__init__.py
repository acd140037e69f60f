"""PTM-ST library code, one subpackage per part of the design.

``data``          datasets (BLIP/Karpathy JSON, image folders, built-in shapes), transforms, the text-feature cache
``experts``       expert training, the trajectory files, shortcut trajectories, the snapshot cache
``distillation``  the synthetic set, trajectory matching and its exact gradient, segments, starts, losses
``students``      evaluation students, retrieval benchmarks and metrics, coresets, the full-data row
``runtime``       run folders and fingerprints, checkpoints, atomic writes, locks, logs, errors, torchrun
``outputs``       the released-set export, plots, image grids, decoded captions
``pipeline``      the stages the quick start, the ablation and the studies share
``app``           the scripts: parsers and ``main``
"""
from . import _moved
from .distillation.losses import MultilabelContrastiveLoss
from .students.metrics import itm_eval

_moved.install()  # the flat paths of before (distill_utils.matching, ...) still import, with a warning

__all__ = ["MultilabelContrastiveLoss", "itm_eval"]
