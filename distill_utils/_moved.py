"""Old flat module paths (``distill_utils.matching`` ...) kept working for one release.

An import finder (installed by ``distill_utils/__init__.py``) answers for the old names only: it warns,
then the old name *is* the new module (``sys.modules`` entry and package attribute), so ``monkeypatch``
on either path reaches the same functions and nothing is imported twice. No file stands at the old
paths, so the package's folders show the architecture alone.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {  # old path -> new path; the finder and its test read this one table
    "distill_utils.trajectories": "distill_utils.experts.trajectories",
    "distill_utils.shortcut": "distill_utils.experts.shortcut",
    "distill_utils.shortcut_files": "distill_utils.experts.shortcut_files",
    "distill_utils.snapshot_cache": "distill_utils.experts.snapshot_cache",
    "distill_utils.matching": "distill_utils.distillation.matching",
    "distill_utils.segments": "distill_utils.distillation.segments",
    "distill_utils.batched": "distill_utils.distillation.batched",
    "distill_utils.synthetic": "distill_utils.distillation.synthetic",
    "distill_utils.starts": "distill_utils.distillation.starts",
    "distill_utils.prototypes": "distill_utils.distillation.prototypes",
    "distill_utils.losses": "distill_utils.distillation.losses",
    "distill_utils.evaluation": "distill_utils.students.evaluation",
    "distill_utils.retrieval": "distill_utils.students.retrieval",
    "distill_utils.metrics": "distill_utils.students.metrics",
    "distill_utils.coresets": "distill_utils.students.coresets",
    "distill_utils.full_data": "distill_utils.students.full_data",
    "distill_utils.runs": "distill_utils.runtime.runs",
    "distill_utils.checkpoint": "distill_utils.runtime.checkpoint",
    "distill_utils.atomic": "distill_utils.runtime.atomic",
    "distill_utils.claims": "distill_utils.runtime.claims",
    "distill_utils.runlog": "distill_utils.runtime.runlog",
    "distill_utils.errors": "distill_utils.runtime.errors",
    "distill_utils.progress": "distill_utils.runtime.progress",
    "distill_utils.speed": "distill_utils.runtime.speed",
    "distill_utils.distributed": "distill_utils.runtime.distributed",
    "distill_utils.export": "distill_utils.outputs.export",
    "distill_utils.plots": "distill_utils.outputs.plots",
    "distill_utils.visualize": "distill_utils.outputs.visualize",
    "distill_utils.text_cache": "distill_utils.data.text_cache",
}
# distill_utils.experts was the expert-training module; it is now the experts' package, whose
# __getattr__ still hands out that module's names (with the same warning)
EXPERT_TRAINING = ("ExpertOptim", "make_optimizer", "side_snapshot", "train_one_epoch")


def moved_message(old: str, new: str) -> str:
    return f"{old} moved to {new}; import it from there (the old path goes in the next release)"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module it moved to."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(moved_message(spec.name, new), DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


def old_expert_training_name(name: str):
    """``from distill_utils.experts import ExpertOptim`` (the module this package replaced), warned."""
    if name not in EXPERT_TRAINING:
        raise AttributeError(f"module 'distill_utils.experts' has no attribute {name!r}")
    warnings.warn(moved_message(f"distill_utils.experts.{name}", f"distill_utils.experts.training.{name}"),
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module("distill_utils.experts.training"), name)
