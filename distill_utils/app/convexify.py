"""``convexify.py``: shortcut trajectories for every expert of a folder: each expert's snapshots
``[start:end]`` become per-layer straight lines between the endpoints, paced by the real accumulated
step lengths.

Full encoding: ``convexified_{S}_{E}/`` beside ``normal/``, one output file per input file (same
names), readable by the authors' code. Compact encoding (``--compact``):
``convexified_{S}_{E}_compact/shortcut_{n}.pt`` holding only the endpoints and the beta table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple


from ..runtime import claims
from ..experts import trajectories
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import writable_folder
from ..runtime.progress import progress
from ..runtime.runlog import setup_logging
from ..experts.shortcut_files import DTYPES, convexify_compact, convexify_full, full_encoding_bytes, output_folder

from .cli import add_bool_flag, non_negative

log = logging.getLogger("ptmst.convexify")


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


def check_output_folder(parser: argparse.ArgumentParser, normal: Path, out: Path) -> None:
    """Never write shortcuts over the experts they are made from, nor into another folder of experts."""
    if out.resolve() == normal.resolve():
        parser.error(f"--out_dir {out} is --normal_dir itself: the shortcuts would replace the experts they are made "
                     f"from. Leave --out_dir out (the default is the sibling folder convexified_S_E) or name another "
                     f"folder")
    try:
        meta = trajectories.read_meta(out) if out.is_dir() else None
    except trajectories.TrajectoryError:
        meta = None
    if meta is not None and "shortcut" not in meta and trajectories.twin_indices(out):
        parser.error(f"--out_dir {out} holds expert trajectories that buffer.py wrote (its meta.json records no "
                     f"shortcut): writing shortcuts there would replace them. Name an empty folder or leave --out_dir "
                     f"out")


def shortcut_files(out: Path, index: int, compact: bool) -> list:
    """The file(s) expert ``index``'s shortcut is written to."""
    if compact:
        return [trajectories.compact_path(out, index)]
    return [trajectories.twin_path(out, side, index) for side in trajectories.SIDES]


def made_after(outputs: Sequence[Path], sources: Sequence[Path]) -> bool:
    """Every output was written no earlier than the last source: a retrained expert (buffer.py run again
    into its folder) is newer than a shortcut made from its predecessor. A copy that reset the times makes
    the shortcut again, which gives the same file; it never keeps a stale one."""
    try:
        newest_source = max(path.stat().st_mtime_ns for path in sources)
        return min(path.stat().st_mtime_ns for path in outputs) >= newest_source
    except (OSError, ValueError):
        return False


def convexify_missing(args: argparse.Namespace, folder: Path, out: Path,
                      indices: Sequence[int]) -> Tuple[int, int, int]:
    """Write the shortcut of every expert whose output is not there yet or is older than the expert; (bytes
    written, skipped, full bytes)."""
    meta = trajectories.read_meta(folder)
    if meta is not None:
        atomic_write_text(out / trajectories.META_NAME, json.dumps(
            {**meta, "shortcut": {"start": args.start, "end": args.end, "compact": args.compact,
                               "source": str(folder.resolve())}}, indent=1, default=str))
    written = skipped = full_bytes = 0
    for index in progress(indices, desc=f"convexify [{args.start}:{args.end}] -> {out.name}", unit="expert"):
        shortcut = shortcut_files(out, index, args.compact)
        if not args.overwrite and all(path.is_file() for path in shortcut):
            if made_after(shortcut, [trajectories.twin_path(folder, side, index) for side in trajectories.SIDES]):
                skipped += 1
                continue
            log.info("expert %d in %s was rewritten after its shortcut in %s was made: making it again",
                     index, folder, out)
        if args.compact:
            written += convexify_compact(folder, out, index, args.start, args.end, DTYPES[args.dtype], meta)
            full_bytes += full_encoding_bytes(folder, index, args.start, args.end)
        else:
            written += convexify_full(folder, out, index, args.start, args.end)
    return written, skipped, full_bytes


def main(argv: Optional[Sequence[str]] = None) -> Path:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    indices = validate(parser, args)
    folder = Path(args.normal_dir)
    out = Path(args.out_dir) if args.out_dir else output_folder(folder, args.start, args.end, args.compact)
    check_output_folder(parser, folder, out)
    out = writable_folder(out, "--out_dir")
    # two callers on one workdir (two ablations, a study beside one) make each shortcut once: the second waits
    with claims.folder_lock(out, owner=f"convexify.py, PID {os.getpid()}", name=".convexify.lock"):
        written, skipped, full_bytes = convexify_missing(args, folder, out, indices)
    message = f"{len(indices) - skipped} expert(s) written to {out} ({written / 1e6:.2f} MB)"
    if skipped:
        message += f"; {skipped} already there, skipped (--overwrite redoes them)"
    if args.compact and full_bytes:
        message += f"; the full encoding would take {full_bytes / 1e6:.2f} MB: {full_bytes / written:.1f}x larger"
    print(message)
    return out
