"""Image-caption retrieval datasets in the BLIP/Karpathy JSON layout.

train file: one entry per caption ``{"image", "caption", "image_id"}``;
val/test files: one entry per image ``{"image", "caption": [captions]}``.
``image`` is relative to the image root.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..runtime.errors import UsageError
from .captions import pre_caption
from .folder import SPLIT_FILES, FolderError, FolderSplit, check_unchanged, ensure_split
from .transforms import test_transform, train_transform


class DataError(UsageError):
    """A dataset file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    train: str
    val: str
    test: str
    image_root: str
    ann_root: str
    how_to_get: str
    from_folder: bool = False  # the split files are drawn from an image folder (distill_utils/data/folder.py)


_ANNOTATIONS_HINT = ("download the annotations with `hf download previsior/PTM-ST --repo-type dataset "
                     "--include 'Annotation/*' --local-dir ./data` (or pass --ann_root FOLDER)")
_FOLDER_HINT = ("the split files are drawn from the image folder on first use: pass --image_root FOLDER (images "
                "with NAME.txt captions beside them)")
_STAMPS_HINT = "fetch and convert the Tux Paint stamps with `bash sh/prepare_data.sh stamps`"
_OPENCLIPART_HINT = "fetch and convert Debian's Open Clip Art with `bash sh/prepare_data.sh openclipart`"
_SHAPES_HINT = "generate it with `python -m distill_utils.app.shapes --root ./data/shapes` (or pass --ann_root/--image_root)"

DATASETS: Dict[str, DatasetSpec] = {
    "flickr": DatasetSpec("flickr30k_train.json", "flickr30k_val.json", "flickr30k_test.json",
                          "./distill_utils/data/Flickr30k/", "./data/Annotation/", _ANNOTATIONS_HINT),
    "coco": DatasetSpec("coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json",
                        "./distill_utils/data/COCO/", "./data/Annotation/", _ANNOTATIONS_HINT),
    "cc3m": DatasetSpec("cc3m_captions_train.json", "cc3m_captions_val.json", "cc3m_captions_test.json",
                        "./distill_utils/data/CC3M/", "./data/Annotation/", _ANNOTATIONS_HINT),
    "shapes": DatasetSpec("shapes_train.json", "shapes_val.json", "shapes_test.json",
                          "./data/shapes/", "./data/shapes/", _SHAPES_HINT),
    # any folder of images with caption files; the split files go beside the images unless --ann_root says where
    "folder": DatasetSpec(*SPLIT_FILES, "", "", _FOLDER_HINT, from_folder=True),
    # the Tux Paint stamps: real photographs and drawings with English captions (sh/prepare_data.sh stamps)
    "stamps": DatasetSpec(*SPLIT_FILES, "./data/stamps/images/", "./data/stamps/", _STAMPS_HINT, from_folder=True),
    # Debian's public-domain clip art, captions from titles and file names (sh/prepare_data.sh openclipart)
    "openclipart": DatasetSpec(*SPLIT_FILES, "./data/openclipart/images/", "./data/openclipart/", _OPENCLIPART_HINT,
                               from_folder=True),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def repair_advice(path: Path, hint: str) -> str:
    """What to do about a damaged annotation file: a folder dataset's split file is drawn again when deleted
    (the same split flags draw the same split), a downloaded one is downloaded again."""
    if path.name in SPLIT_FILES:
        return (f"delete {path} and run the same command again: the split is drawn again from the image folder "
                f"(the same --split_seed and fractions give the same split)")
    return f"download it again: {hint}"


def load_annotation(path: Path, required: Sequence[str], hint: str) -> List[dict]:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"annotation file {path} {what}: {hint}.")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"annotation file {path} is not valid JSON ({error}); {repair_advice(path, hint)}.") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"annotation file {path} should hold a non-empty JSON list of entries; "
                        f"{repair_advice(path, hint)}.")
    for index, entry in enumerate(entries):
        missing = [key for key in required if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise DataError(f"annotation file {path}, entry {index}, lacks the key(s) {missing} (expected "
                            f"{list(required)}): the file is not in the BLIP/Karpathy layout; {hint}.")
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"annotation file {path}, entry {index}: {problem}. Fix or remove that entry (every "
                            f"entry needs an image path and a caption, or a non-empty list of captions), or "
                            f"download the file again: {hint}.")
    return entries


def _entry_problem(entry: dict) -> str:
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image.strip():
        return f"'image' is {image!r}, not a file path"
    captions = caption if isinstance(caption, list) else [caption]
    if not captions:
        return "'caption' is an empty list"
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        return f"'caption' holds {bad[0]!r}, not text"
    empty = [c for c in captions if not pre_caption(c)]
    if empty:
        return (f"'caption' holds {empty[0]!r}, which has no words once normalised (punctuation and spaces "
                f"only): an empty caption cannot be retrieved and would train on an empty text")
    return ""


def check_images_exist(dataset, name: str, sample: int = 0) -> None:
    """Fail now, not after captions are encoded or experts trained, when the image root or images are
    missing: every image of an evaluation split, ``sample`` spread over a training split (0: all)."""
    paths = sorted(set(dataset.image_paths()))
    if sample and len(paths) > sample:
        step = len(paths) / sample
        paths = [paths[int(i * step)] for i in range(sample)] + [paths[-1]]
    root = dataset.folder.root
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist ({name} split, {dataset.ann_file.name}): pass "
                        f"--image_root FOLDER, or download the images (sh/prepare_data.sh DATASET).")
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the {name} split ({dataset.ann_file.name}) are missing under "
                        f"{root}, e.g. {root / missing[0]}: check --image_root (annotation paths are relative to "
                        f"it) or download the images again (sh/prepare_data.sh DATASET).")


