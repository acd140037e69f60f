"""Seconds per distillation iteration spent fetching the start and target snapshots.

    python -m benchmarks.trajectory_read [--image_encoder nfnet --text_dim 768 --snapshots 6] [--device cuda]

Measured at full NFNet-L0 / BERT-base size; with ``--device cuda`` every way also copies the
snapshots to the GPU, as a run there does. Four ways are timed on the same convexified expert
(random values, ``--snapshots`` snapshots, as ``convexify.py --start 0 --end 6`` writes by default):

* reference-style: load both twin files whole with ``torch.load`` every iteration, then flatten
  the two snapshots used;
* ours, twin files: the folder is opened once, files are memory-mapped and kept, and only the two
  snapshots used are read and flattened;
* ours, compact shortcut file: the same, rebuilding the snapshots from the endpoints and the
  per-layer positions;
* ours, kept on the device: ``distill_ptm-st.py --expert_cache_gb`` after the first pass over the
  experts, when the snapshots fit (the default on a GPU).

The files sit in the operating system's page cache after the first read in every case, so
the figures are what a long run sees, not cold-disk reads.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from distill_utils.experts import trajectories
from distill_utils.app import convexify
from distill_utils.experts.snapshot_cache import GIB, SnapshotCache
from networks import SIDES, DualEncoderConfig

from .common import median_seconds, summary, table, write_json


def write_normal_expert(folder: Path, image_encoder: str, text_dim: int, snapshots: int) -> int:
    """One buffer.py-style expert with ``snapshots`` snapshots per side; returns the matched parameter count."""
    model = DualEncoderConfig(image_encoder, text_dim, image_trainable=True).build(seed=0)
    generator = torch.Generator().manual_seed(0)
    trajectory = {side: [] for side in SIDES}
    for side in SIDES:
        base = [p.detach().clone() for p in model.side_parameters(side)]
        drift = [0.01 * torch.randn(p.shape, generator=generator) for p in base]
        trajectory[side] = [[b + t * d for b, d in zip(base, drift)] for t in range(snapshots)]
    folder.mkdir(parents=True, exist_ok=True)
    trajectories.write_expert(folder, 0, trajectory["image"], trajectory["text"])
    return sum(p.numel() for side in SIDES for p in model.side_parameters(side))


def reference_style_fetch(folder: Path, device: torch.device):
    def fetch(start: int, target: int):
        files = {side: torch.load(trajectories.twin_path(folder, side, 0), weights_only=True) for side in SIDES}
        return {side: (torch.cat([p.reshape(-1) for p in files[side][0][start]]).to(device),
                       torch.cat([p.reshape(-1) for p in files[side][0][target]]).to(device)) for side in SIDES}
    return fetch


def buffered_fetch(folder: Path, device: torch.device, budget_bytes: int = 0):
    expert = trajectories.TrajectoryBuffer(folder).experts()[0]
    snapshots = SnapshotCache(device, budget_bytes)

    def fetch(start: int, target: int):
        return {side: (snapshots.get(expert, side, start), snapshots.get(expert, side, target)) for side in SIDES}
    return fetch


def time_fetch(fetch, snapshots: int, gap: int, repeats: int, device: torch.device, seed: int = 0) -> list:
    """Random start snapshots, as the distiller draws them, after an untimed pass over all of them."""
    for start in range(snapshots - gap):
        fetch(start, start + gap)
    rng = random.Random(seed)
    starts = iter([rng.randrange(0, snapshots - gap) for _ in range(repeats)])  # drawn outside the timing

    def fetch_next():
        start = next(starts)
        fetch(start, start + gap)
    return median_seconds(fetch_next, device, repeats, warmup=0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_encoder", default="nfnet")
    parser.add_argument("--text_dim", type=int, default=768)
    parser.add_argument("--snapshots", type=int, default=6, help="snapshots per expert (a [0:6] shortcut holds 6)")
    parser.add_argument("--expert_epochs", type=int, default=2, help="distance from start to target snapshot")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="where the snapshots go (cuda: host-to-GPU copies included)")
    parser.add_argument("--workdir", help="where the expert files are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.expert_epochs >= args.snapshots:
        parser.error(f"--expert_epochs {args.expert_epochs} needs more than that many --snapshots ({args.snapshots})")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        normal = Path(work) / "normal"
        params = write_normal_expert(normal, args.image_encoder, args.text_dim, args.snapshots + 1)
        shortcut = ["--normal_dir", str(normal), "--start", "0", "--end", str(args.snapshots)]
        twins = convexify.main([*shortcut, "--out_dir", str(Path(work) / "shortcut")])
        compact = convexify.main([*shortcut, "--out_dir", str(Path(work) / "compact"), "--compact"])
        twin_bytes = sum(p.stat().st_size for p in twins.glob("*.pt"))
        compact_bytes = sum(p.stat().st_size for p in compact.glob("*.pt"))
        runs = {
            "reference-style (whole twin files)": (reference_style_fetch(twins, device), twin_bytes),
            "ours, twin files (memory-mapped)": (buffered_fetch(twins, device), twin_bytes),
            "ours, compact shortcut file": (buffered_fetch(compact, device), compact_bytes),
            "ours, kept on the device": (buffered_fetch(compact, device, budget_bytes=64 * GIB), compact_bytes),
        }
        results = {name: {**summary(time_fetch(fetch, args.snapshots, args.expert_epochs, args.repeats, device)),
                          "file_bytes": size} for name, (fetch, size) in runs.items()}
    base = results["reference-style (whole twin files)"]["median_s"]
    print(f"snapshot fetch per iteration: {args.image_encoder} + text width {args.text_dim}, "
          f"{params / 1e6:.1f}M matched parameters, {args.snapshots} snapshots per expert, to {device}")
    print(table([["way", "files on disk", "s/iteration (median)", "ratio"],
                 *[[name, f"{r['file_bytes'] / 1e6:.2f} MB", f"{r['median_s']:.3g}", f"{r['median_s'] / base:.3g}x"]
                   for name, r in results.items()]]))
    payload = {"image_encoder": args.image_encoder, "text_dim": args.text_dim, "parameters": params,
               "device": str(device),
               "snapshots": args.snapshots, "expert_epochs": args.expert_epochs, "results": results}
    print(f"written to {write_json(f'trajectory_read_{args.image_encoder}_{device.type}', payload)}")
    return payload


if __name__ == "__main__":
    main()
