"""What the pipeline runs: the four scripts, reached through the entry points their caller hands over.

The pipeline's unit of work is one script run given by its flags (an expert set, a shortcut, a
distillation, an evaluation), the same unit a cluster job is. The stages never import a script; the
script that orchestrates them (the quick start, the ablation, a study) passes :class:`Scripts`, built by
:func:`distill_utils.app.cli.scripts`, with the parsers whose flags decide the fingerprints and the
app's conversions of parsed flags into data and models.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, FrozenSet, Optional, Sequence

from networks import DualEncoderConfig

from ..data import FolderSplit
from ..data.context import DataContext


@dataclass(frozen=True)
class Script:
    """One script's entry points: ``main(argv)``, its parser, and the parse that checks and completes the
    flags (``parse_args``, where the script has one). Looked up on ``module`` at each call, so that a
    replaced ``main`` (a test's monkeypatch, a notebook's wrapper) is the one the stages run."""
    module: Any

    def main(self, argv: Optional[Sequence[str]] = None):
        return self.module.main(argv)

    def parse_args(self, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
        parse = getattr(self.module, "parse_args", None)
        return parse(argv) if parse is not None else self.build_parser().parse_args(argv)

    def build_parser(self) -> argparse.ArgumentParser:
        return self.module.build_parser()

    def options(self) -> FrozenSet[str]:
        """Every option string the script's parser knows (``--flag`` and its aliases)."""
        return frozenset(option for action in self.build_parser()._actions for option in action.option_strings)


@dataclass(frozen=True)
class Scripts:
    """The scripts the stages run, and how parsed flags become a dataset and a model."""
    buffer: Script
    convexify: Script
    distill: Script
    evaluate: Script
    load_data: Callable[..., DataContext]                       # (flags, device, augment=, need_val=)
    model_config: Callable[[argparse.Namespace, int], DualEncoderConfig]
    folder_split: Callable[[argparse.Namespace], FolderSplit]
