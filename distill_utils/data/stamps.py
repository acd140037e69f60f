"""Convert the Tux Paint stamps (Debian package ``tuxpaint-stamps-default``) into an image folder with
captions, the layout ``--dataset folder`` / ``--dataset stamps`` reads (``bash sh/prepare_data.sh stamps``).

A stamp is ``stamps/<category>/.../NAME.png`` (or ``.svg``) beside ``NAME.txt``, whose first line is
the English caption and whose other lines are translations (``xx.utf8=...``). Each raster stamp with
an English caption becomes ``OUT/<category>/.../NAME.png`` (shrunk so its longer side is at most
``--max_size``; transparency kept, the loader composites it on white) and ``NAME.txt`` holding the
English caption alone. SVG stamps are skipped (no SVG renderer is a dependency), as are mirrored
variants without a caption of their own (``NAME_mirror.png``).

``symbols`` (about 250 letters, digits, coins, signs and faces) is left out by default: most of its
captions repeat ("The letter a." for the outlined and the filled a; the case is lost when captions are
normalised), so those images could only go to the training split, and letters are not what
image-caption retrieval is about. ``--categories`` takes them in.

The images are GPL-2 (see the package's copyright file): never commit them; this script makes them.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PIL import Image

from ..runtime.errors import UsageError
from .captions import decode_caption_file, pre_caption
from .folder import PREPARED_RECORD

DEFAULT_EXCLUDED = ("symbols",)
MARKER = PREPARED_RECORD


def english_caption(text_file: Path) -> Optional[str]:
    """The first line of a stamp's description when it is the English one (not ``xx.utf8=...``)."""
    try:
        lines = [line.strip() for line in decode_caption_file(text_file.read_bytes()).splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or ".utf8=" in lines[0].split(" ", 1)[0] or not pre_caption(lines[0]):
        return None
    return lines[0]


def find_stamps(source: Path, categories: Optional[Sequence[str]]) -> Dict[Path, str]:
    """``{relative png path: English caption}`` of the raster stamps in the chosen categories."""
    chosen = {}
    for image in sorted(source.rglob("*.png")):
        relative = image.relative_to(source)
        category = relative.parts[0] if len(relative.parts) > 1 else ""
        if categories is not None and category not in categories:
            continue
        if categories is None and category in DEFAULT_EXCLUDED:
            continue
        caption = english_caption(image.with_suffix(".txt"))
        if caption is not None:
            chosen[relative] = caption
    return chosen


def shrink(image: Image.Image, max_size: int) -> Image.Image:
    if max(image.size) <= max_size:
        return image
    scale = max_size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def save_pair(image: Image.Image, caption: str, target: Path) -> None:
    """``target`` (a PNG) and the caption beside it; a failed write names the file: it is never skipped."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="PNG")
        target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {target} ({error.strerror or error}): free space on that disk or make the "
                         f"folder writable (or pass another output folder), then run the same command again; "
                         f"nothing was marked ready") from None


def convert(source: Path, out: Path, categories: Optional[Sequence[str]] = None, max_size: int = 256) -> dict:
    """Write the folder at ``out`` (built in a temporary folder beside it, then renamed: never half
    written); returns its record. A folder already made with the same settings is kept as it is."""
    settings = {"source": str(source.resolve()), "categories": sorted(categories) if categories else None,
                "excluded_by_default": list(DEFAULT_EXCLUDED) if categories is None else [], "max_size": max_size}
    marker = out / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if {k: record.get(k) for k in ("categories", "max_size")} == {k: settings[k] for k in ("categories", "max_size")}:
            return record
        raise UsageError(f"{out} holds stamps converted with other settings ({ {k: record.get(k) for k in ('categories', 'max_size')} }): "
                         f"delete that folder (and the split files beside it) to convert again, or pass the same settings")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a folder this script made (no {MARKER} in it): pass another output "
                         f"folder, or move that one away")
    stamps = find_stamps(source, categories)
    if not stamps:
        raise UsageError(f"no captioned PNG stamps under {source}: pass the stamps folder of the extracted package "
                         f"(DIR/usr/share/tuxpaint/stamps) or of an installed Tux Paint (/usr/share/tuxpaint/stamps)")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    skipped: List[str] = []
    try:
        for relative, caption in stamps.items():
            try:
                with Image.open(source / relative) as image:
                    shrunk = shrink(image.convert("RGBA"), max_size)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                skipped.append(str(relative))  # an undecodable stamp is left out, and said so in the record
                continue
            save_pair(shrunk, caption, building / relative)
        record = {**settings, "stamps": len(stamps) - len(skipped), "skipped_unreadable": skipped,
                  "license": "GPL-2 (Tux Paint stamps): do not commit these files"}
        (building / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)  # nothing half made stays behind, least of all a marker
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    building.rename(out)
    return record
