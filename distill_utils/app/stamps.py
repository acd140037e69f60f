"""``python -m distill_utils.app.stamps --source STAMPS``: the Tux Paint stamps as an image folder with
captions (``--dataset stamps`` reads it). ``bash sh/prepare_data.sh stamps`` fetches the package and
calls this; see :mod:`distill_utils.data.stamps` for what is converted and what is left out."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..data.stamps import convert
from ..runtime.errors import UsageError
from .cli import positive, run_script


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m distill_utils.app.stamps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the stamps folder: EXTRACTED/usr/share/tuxpaint/stamps")
    parser.add_argument("--out", default="./data/stamps/images", help="the image folder to write")
    parser.add_argument("--categories", nargs="+", default=None,
                        help="top-level stamp folders to take (default: all but symbols)")
    parser.add_argument("--max_size", type=positive(), default=256, help="longer side of the written images, in pixels")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.is_dir():
        raise UsageError(f"--source {source} is not a folder: pass EXTRACTED/usr/share/tuxpaint/stamps (after "
                         f"dpkg-deb -x tuxpaint-stamps-default_*.deb EXTRACTED) or /usr/share/tuxpaint/stamps")
    record = convert(source, Path(args.out), args.categories, args.max_size)
    print(f"stamps ready: {record['stamps']} captioned images in {args.out}")
    return record


if __name__ == "__main__":
    run_script(main)
