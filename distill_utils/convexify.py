"""Shortcut trajectories (``convexify.py``): replace each expert's snapshots ``[start:end]`` by
per-layer straight lines between the endpoints, paced by the real accumulated step lengths.

Full encoding: ``convexified_{S}_{E}/`` beside ``normal/``, one output file per input file (same
names), readable by the authors' code. Compact encoding (``--compact``):
``convexified_{S}_{E}_compact/shortcut_{n}.pt`` holding only the endpoints and the beta table.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import trajectories
from .atomic import atomic_write_text
from .cli import add_bool_flag, non_negative
from .errors import writable_folder
from .progress import progress
from .runlog import setup_logging
from .shortcut import convexify_trajectory, shortcut_betas

log = logging.getLogger("ptmst.convexify")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convexify.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python convexify.py --start 0 --end 6 --normal_dir ./buffer/flickr/nfnet_bert/InfoNCE/normal")
    parser.add_argument("--normal_dir", required=True, help="folder of the expert trajectories (…/normal)")
    parser.add_argument("--start", type=non_negative(), required=True, help="first snapshot kept (slice start)")
    parser.add_argument("--end", type=non_negative(), required=True, help="slice end (exclusive), <= snapshots")
    add_bool_flag(parser, "--compact", help="write endpoints + beta table only (convexified_S_E_compact/)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="storage precision of the compact endpoints (float16 halves the size again)")
    add_bool_flag(parser, "--overwrite", help="redo files that already exist in the output folder")
    parser.add_argument("--out_dir", default=None, help="output folder (default: the sibling convexified_S_E[_compact])")
    return parser


def output_folder(normal_dir: Path, start: int, end: int, compact: bool) -> Path:
    return Path(normal_dir).parent / (f"convexified_{start}_{end}" + ("_compact" if compact else ""))


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """Check the folder and the slice before any heavy work; return the expert indices."""
    folder = Path(args.normal_dir)
    if args.dtype != "float32" and not args.compact:
        parser.error("--dtype applies to --compact output only; the full encoding keeps the experts' dtype")
    try:
        indices = trajectories.twin_indices(folder) if folder.is_dir() else None
    except trajectories.TrajectoryError as error:
        parser.error(str(error))
    if not indices:
        parser.error(f"--normal_dir {folder} {'does not exist' if indices is None else 'holds no img/txt_replay_buffer_n.pt pairs'}: "
                     f"point it at the 'normal' folder buffer.py wrote")
    if args.start >= args.end - 1:
        parser.error(f"--start {args.start} --end {args.end}: the slice [start:end] needs at least two snapshots "
                     f"(start < end - 1), e.g. --start 0 --end 6")
    first = trajectories.load_trajectory_file(trajectories.twin_path(folder, "image", indices[0]))
    count = min(len(t) for t in first)
    if args.end > count:
        parser.error(f"--end {args.end} is beyond the trajectory: {trajectories.twin_path(folder, 'image', indices[0]).name} "
                     f"has {count} snapshots (0..{count - 1}), so --end can be at most {count}")
    return indices


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


def main(argv: Optional[Sequence[str]] = None) -> Path:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    indices = validate(parser, args)
    folder = Path(args.normal_dir)
    out = writable_folder(Path(args.out_dir) if args.out_dir else output_folder(folder, args.start, args.end,
                                                                                args.compact), "--out_dir")
    meta = trajectories.read_meta(folder)
    if meta is not None:
        atomic_write_text(out / trajectories.META_NAME, json.dumps(
            {**meta, "shortcut": {"start": args.start, "end": args.end, "compact": args.compact}}, indent=1, default=str))
    written = skipped = full_bytes = 0
    for index in progress(indices, desc=f"convexify [{args.start}:{args.end}] -> {out.name}", unit="expert"):
        done = (trajectories.compact_path(out, index).is_file() if args.compact else
                all(trajectories.twin_path(out, side, index).is_file() for side in trajectories.SIDES))
        if done and not args.overwrite:
            skipped += 1
            continue
        if args.compact:
            written += convexify_compact(folder, out, index, args.start, args.end, DTYPES[args.dtype], meta)
            full_bytes += full_encoding_bytes(folder, index, args.start, args.end)
        else:
            written += convexify_full(folder, out, index, args.start, args.end)
    message = f"{len(indices) - skipped} expert(s) written to {out} ({written / 1e6:.2f} MB)"
    if skipped:
        message += f"; {skipped} already there, skipped (--overwrite redoes them)"
    if args.compact and full_bytes:
        message += f"; the full encoding would take {full_bytes / 1e6:.2f} MB: {full_bytes / written:.1f}x larger"
    print(message)
    return out
