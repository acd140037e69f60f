"""``python -m distill_utils.app.openclipart --source PNG_FOLDER``: Debian's Open Clip Art as an image folder
with captions (``--dataset openclipart`` reads it). ``bash sh/prepare_data.sh openclipart`` fetches the
packages and calls this; :mod:`distill_utils.data.openclipart` says how captions are made and what is left out."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..data.openclipart import convert
from ..runtime.errors import UsageError
from .cli import positive, run_script

DEFAULT_WORDS = Path("/usr/share/dict/american-english")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m distill_utils.app.openclipart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the clip art folder: EXTRACTED/usr/share/openclipart/png")
    parser.add_argument("--out", default="./data/openclipart/images", help="the image folder to write")
    parser.add_argument("--words", default=None,
                        help="English word list, one word per line (default: /usr/share/dict/american-english when "
                             "present, else MiniLM's vocabulary)")
    parser.add_argument("--max_size", type=positive(), default=256, help="longer side of the written images, in pixels")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.is_dir():
        raise UsageError(f"--source {source} is not a folder: pass EXTRACTED/usr/share/openclipart/png (after "
                         f"dpkg-deb -x openclipart-png_*.deb EXTRACTED) or /usr/share/openclipart/png")
    words = Path(args.words) if args.words else (DEFAULT_WORDS if DEFAULT_WORDS.is_file() else None)
    print(f"English words from {words or 'MiniLM vocabulary'}; converting {source} (a few minutes)", flush=True)
    record = convert(source, Path(args.out), words, args.max_size)
    print(f"openclipart ready: {record['pairs']} captioned images in {args.out} (of {record['files']} files: "
          f"{record['not_english']} without an English name, {record['near_duplicates']} near-duplicates, "
          f"{len(record['skipped_unreadable'])} unreadable; {record['links_skipped']} linked copies skipped)")
    return record


if __name__ == "__main__":
    run_script(main)