def on_white(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels composited on white (a cut-out photograph, a stamp), not on black."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return on_white(image)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist: check --image_root (the annotation paths are "
                        f"relative to it) or download the images again (sh/prepare_data.sh).") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"image {path} is too large to decode safely ({error}). Shrink it (for example "
                        f"convert IN -resize 4096x4096 OUT: images are resized to --image_size anyway) or remove "
                        f"its entries from the annotation file.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"image {path} cannot be decoded ({error}): the file is corrupt; download it "
                        f"again (sh/prepare_data.sh) or remove its entries from the annotation file.") from None


class _ImageFolder:
    """Opens images relative to a root; optionally keeps decoded images so epochs do not decode again."""

    def __init__(self, root: Path, cache_decoded: bool = False):
        self.root = root
        self.cache: Optional[Dict[str, Image.Image]] = {} if cache_decoded else None

    def __call__(self, relative: str) -> Image.Image:
        if self.cache is None:
            return load_image(self.root / relative)
        if relative not in self.cache:
            self.cache[relative] = load_image(self.root / relative)
        return self.cache[relative]


class RetrievalTrainDataset(Dataset):
    """One item per caption: ``(image tensor, caption index)``; ``captions`` are normalised."""

    def __init__(self, ann_file: Path, image_root: Path, transform, hint: str = "", max_words: int = 30,
                 cache_decoded: bool = False):
        entries = load_annotation(Path(ann_file), ("image", "caption"), hint)
        self.ann_file = Path(ann_file)
        self.images = [entry["image"] for entry in entries]
        self.captions = [pre_caption(entry["caption"], max_words) for entry in entries]
        self.transform = transform
        self.folder = _ImageFolder(Path(image_root), cache_decoded)

    def __len__(self) -> int:
        return len(self.captions)

    def image_paths(self) -> List[str]:
        return self.images

    def __getitem__(self, index: int):
        return self.transform(self.folder(self.images[index])), index


class RetrievalEvalDataset(Dataset):
    """One item per image: ``(image tensor, image index)``; ``text`` lists every caption,
    ``img2txt[i]`` the caption indices of image i and ``txt2img[t]`` the image of caption t."""

    def __init__(self, ann_file: Path, image_root: Path, transform, hint: str = "", max_words: int = 30):
        entries = load_annotation(Path(ann_file), ("image", "caption"), hint)
        self.ann_file = Path(ann_file)
        self.image: List[str] = []
        self.text: List[str] = []
        self.img2txt: List[List[int]] = []
        self.txt2img: List[int] = []
        for image_index, entry in enumerate(entries):
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            self.image.append(entry["image"])
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(captions))))
            for caption in captions:
                self.text.append(pre_caption(caption, max_words))
                self.txt2img.append(image_index)
        self.transform = transform
        self.folder = _ImageFolder(Path(image_root))

    def __len__(self) -> int:
        return len(self.image)

    def image_paths(self) -> List[str]:
        return self.image

    def __getitem__(self, index: int):
        return self.transform(self.folder(self.image[index])), index


def resolve_roots(dataset: str, image_root: Optional[str], ann_root: Optional[str]) -> Tuple[Path, Path]:
    spec = dataset_spec(dataset)
    if spec.from_folder and not (image_root or spec.image_root):
        raise DataError(f"--dataset {dataset} needs --image_root FOLDER: a folder of images, each NAME.png/.jpg "
                        f"with its caption in NAME.txt beside it")
    images = Path(image_root or spec.image_root)
    return images, Path(ann_root or spec.ann_root or images)


def prepare_folder_split(dataset: str, images: Path, annotations: Path, split: FolderSplit) -> None:
    """Draw the split of a folder dataset once (or check the one drawn earlier against the folder)."""
    if not images.is_dir():
        hint = dataset_spec(dataset).how_to_get
        raise DataError(f"image folder {images} (--dataset {dataset}) does not exist: {hint}.")
    try:
        existed = (annotations / SPLIT_FILES[0]).is_file()
        ensure_split(images, annotations, split)
        if existed:
            check_unchanged(images, annotations)
    except FolderError as error:
        raise DataError(str(error)) from None


def build_datasets(dataset: str, image_root: Optional[str] = None, ann_root: Optional[str] = None,
                   image_size: int = 224, augment: bool = True, cache_decoded: bool = False,
                   split: FolderSplit = FolderSplit()):
    """``(train, val, test)`` for a dataset name; ``--image_root``/``--ann_root`` override the defaults.
    A folder dataset's split (``split``) is drawn on first use and written beside the data."""
    spec = dataset_spec(dataset)
    images, annotations = resolve_roots(dataset, image_root, ann_root)
    if spec.from_folder:
        prepare_folder_split(dataset, images, annotations, split)
    train = RetrievalTrainDataset(annotations / spec.train, images, train_transform(image_size, augment),
                                  spec.how_to_get, cache_decoded=cache_decoded)
    val = RetrievalEvalDataset(annotations / spec.val, images, test_transform(image_size), spec.how_to_get)
    test = RetrievalEvalDataset(annotations / spec.test, images, test_transform(image_size), spec.how_to_get)
    check_images_exist(test, "test")
    check_images_exist(train, "train", sample=200)
    return train, val, test
