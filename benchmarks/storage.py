"""Bytes per expert on disk: normal trajectory, shortcut (full) and compact shortcut encodings.

    python -m benchmarks.storage [--image_encoder nfnet --text_dim 768 --train_epochs 10 --start 0 --end 6]

Sizes for NFNet-L0 are computed from the model's parameter shapes (float32 payload); the same
encodings are also written for a tiny model and measured on disk, to check the arithmetic.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


from distill_utils.experts import trajectories
from distill_utils.app import convexify
from networks import SIDES, DualEncoderConfig

from .common import table, write_json


def side_bytes(model, dtype_bytes: int = 4) -> int:
    return sum(p.numel() for side in SIDES for p in model.side_parameters(side)) * dtype_bytes


def encodings(params_bytes: int, layers: int, snapshots: int, shortcut: int, half: bool = False) -> dict:
    beta = shortcut * layers * 4
    return {"normal": snapshots * params_bytes, "shortcut": shortcut * params_bytes,
            "compact_float32": 2 * params_bytes + beta, "compact_float16": params_bytes + beta}


def measured_tiny(start: int, end: int, epochs: int) -> dict:
    model = DualEncoderConfig("convnet_tiny", 32, image_trainable=True).build(seed=0)
    with tempfile.TemporaryDirectory() as folder:
        normal = Path(folder) / "normal"
        normal.mkdir()
        snapshots = {s: [[p.detach() + 0.01 * t for p in model.side_parameters(s)] for t in range(epochs + 1)]
                     for s in SIDES}
        trajectories.write_expert(normal, 0, snapshots["image"], snapshots["text"])
        sizes = {"normal": sum(p.stat().st_size for p in normal.glob("*.pt"))}
        for name, extra in (("shortcut", []), ("compact_float32", ["--compact"]),
                            ("compact_float16", ["--compact", "--dtype", "float16"])):
            out = convexify.main(["--normal_dir", str(normal), "--start", str(start), "--end", str(end),
                                  "--out_dir", str(Path(folder) / name), *extra])
            sizes[name] = sum(p.stat().st_size for p in out.glob("*.pt"))
    layers = sum(len(model.side_parameters(s)) for s in SIDES)
    return {"measured": sizes, "computed": encodings(side_bytes(model), layers, epochs + 1, end - start)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_encoder", default="nfnet")
    parser.add_argument("--text_dim", type=int, default=768)
    parser.add_argument("--train_epochs", type=int, default=10)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=6)
    args = parser.parse_args(argv)
    model = DualEncoderConfig(args.image_encoder, args.text_dim, image_trainable=True).build(seed=0)
    layers = sum(len(model.side_parameters(s)) for s in SIDES)
    big = encodings(side_bytes(model), layers, args.train_epochs + 1, args.end - args.start)
    tiny = measured_tiny(args.start, args.end, args.train_epochs)
    rows = [["encoding", f"{args.image_encoder} (computed)", "ratio to shortcut", "tiny model (on disk)"]]
    for name in ("normal", "shortcut", "compact_float32", "compact_float16"):
        rows.append([name, f"{big[name] / 1e6:.1f} MB", f"{big['shortcut'] / big[name]:.2f}x smaller" if name.startswith("compact") else "",
                     f"{tiny['measured'][name] / 1e3:.1f} kB"])
    params = side_bytes(model) // 4
    print(f"bytes per expert: {params / 1e6:.1f}M matched parameters, {args.train_epochs + 1} snapshots, shortcut [{args.start}:{args.end}]")
    print(table(rows))
    payload = {"model": args.image_encoder, "parameters": params, "layers": layers, "computed": big, "tiny": tiny}
    print(f"written to {write_json('storage', payload)}")
    return payload


if __name__ == "__main__":
    main()
