"""Any folder of images with caption files as a retrieval dataset (``--dataset folder``).

Layout read: ``ROOT/**/NAME.{png,jpg,jpeg,webp}`` with ``NAME.txt`` beside each image. The caption is
the file's first non-empty line (``captions="first"``) or every non-empty line (``captions="all"``).

The split is drawn once and written next to the data as Flickr-layout JSON (``folder_train.json``:
one entry per caption; ``folder_val.json`` / ``folder_test.json``: one entry per image with its
captions) plus ``folder_split.json``, which records how it was drawn and a digest of the folder's
pairs. Every later stage reads those files, so experts, distillation and evaluation all see the same
split; a call asking for another split (or finding the folder changed) is refused instead of
silently drawing a new one.

Duplicate captions: a val or test caption must identify one image, or recall would count a right
answer as a miss. Every image that shares a (normalised) caption with another image is kept in the
training split, where a shared caption is harmless; val and test are drawn from the others.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..runtime.atomic import text_writer, write_all
from .captions import decode_caption_file, pre_caption

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# images in a format the reader does not take: named as such, so a user knows to convert them
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".svg", ".heic", ".avif", ".jfif", ".ico", ".ppm")
CAPTION_MODES = ("first", "all")
SPLIT_FILES = ("folder_train.json", "folder_val.json", "folder_test.json")
SPLIT_RECORD = "folder_split.json"

# what the preparation scripts write beside the pairs (their record of how the folder was made)
PREPARED_RECORD = ".prepared.json"

log = logging.getLogger("ptmst.data")


class FolderError(ValueError):
    """The folder cannot be read as a dataset; the message names the file and the fix."""


@dataclass(frozen=True)
class FolderSplit:
    """How the split is drawn: fractions of the images whose caption is unique, and the seed."""
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    seed: int = 0
    captions: str = "first"


@dataclass(frozen=True)
class Pair:
    image: str                 # relative to the root, with forward slashes
    captions: Tuple[str, ...]  # as written in the caption file


def _caption_lines(path: Path) -> List[str]:
    try:
        text = decode_caption_file(path.read_bytes())
    except UnicodeDecodeError:
        raise FolderError(f"caption file {path} is neither UTF-8 nor UTF-16 text: save it as UTF-8 (one caption per "
                          f"line) or remove it together with its image") from None
    if "\x00" in text:
        raise FolderError(f"caption file {path} holds binary data (NUL bytes), not text: write the caption there "
                          f"as plain UTF-8 text")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class LeftOut:
    path: str    # relative to the root, with forward slashes
    reason: str


@dataclass
class FolderScan:
    pairs: List[Pair]
    left_out: List[LeftOut]

    def summary(self, root: Path, listed_in: Optional[Path] = None, shown: int = 5) -> str:
        line = f"image folder {root}: {len(self.pairs)} image-caption pairs found"
        if not self.left_out:
            return line + ", no file left out"
        line += f"; {len(self.left_out)} files left out: "
        line += "; ".join(f"{item.path} ({item.reason})" for item in self.left_out[:shown])
        more = len(self.left_out) - shown
        if more > 0:
            line += f"; and {more} more" + (f", every one named in {listed_in}" if listed_in else "")
        return line


def _key(path: Path) -> Tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _walk(root: Path) -> Tuple[List[Path], List[LeftOut]]:
    """Every file under ``root``, linked folders followed once each. A link to a folder already read
    (a loop, or a second path to the same folder) and a link to nothing are left out by name."""
    files: List[Path] = []
    left_out: List[LeftOut] = []
    seen = {_key(root)}
    links: List[Path] = []

    def read(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                if entry.is_dir():
                    links.append(entry)
                elif entry.is_file():
                    files.append(entry)
                else:
                    left_out.append(LeftOut(_relative(entry, root), f"a link to {os.readlink(entry)}, which does "
                                                                    f"not exist"))
            elif entry.is_dir():
                seen.add(_key(entry))
                read(entry)
            elif entry.is_file():
                files.append(entry)

    # the real folders first, so that a link never claims a folder the tree holds under its own name
    read(root)
    while links:
        link = links.pop(0)
        key = _key(link)
        if key in seen:
            left_out.append(LeftOut(_relative(link, root), f"a link to the folder {link.resolve()}, which is read "
                                                           f"already (a loop, or a second path to it)"))
            continue
        seen.add(key)
        read(link)
    return files, left_out


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _reason_left_out(path: Path, root: Path, captions: set) -> Optional[str]:
    """Why a file that is not an image the reader takes is not used; None for the caption files of
    images and for the split files this module writes."""
    suffix = path.suffix.lower()
    if path in captions or (path.parent == root and path.name in SPLIT_FILES + (SPLIT_RECORD, PREPARED_RECORD)):
        return None
    if suffix == ".txt":
        return f"a caption file without an image beside it ({'/'.join(IMAGE_SUFFIXES)})"
    if suffix in OTHER_IMAGE_SUFFIXES:
        return f"{suffix} images are not read: convert it to .png (or .jpg) beside its caption file"
    return "not an image or a caption file"


def scan_folder(root: Path, captions: str = "first") -> FolderScan:
    """Every image under ``root`` with its captions, in a fixed (sorted) order, and every file left out."""
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"image folder {root} does not exist: pass --image_root a folder of images with a "
                          f"NAME.txt caption file beside each NAME.png/.jpg (bash sh/prepare_data.sh stamps "
                          f"makes one)")
    files, left_out = _walk(root)
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FolderError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images: pass --image_root the "
                          f"folder that holds the images and their NAME.txt caption files")
    captions_of_images = {image.with_suffix(".txt") for image in images}
    for path in sorted(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES):
        reason = _reason_left_out(path, root, captions_of_images)
        if reason:
            left_out.append(LeftOut(_relative(path, root), reason))
    pairs = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            raise FolderError(f"image {image} has no caption file {caption_file.name} beside it: write its caption "
                              f"there (one line of text) or move the image out of {root}")
        lines = _caption_lines(caption_file)
        usable = [line for line in lines if pre_caption(line)]
        if not usable:
            raise FolderError(f"caption file {caption_file} holds no caption (it is empty, or punctuation only): "
                              f"write the image's caption there or remove the pair")
        pairs.append(Pair(_relative(image, root), tuple(usable[:1] if captions == "first" else usable)))
    return FolderScan(pairs, sorted(left_out, key=lambda item: item.path))


def scan(root: Path, captions: str = "first") -> List[Pair]:
    """Every image under ``root`` with its captions, in a fixed (sorted) order."""
    return scan_folder(root, captions).pairs


def folder_digest(pairs: Sequence[Pair]) -> str:
    return hashlib.sha1(json.dumps([asdict(p) for p in pairs]).encode("utf-8")).hexdigest()


def draw_split(pairs: Sequence[Pair], split: FolderSplit) -> Dict[str, List[Pair]]:
    """``{"train", "val", "test"}``: val and test drawn (seeded) among images whose every caption is
    unique across the folder; images sharing a caption stay in train."""
    counts = Counter(pre_caption(c) for p in pairs for c in p.captions)
    unique = [p for p in pairs if all(counts[pre_caption(c)] == 1 for c in p.captions)]
    order = list(unique)
    random.Random(split.seed).shuffle(order)
    n_test, n_val = round(split.test_fraction * len(pairs)), round(split.val_fraction * len(pairs))
    if n_test < 1 or n_val < 1 or n_test + n_val >= len(order):
        raise FolderError(f"{len(pairs)} image-caption pairs ({len(unique)} with a caption no other image has) cannot "
                          f"be split into {n_test} test, {n_val} val and at least one training pair: add images, or "
                          f"change the fractions (val {split.val_fraction}, test {split.test_fraction})")
    test, val = order[:n_test], order[n_test:n_test + n_val]
    held_out = {p.image for p in test + val}
    return {"train": [p for p in pairs if p.image not in held_out], "val": sorted(val, key=lambda p: p.image),
            "test": sorted(test, key=lambda p: p.image)}


def _train_entries(pairs: Sequence[Pair]) -> List[dict]:
    return [{"image": p.image, "caption": c, "image_id": p.image} for p in pairs for c in p.captions]


def _eval_entries(pairs: Sequence[Pair]) -> List[dict]:
    return [{"image": p.image, "caption": list(p.captions)} for p in pairs]


def split_record(root: Path, found: FolderScan, split: FolderSplit, parts: Dict[str, List[Pair]]) -> dict:
    pairs = found.pairs
    counts = Counter(pre_caption(c) for p in pairs for c in p.captions)
    return {"format": 1, "image_root": str(Path(root).resolve()), "split": asdict(split),
            "folder_digest": folder_digest(pairs), "pairs": len(pairs),
            "images_sharing_a_caption": sum(1 for p in pairs if any(counts[pre_caption(c)] > 1 for c in p.captions)),
            "sizes": {name: len(part) for name, part in parts.items()},
            "duplicates": "images sharing a normalised caption with another image are kept in train",
            "left_out": [asdict(item) for item in found.left_out]}


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FolderError(f"split record {path} cannot be read ({error}): delete it and the folder_*.json files "
                          f"beside it to draw the split again (experts trained on the old split then no longer "
                          f"fit it)") from None
    if not isinstance(record, dict) or "split" not in record or "folder_digest" not in record:
        raise FolderError(f"split record {path} is not one this project wrote: delete it and the folder_*.json "
                          f"files beside it to draw the split again")
    return record


def ensure_split(root: Path, ann_root: Path, split: FolderSplit = FolderSplit()) -> Path:
    """Write the split files into ``ann_root`` unless they exist; refuse when the existing ones were
    drawn another way or from other pairs. Returns the record's path."""
    root, ann_root = Path(root), Path(ann_root)
    record_path = ann_root / SPLIT_RECORD
    files = [ann_root / name for name in SPLIT_FILES]
    if record_path.is_file() and all(f.is_file() for f in files):
        record = _read_record(record_path)
        if record["split"] != asdict(split):
            raise FolderError(
                f"{ann_root} holds a split drawn with {record['split']}, not the requested {asdict(split)}: every "
                f"stage must read one split. Pass the recorded values, or another --ann_root for the new split "
                f"(or delete {record_path} and the folder_*.json files to draw again)")
        return record_path
    found = scan_folder(root, split.captions)
    log.info(found.summary(root, listed_in=record_path))
    parts = draw_split(found.pairs, split)
    ann_root.mkdir(parents=True, exist_ok=True)
    record = split_record(root, found, split, parts)
    # the three files and their record are one split: written as a group, never one without the others
    write_all([(files[0], text_writer(json.dumps(_train_entries(parts["train"]), indent=0))),
               (files[1], text_writer(json.dumps(_eval_entries(parts["val"]), indent=0))),
               (files[2], text_writer(json.dumps(_eval_entries(parts["test"]), indent=0))),
               (record_path, text_writer(json.dumps(record, indent=1)))])
    return record_path


def check_unchanged(root: Path, ann_root: Path) -> None:
    """Refuse a folder whose pairs differ from the ones the recorded split was drawn from."""
    record = _read_record(Path(ann_root) / SPLIT_RECORD)
    found = scan_folder(root, record["split"]["captions"])
    log.info(found.summary(root))
    pairs = found.pairs
    if folder_digest(pairs) != record["folder_digest"]:
        raise FolderError(
            f"the images or captions under {root} changed since the split in {ann_root} was drawn ({record['pairs']} "
            f"pairs then, {len(pairs)} now): restore the folder, or pass another --ann_root to draw a split of the "
            f"new content (experts and runs made on the old split do not fit the new one)")
