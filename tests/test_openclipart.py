"""Debian's Open Clip Art as a dataset (sh/prepare_data.sh openclipart): the captions made from titles and file
names, the English filter, near-duplicate removal, faults while writing, the script's sources, and the real
package through the folder reader (slow: fetched from the Debian registry)."""
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from distill_utils.data import openclipart as oc
from distill_utils.data.folder import FolderSplit, draw_split, scan
from distill_utils.runtime.errors import UsageError

from .helpers import path_without_apt

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"fire", "engine", "dog", "drawn", "with", "straight", "lines", "joystick", "red", "blue", "arrow", "house",
         "lemon", "theme", "star", "tree", "view", "green", "circle", "square"}


def clip(path: Path, title: str, author: str, draw) -> None:
    """A PNG with the package's text chunks, its picture drawn by ``draw(ImageDraw)`` on a transparent canvas."""
    image = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    draw(ImageDraw.Draw(image))
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Author", author)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def box(colour, xy=(10, 10, 70, 60)):
    return lambda d: d.rectangle(xy, fill=colour)


def fake_package(root: Path) -> Path:
    """A png tree as the package lays it out: informative titles, a collection title, author-suffixed and
    foreign file names, a re-saved copy, a colour variant, a link and a file that is no image."""
    clip(root / "transportation/fire_engine_romus_01.png", "fire engine", "romus", box((200, 0, 0, 255)))
    clip(root / "animals/dog_01_drawn_with_strai_01.png", "Dog 01 Drawn With Straight Lines", "Gerald G.",
         lambda d: d.line((5, 5, 100, 70), fill=(0, 0, 0, 255), width=4))
    icons = {"joystick": lambda d: d.ellipse((5, 5, 60, 70), fill=(0, 90, 0, 255)),
             "view_tree": lambda d: d.rectangle((5, 5, 110, 20), fill=(90, 90, 0, 255)),
             "house": lambda d: d.polygon([(60, 0), (119, 79), (0, 79)], fill=(0, 0, 90, 255)),
             "star": lambda d: d.line((0, 79, 119, 0), fill=(200, 200, 0, 255), width=6)}
    for name, draw in icons.items():  # a collection title: the names come from the files
        clip(root / f"computer/icons/lemon-theme/{name}.png", "Lemon SVG theme", "Jose Hevia", draw)
    clip(root / "animals/cavallo_architetto_franc_04.png", "Cavallo", "Architetto Francesco Rollandin",
         box((120, 60, 0, 255), (0, 0, 50, 50)))
    clip(root / "shapes/red_arrow_jean_vi_01.png", "red_arrow", "Jean-Victor Balin",
         lambda d: d.polygon([(0, 0), (110, 40), (0, 79)], fill=(220, 0, 0, 255)))
    clip(root / "shapes/blue_arrow_jean_vi_01.png", "blue_arrow", "Jean-Victor Balin",  # the same shape, blue
         lambda d: d.polygon([(0, 0), (110, 40), (0, 79)], fill=(0, 0, 220, 255)))
    clip(root / "shapes/red_arrow_copy_01.png", "red arrow copy", "someone",  # the red arrow again, one pixel off
         lambda d: d.polygon([(1, 0), (110, 40), (1, 79)], fill=(220, 0, 0, 255)))
    (root / "unsorted").mkdir()
    (root / "unsorted/green_circle.png").symlink_to(root / "computer/icons/lemon-theme/house.png")
    (root / "unsorted/broken_square.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def words_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "american-english"
    path.write_text("\n".join(sorted(WORDS | {"copy"})) + "\n", encoding="utf-8")
    return path


def test_words_split_on_case_digits_and_punctuation():
    assert oc.words_of("MatieresNocivesIrritantes_01-x") == ["matieres", "nocives", "irritantes", "x"]
    assert oc.words_of("Dog 01 Drawn With Straight Lines") == ["dog", "drawn", "with", "straight", "lines"]


@pytest.mark.parametrize("text, author, expected", [
    ("fire_engine_romus_01", "romus", "fire engine"),
    ("glace_06_jean-victor_bal_01", "Jean-Victor Balin", None),            # French: no English word left
    ("red_arrow_jean_vi_01", "Jean-Victor Balin", "red arrow"),            # the cut author's name dropped
    ("dog_01_drawn_with_strai_01", "Gerald G.", "dog drawn with"),         # 'strai' is a cut word: dropped
    ("cavallo_architetto_franc_04", "Architetto Francesco Rollandin", None),
    ("joystick", "", "joystick"),
    ("x_y", "", None),                                                     # no word of more than one letter
])
def test_english_name_keeps_the_english_words_without_the_author(text, author, expected):
    assert oc.english_name(text, oc.author_words(author), WORDS) == expected


def test_a_collection_title_gives_way_to_the_file_name_and_the_folder_joins_the_caption():
    counts = Counter({"Lemon SVG theme": 4, "fire engine": 1})
    icon = oc.Clip(Path("computer/icons/lemon-theme/view_tree.png"), "Lemon SVG theme", "Jose Hevia")
    assert oc.caption_of(icon, counts, WORDS) == "view tree (computer, icons, lemon theme)"
    engine = oc.Clip(Path("unsorted/fire_engine_romus_01.png"), "fire engine", "romus")
    assert oc.caption_of(engine, counts, WORDS) == "fire engine"  # 'unsorted' says nothing of the picture


def test_near_duplicates_need_the_same_drawing_and_the_same_colours():
    def drawn(fill, shift=0, canvas=(120, 80)):
        image = Image.new("RGBA", canvas, (0, 0, 0, 0))
        ImageDraw.Draw(image).polygon([(shift, 0), (110, 40), (shift, 79)], fill=fill)
        return oc.signature(image)
    red = drawn((220, 0, 0, 255))
    assert oc.is_near_duplicate(drawn((220, 0, 0, 255), shift=1), [red])
    assert not oc.is_near_duplicate(drawn((0, 0, 220, 255)), [red])  # same gradients, other colour
    square = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    ImageDraw.Draw(square).rectangle((10, 10, 30, 70), fill=(220, 0, 0, 255))
    assert not oc.is_near_duplicate(oc.signature(square), [red])
    # the same drawing on a larger empty canvas is the same picture: the hash is taken of what is drawn
    wide = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    ImageDraw.Draw(wide).polygon([(100, 100), (210, 140), (100, 179)], fill=(220, 0, 0, 255))
    assert oc.is_near_duplicate(oc.signature(wide), [red])


def test_convert_writes_captioned_pairs_counts_every_file_left_out_and_splits_without_shared_captions(tmp_path):
    source = fake_package(tmp_path / "png")
    out = tmp_path / "out" / "images"
    record = oc.convert(source, out, words_file(tmp_path / "dict"))
    captions = {p.relative_to(out).as_posix(): p.read_text(encoding="utf-8").strip() for p in out.rglob("*.txt")}
    assert captions == {
        "transportation/fire_engine_romus_01.txt": "fire engine (transportation)",
        "animals/dog_01_drawn_with_strai_01.txt": "dog drawn with straight lines (animals)",  # the uncut title
        "computer/icons/lemon-theme/joystick.txt": "joystick (computer, icons, lemon theme)",
        "computer/icons/lemon-theme/view_tree.txt": "view tree (computer, icons, lemon theme)",
        "computer/icons/lemon-theme/house.txt": "house (computer, icons, lemon theme)",
        "computer/icons/lemon-theme/star.txt": "star (computer, icons, lemon theme)",
        "shapes/blue_arrow_jean_vi_01.txt": "blue arrow (shapes)",
        "shapes/red_arrow_copy_01.txt": "red arrow copy (shapes)",  # first in path order: the original dropped
    }
    assert all((out / name).with_suffix(".png").is_file() for name in captions)
    assert (record["pairs"], record["files"], record["links_skipped"], record["not_english"],
            record["near_duplicates"]) == (8, 11, 1, 1, 1)  # 8 + 1 + 1 + 1 unreadable
    assert record["skipped_unreadable"] == ["unsorted/broken_square.png"]
    assert json.loads((out / ".prepared.json").read_text()) == record
    assert oc.convert(source, out, words_file(tmp_path / "dict")) == record  # made already: kept as it is
    assert oc.convert(source, out, words_file(tmp_path / "copy")) == record  # the same words from elsewhere
    with pytest.raises(UsageError, match="converted with other settings"):
        oc.convert(source, out, words_file(tmp_path / "dict"), max_size=64)
    parts = draw_split(scan(out), FolderSplit(val_fraction=0.25, test_fraction=0.25))
    held_out = [c for name in ("val", "test") for p in parts[name] for c in p.captions]
    assert len(held_out) == len(set(held_out)) == 4


def test_a_failed_write_names_the_file_and_leaves_nothing_marked_ready(tmp_path, monkeypatch):
    source = fake_package(tmp_path / "png")
    out = tmp_path / "out" / "images"
    real_save, saved = Image.Image.save, []

    def full_disk(self, target, *args, **kwargs):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(target)
        return real_save(self, target, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UsageError) as caught:
        oc.convert(source, out, words_file(tmp_path / "dict"))
    message = str(caught.value)
    assert "No space left on device" in message and "run the same command again" in message
    assert "fire_engine" in message or "lemon-theme" in message or "dog_01" in message  # the file it could not write
    assert not out.exists() and not list(out.parent.glob(".images.*"))  # no folder, no half-built one
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert oc.convert(source, out, words_file(tmp_path / "dict"))["pairs"] == 8  # the rerun completes


def test_an_unreadable_word_list_is_named():
    with pytest.raises(UsageError, match="--words /nowhere/words cannot be read"):
        oc.load_word_list(Path("/nowhere/words"))


def run_prepare(tmp_path, path=None, **env):
    environment = {**os.environ, "PYTHON": sys.executable, "OPENCLIPART_DIR": str(tmp_path / "out"), **env}
    if path is not None:
        environment["PATH"] = path
    return subprocess.run([shutil.which("bash"), str(ROOT / "sh" / "prepare_data.sh"), "openclipart"],
                          capture_output=True, text=True, env=environment)


def test_prepare_openclipart_converts_given_folders_once_and_says_where_it_took_them(tmp_path):
    source = fake_package(tmp_path / "png")
    words_file(tmp_path / "dict")
    done = run_prepare(tmp_path, OPENCLIPART_SOURCE=str(source), WORDS_SOURCE=str(tmp_path / "dict"))
    assert done.returncode == 0, done.stderr
    assert f"taking {source} (from OPENCLIPART_SOURCE)" in done.stderr and "openclipart ready: 8" in done.stdout
    again = run_prepare(tmp_path, OPENCLIPART_SOURCE=str(tmp_path / "nowhere"))  # done: no source needed
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_prepare_openclipart_refuses_an_empty_source_and_says_what_to_do_without_apt(tmp_path):
    empty = run_prepare(tmp_path, OPENCLIPART_SOURCE="")
    assert empty.returncode != 0 and "OPENCLIPART_SOURCE is set but empty" in empty.stderr
    assert not (tmp_path / "out").exists()  # nothing fetched
    if Path("/usr/share/openclipart/png").is_dir():
        pytest.skip("openclipart-png is installed here: the script takes it without fetching")
    done = run_prepare(tmp_path, path=path_without_apt(tmp_path / "bin"))
    assert done.returncode != 0 and "needs apt-get and dpkg-deb" in done.stderr
    assert "OPENCLIPART_SOURCE=DIR/usr/share/openclipart/png" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_real_package_gives_over_3000_pairs_the_folder_reader_splits(tmp_path_factory):
    given = Path(os.environ.get("OPENCLIPART_DIR", ROOT / "data" / "openclipart"))
    if not (given / "images" / ".prepared.json").is_file():
        given = tmp_path_factory.mktemp("openclipart")
        done = subprocess.run(["bash", str(ROOT / "sh" / "prepare_data.sh"), "openclipart"], capture_output=True,
                              text=True, env={**os.environ, "OPENCLIPART_DIR": str(given), "PYTHON": sys.executable})
        if done.returncode != 0:
            pytest.skip(f"openclipart could not be fetched here: {done.stderr.strip()[-400:]}")
    pairs = scan(given / "images")
    assert len(pairs) >= 3000
    parts = draw_split(pairs, FolderSplit())
    held_out = [c for name in ("val", "test") for p in parts[name] for c in p.captions]
    assert len(held_out) == len(set(held_out)) and len(parts["test"]) >= 800
