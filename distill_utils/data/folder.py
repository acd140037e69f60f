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
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..atomic import text_writer, write_all
from .captions import decode_caption_file, pre_caption

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_MODES = ("first", "all")
SPLIT_FILES = ("folder_train.json", "folder_val.json", "folder_test.json")
SPLIT_RECORD = "folder_split.json"


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


def scan(root: Path, captions: str = "first") -> List[Pair]:
    """Every image under ``root`` with its captions, in a fixed (sorted) order."""
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"image folder {root} does not exist: pass --image_root a folder of images with a "
                          f"NAME.txt caption file beside each NAME.png/.jpg (bash sh/prepare_data.sh stamps "
                          f"makes one)")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FolderError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images: pass --image_root the "
                          f"folder that holds the images and their NAME.txt caption files")
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
        pairs.append(Pair(image.relative_to(root).as_posix(), tuple(usable[:1] if captions == "first" else usable)))
    return pairs


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


def split_record(root: Path, pairs: Sequence[Pair], split: FolderSplit, parts: Dict[str, List[Pair]]) -> dict:
    counts = Counter(pre_caption(c) for p in pairs for c in p.captions)
    return {"format": 1, "image_root": str(Path(root).resolve()), "split": asdict(split),
            "folder_digest": folder_digest(pairs), "pairs": len(pairs),
            "images_sharing_a_caption": sum(1 for p in pairs if any(counts[pre_caption(c)] > 1 for c in p.captions)),
            "sizes": {name: len(part) for name, part in parts.items()},
            "duplicates": "images sharing a normalised caption with another image are kept in train"}


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
    pairs = scan(root, split.captions)
    parts = draw_split(pairs, split)
    ann_root.mkdir(parents=True, exist_ok=True)
    record = split_record(root, pairs, split, parts)
    # the three files and their record are one split: written as a group, never one without the others
    write_all([(files[0], text_writer(json.dumps(_train_entries(parts["train"]), indent=0))),
               (files[1], text_writer(json.dumps(_eval_entries(parts["val"]), indent=0))),
               (files[2], text_writer(json.dumps(_eval_entries(parts["test"]), indent=0))),
               (record_path, text_writer(json.dumps(record, indent=1)))])
    return record_path


def check_unchanged(root: Path, ann_root: Path) -> None:
    """Refuse a folder whose pairs differ from the ones the recorded split was drawn from."""
    record = _read_record(Path(ann_root) / SPLIT_RECORD)
    pairs = scan(root, record["split"]["captions"])
    if folder_digest(pairs) != record["folder_digest"]:
        raise FolderError(
            f"the images or captions under {root} changed since the split in {ann_root} was drawn ({record['pairs']} "
            f"pairs then, {len(pairs)} now): restore the folder, or pass another --ann_root to draw a split of the "
            f"new content (experts and runs made on the old split do not fit the new one)")
