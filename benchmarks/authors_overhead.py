"""Seconds the authors' iteration spends outside matching: rebuilding the student and the text encoder
from disk, and reading the whole expert file pair (see :mod:`benchmarks.authors_step`).

    python -m benchmarks.authors_overhead --config tiny
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from distill_utils.experts import trajectories
from networks import SIDES

from .authors_step import prepare_rebuild
from .common import median_seconds
from .distill_step import CONFIGS, make_inputs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    config, device = CONFIGS[args.config], torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        model_config, _ = make_inputs(config, Path(folder))
        rebuild = prepare_rebuild(model_config, config.text_dim, Path(folder) / "weights")
        parts = {"rebuild (dual encoder + text encoder from disk)": lambda: rebuild(device),
                 "expert file pair (whole files)": lambda: [torch.load(trajectories.twin_path(Path(folder), s, 0),
                                                                       weights_only=True) for s in SIDES]}
        result = {}
        for name, part in parts.items():
            result[name] = statistics.median(median_seconds(part, device, args.repeats))
            print(f"{name}: {result[name]:.4f} s (median of {args.repeats}, config {args.config}, CPU)")
    return result


if __name__ == "__main__":
    main()
