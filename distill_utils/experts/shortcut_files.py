"""Shortcut-trajectory files: one expert's snapshots ``[start:end]`` replaced by per-layer straight
lines (see :mod:`distill_utils.experts.shortcut`), written in the authors' twin format beside the input, or in
the compact encoding (endpoints plus the pace table). ``convexify.py``
(:mod:`distill_utils.app.convexify`) runs them over a folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from . import trajectories
from .shortcut import convexify_trajectory, shortcut_betas

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def output_folder(normal_dir: Path, start: int, end: int, compact: bool) -> Path:
    return Path(normal_dir).parent / (f"convexified_{start}_{end}" + ("_compact" if compact else ""))


def parameter_names(meta: Optional[dict], side: str, count: int) -> list:
    recorded = (meta or {}).get(f"{side}_params")
    if recorded and len(recorded) == count:
        return [name for name, _ in recorded]
    return [f"param_{i}" for i in range(count)]


def load_slice_source(folder: Path, side: str, index: int, end: int) -> list:
    """The trajectories of one file, each long enough for the slice (ragged experts are named)."""
    path = trajectories.twin_path(folder, side, index)
    loaded = trajectories.load_trajectory_file(path)
    for trajectory in loaded:
        if len(trajectory) < end:
            raise trajectories.TrajectoryError(
                f"{path} holds a trajectory of {len(trajectory)} snapshots, shorter than --end {end}: move that "
                f"expert's pair out of {folder}, or pass --end {len(trajectory)} or less.")
    return loaded


def convexify_full(folder: Path, out: Path, index: int, start: int, end: int) -> int:
    shortcuts = {side: [convexify_trajectory(t, start, end) for t in load_slice_source(folder, side, index, end)]
                 for side in trajectories.SIDES}
    paths = trajectories.save_twin_files(shortcuts["image"], shortcuts["text"], out, index)
    return sum(path.stat().st_size for path in paths)


def convexify_compact(folder: Path, out: Path, index: int, start: int, end: int, dtype: torch.dtype,
                      meta: Optional[dict]) -> int:
    sides = {side: load_slice_source(folder, side, index, end) for side in trajectories.SIDES}
    records = []
    for image_traj, text_traj in zip(sides["image"], sides["text"]):
        record = {}
        for side, trajectory in (("image", image_traj), ("text", text_traj)):
            snapshots = list(trajectory[start:end])
            record[side] = {"names": parameter_names(meta, side, len(snapshots[0])), "first": snapshots[0],
                            "last": snapshots[-1], "beta": shortcut_betas(snapshots)}
        records.append(record)
    target = trajectories.compact_path(out, index)
    trajectories.save_compact(target, start, end, records, dtype)
    return target.stat().st_size


def full_encoding_bytes(folder: Path, index: int, start: int, end: int) -> int:
    """What the full shortcut of one expert takes (float32 tensors, payload only)."""
    total = 0
    for side in trajectories.SIDES:
        for trajectory in trajectories.load_trajectory_file(trajectories.twin_path(folder, side, index)):
            total += (end - start) * sum(t.numel() * t.element_size() for t in trajectory[0])
    return total
