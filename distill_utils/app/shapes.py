"""``python -m distill_utils.app.shapes``: write the built-in ``shapes`` dataset (PNG images and the three
JSON files in the Flickr layout) to ``--root``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from ..data.shapes import ShapesConfig, generate
from ..runtime.errors import writable_folder
from .cli import positive, run_script


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m distill_utils.app.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="./data/shapes", help="output folder (images and JSON files)")
    parser.add_argument("--num_train", type=positive(), default=1000, help="training images (5 captions each)")
    parser.add_argument("--num_val", type=positive(), default=100, help="validation images")
    parser.add_argument("--num_test", type=positive(), default=100, help="test images")
    parser.add_argument("--image_size", type=positive(), default=32, help="side of the square PNGs, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ShapesConfig(args.num_train, args.num_val, args.num_test, args.image_size, args.seed)
    root = generate(writable_folder(Path(args.root), "--root"), config)
    print(f"shapes dataset at {root}: {config.num_train} train / {config.num_val} val / {config.num_test} test images")
    return root


if __name__ == "__main__":
    run_script(main, interrupted="interrupted: run the same command again; the dataset counts as written only "
                                 "once shapes_meta.json exists, so a partial one is drawn again.")
