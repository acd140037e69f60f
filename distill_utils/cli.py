"""Argument-parsing helpers shared by every script.

The authors' shell recipes pass boolean flags with values (``--disabled_wandb True``) while newer
habits write them bare (``--no_aug``); :func:`add_bool_flag` accepts both, strictly.
"""
from __future__ import annotations

import argparse
from typing import Sequence

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def strict_bool(text: str) -> bool:
    """Parse ``true``/``false`` (and 1/0, yes/no, on/off) case-insensitively; refuse anything else."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"expected true or false, got {text!r} (a bare flag means true)")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool = False,
                  help: str = "") -> None:
    """``--name`` alone means True; ``--name true|false`` sets it explicitly."""
    shown = "true" if default else "false"
    parser.add_argument(name, nargs="?", const=True, default=default, type=strict_bool,
                        metavar="true|false", help=f"{help} (default: {shown})".strip())


def check_per_phase_lists(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          names: Sequence[str], count: int, count_flag: str = "--subset_num") -> None:
    """Every per-phase list flag must have exactly ``count`` entries; exit with a clear error if not."""
    for name in names:
        values = getattr(args, name)
        if values is not None and len(values) != count:
            parser.error(
                f"--{name} has {len(values)} value(s) {values} but {count_flag} is {count}: give one "
                f"value per phase, e.g. --{name} {' '.join(str(values[0]) for _ in range(count))}")


def positive(kind=int):
    """argparse ``type=`` that accepts only values > 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind=int):
    """argparse ``type=`` that accepts only values >= 0."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse
