"""The built-in ``shapes`` dataset: procedurally drawn image-caption pairs in the Flickr layout.

Each image holds one or two coloured shapes (kind, colour, size, vertical position) on a varied
background, with five paraphrased captions. Output, under ``--root``::

    images/{split}_{index:05d}.png
    shapes_train.json   one entry per caption: image, caption, image_id
    shapes_val.json     one entry per image: image, caption (list of 5)
    shapes_test.json

Example: ``python -m distill_utils.app.shapes --root ./data/shapes --num_train 1000``
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence

from PIL import Image, ImageDraw, ImageFilter

from ..runtime.atomic import atomic_write_text
from ..runtime.progress import progress as progress_bar

log = logging.getLogger(__name__)

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 80, 215), "yellow": (235, 205, 35),
           "purple": (135, 55, 175), "orange": (240, 135, 25), "white": (245, 245, 245), "black": (20, 20, 20)}
BACKGROUNDS = {"grey": (128, 128, 128), "pale": (225, 220, 205), "dark": (45, 45, 60), "sky": (150, 195, 235),
               "grass": (120, 175, 95)}
SHAPES = {"circle": ["circle", "disc", "round dot"], "square": ["square", "box", "square block"],
          "triangle": ["triangle", "three-sided shape", "wedge"], "cross": ["cross", "plus sign", "plus"],
          "diamond": ["diamond", "rhombus", "tilted square"], "ring": ["ring", "hollow circle", "donut"]}
SIZES = {"small": 0.28, "large": 0.5}
POSITIONS = {"top": 0.27, "middle": 0.5, "bottom": 0.73}
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at 32 px


@dataclass(frozen=True)
class ShapeItem:
    kind: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class ShapesConfig:
    num_train: int = 1000
    num_val: int = 100
    num_test: int = 100
    image_size: int = 32
    seed: int = 0
    format_version: int = 1


def _draw_shape(draw: ImageDraw.ImageDraw, item: ShapeItem, centre_x: float, canvas: int) -> None:
    radius = SIZES[item.size] * canvas / 2
    cx, cy = centre_x * canvas, POSITIONS[item.position] * canvas
    colour = COLOURS[item.colour]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if item.kind == "circle":
        draw.ellipse(box, fill=colour)
    elif item.kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.35)))
    elif item.kind == "square":
        draw.rectangle(box, fill=colour)
    elif item.kind == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif item.kind == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour)
    elif item.kind == "cross":
        arm = radius * 0.35
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=colour)


def render(items: Sequence[ShapeItem], background: str, image_size: int, rng: random.Random) -> Image.Image:
    canvas = image_size * _SUPERSAMPLE
    base = BACKGROUNDS[background]
    shade = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in base)
    image = Image.new("RGB", (canvas, canvas), shade)
    draw = ImageDraw.Draw(image)
    centres = [0.5] if len(items) == 1 else [0.3, 0.7]
    if len(items) == 2 and rng.random() < 0.5:
        centres.reverse()
    for item, centre in zip(items, centres):
        _draw_shape(draw, item, centre + rng.uniform(-0.05, 0.05), canvas)
    image = image.filter(ImageFilter.GaussianBlur(radius=_SUPERSAMPLE * 0.3))
    return image.resize((image_size, image_size), Image.LANCZOS)


def _phrase(item: ShapeItem, rng: random.Random, with_size: bool = True, with_position: bool = True) -> str:
    noun = rng.choice(SHAPES[item.kind])
    words = [item.size] if with_size else []
    words += [item.colour, noun]
    phrase = " ".join(words)
    if with_position:
        phrase += {"top": " near the top", "middle": " in the middle", "bottom": " near the bottom"}[item.position]
    return phrase


def captions_for(items: Sequence[ShapeItem], background: str, rng: random.Random) -> List[str]:
    """Five paraphrases; each mentions every shape's colour and kind, most also size, place, background."""
    article = lambda phrase: ("an " if phrase[0] in "aeiou" else "a ") + phrase  # noqa: E731
    if len(items) == 1:
        item = items[0]
        return [
            f"{article(_phrase(item, rng))} on a {background} background",
            f"a picture of {article(_phrase(item, rng, with_position=False))}",
            f"there is {article(_phrase(item, rng, with_size=False))} against a {background} backdrop",
            f"one {_phrase(item, rng)}",
            f"{article(_phrase(item, rng, with_size=False, with_position=False))}, {item.size}, on {background}",
        ]
    first, second = items
    return [
        f"{article(_phrase(first, rng))} and {article(_phrase(second, rng))}",
        f"two shapes on a {background} background: {article(_phrase(first, rng, False, False))} and "
        f"{article(_phrase(second, rng, False, False))}",
        f"{article(_phrase(second, rng, with_position=False))} next to {article(_phrase(first, rng, with_position=False))}",
        f"a {background} scene with {article(_phrase(first, rng, with_size=False))} and "
        f"{article(_phrase(second, rng, with_size=False))}",
        f"{article(_phrase(first, rng, False, False))} beside {article(_phrase(second, rng, False, False))}",
    ]


def random_scene(rng: random.Random):
    count = 1 if rng.random() < 0.5 else 2
    items = []
    for _ in range(count):
        items.append(ShapeItem(rng.choice(sorted(SHAPES)), rng.choice(sorted(COLOURS)),
                               rng.choice(sorted(SIZES)), rng.choice(sorted(POSITIONS))))
    background = rng.choice(sorted(BACKGROUNDS))
    while count == 1 and COLOURS[items[0].colour] == BACKGROUNDS.get(background):
        background = rng.choice(sorted(BACKGROUNDS))
    return items, background


def _atomic_write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def _recorded_config(meta_path: Path):
    """What ``shapes_meta.json`` records, or None when it is damaged (the data set is then made again)."""
    try:
        recorded = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        log.warning("%s is damaged (%s); generating the data set again", meta_path, error)
        return None
    return recorded if isinstance(recorded, dict) else None


def generate(root: Path, config: ShapesConfig = ShapesConfig(), progress: bool = True) -> Path:
    """Write the dataset under ``root`` (skipped when an identical one is already there)."""
    root = Path(root)
    meta_path = root / "shapes_meta.json"
    if meta_path.is_file() and _recorded_config(meta_path) == asdict(config) and all(
            (root / f"shapes_{split}.json").is_file() for split in ("train", "val", "test")):
        log.info("shapes dataset already present at %s", root)
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    splits = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    annotations = {}
    bar = progress_bar(total=sum(splits.values()), desc=f"drawing shapes -> {root}", unit="img", disable=not progress)
    for split, count in splits.items():
        entries = []
        for index in range(count):
            items, background = random_scene(rng)
            name = f"images/{split}_{index:05d}.png"
            render(items, background, config.image_size, rng).save(root / name)
            captions = captions_for(items, background, rng)
            if split == "train":
                entries += [{"image": name, "caption": c, "image_id": f"{split}_{index}"} for c in captions]
            else:
                entries.append({"image": name, "caption": captions})
            bar.update()
        annotations[split] = entries
    bar.close()
    for split, entries in annotations.items():
        _atomic_write_json(root / f"shapes_{split}.json", entries)
    _atomic_write_json(meta_path, asdict(config))  # last: its presence means the set is complete
    return root
