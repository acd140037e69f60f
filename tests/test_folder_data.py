"""Any folder of images with caption files is a dataset: a deterministic split written once as
Flickr-layout JSON, duplicate captions kept out of val/test, bad folders refused naming the file."""
import json
from pathlib import Path

import pytest
from PIL import Image

from distill_utils.data import DataError, FolderSplit, build_datasets, load_image
from distill_utils.data import folder as folder_data
from distill_utils.data.captions import pre_caption

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey", "cyan"]


def make_folder(root: Path, n: int = 12, duplicates: int = 0, alpha: bool = False) -> Path:
    """``n`` images in two sub-folders; the last ``duplicates`` share the caption "A thing."."""
    for i in range(n):
        sub = root / ("a" if i % 2 else "b") / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        mode = "RGBA" if alpha else "RGB"
        Image.new(mode, (10 + i, 8), (20 * i % 255, 40, 60, 0 if alpha else 255)[:len(mode)]).save(sub / f"img{i}.png")
        caption = "A thing." if i >= n - duplicates else f"A {COLOURS[i]} square.\nSquare number {i}."
        (sub / f"img{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_split_is_written_once_in_the_flickr_layout_and_is_deterministic(tmp_path):
    images = make_folder(tmp_path / "images")
    split = FolderSplit(val_fraction=0.25, test_fraction=0.25, seed=3)
    train, val, test = build_datasets("folder", str(images), str(tmp_path / "ann1"), image_size=8, split=split)
    build_datasets("folder", str(images), str(tmp_path / "ann2"), image_size=8, split=split)
    for name in folder_data.SPLIT_FILES:
        assert read(tmp_path / "ann1" / name) == read(tmp_path / "ann2" / name)  # same seed, same split
    train_entries = read(tmp_path / "ann1" / "folder_train.json")
    assert all(set(e) == {"image", "caption", "image_id"} and isinstance(e["caption"], str) for e in train_entries)
    test_entries = read(tmp_path / "ann1" / "folder_test.json")
    assert all(isinstance(e["caption"], list) for e in test_entries)
    assert (len(train), len(val), len(test)) == (6, 3, 3)
    held = {e["image"] for e in test_entries} | {e["image"] for e in read(tmp_path / "ann1" / "folder_val.json")}
    assert not held & {e["image"] for e in train_entries}
    assert len(held | {e["image"] for e in train_entries}) == 12
    assert train.captions[0] == pre_caption(train_entries[0]["caption"])  # the first line only
    other = FolderSplit(val_fraction=0.25, test_fraction=0.25, seed=4)
    build_datasets("folder", str(images), str(tmp_path / "ann3"), image_size=8, split=other)
    assert read(tmp_path / "ann3" / "folder_test.json") != test_entries  # the seed draws


def test_the_split_goes_beside_the_images_by_default_and_another_split_is_refused(tmp_path):
    images = make_folder(tmp_path / "images")
    build_datasets("folder", str(images), None, image_size=8, split=FolderSplit(0.25, 0.25))
    assert (images / "folder_split.json").is_file()
    with pytest.raises(DataError, match="drawn with .* not the requested"):
        build_datasets("folder", str(images), None, image_size=8, split=FolderSplit(0.25, 0.25, seed=1))


def test_a_changed_folder_is_refused(tmp_path):
    images = make_folder(tmp_path / "images")
    build_datasets("folder", str(images), str(tmp_path / "ann"), image_size=8, split=FolderSplit(0.25, 0.25))
    (images / "b" / "deeper" / "img0.txt").write_text("A changed caption.", encoding="utf-8")
    with pytest.raises(DataError, match="changed since the split"):
        build_datasets("folder", str(images), str(tmp_path / "ann"), image_size=8, split=FolderSplit(0.25, 0.25))


def test_images_sharing_a_caption_stay_in_train(tmp_path):
    images = make_folder(tmp_path / "images", duplicates=4)
    for seed in range(5):
        ann = tmp_path / f"ann{seed}"
        _, val, test = build_datasets("folder", str(images), str(ann), image_size=8,
                                      split=FolderSplit(0.25, 0.25, seed))
        assert "a thing" not in val.text + test.text
        assert len(set(val.text + test.text)) == len(val.text + test.text)  # each caption names one image
        record = read(ann / "folder_split.json")
        assert record["images_sharing_a_caption"] == 4
        assert sum(1 for e in read(ann / "folder_train.json") if e["caption"] == "A thing.") == 4


@pytest.mark.parametrize("encoded", [
    "\ufeffA thing.  \r\nsecond line\r\n".encode("utf-8"),      # Notepad's UTF-8: a byte-order mark, CRLF
    "A thing.\t \n\n  other words\n".encode("utf-8"),             # trailing blanks, several lines
    "\ufeffA thing.\r\n".encode("utf-16-le"),                     # Windows' "Unicode": UTF-16 with a mark
    "\ufeffA thing.\r\n".encode("utf-16-be"),
    "A thing.\rold Mac line end\r".encode("utf-8"),
])
def test_captions_as_editors_save_them_are_the_caption_a_person_reads(tmp_path, encoded):
    images = make_folder(tmp_path / "images", duplicates=1)  # img11 says "A thing." in plain UTF-8
    (tmp_path / "images" / "b" / "deeper" / "img10.txt").write_bytes(encoded)
    pairs = folder_data.scan(tmp_path / "images")
    (saved,) = [p for p in pairs if p.image.endswith("img10.png")]
    assert saved.captions == ("A thing.",)
    # the duplicate rule sees the cleaned caption: both images stay in train
    _, val, test = build_datasets("folder", str(tmp_path / "images"), str(tmp_path / "ann"), image_size=8,
                                  split=FolderSplit(0.25, 0.25, 0))
    assert "a thing" not in val.text + test.text
    assert read(tmp_path / "ann" / "folder_split.json")["images_sharing_a_caption"] == 2


def test_every_line_as_a_caption(tmp_path):
    images = make_folder(tmp_path / "images")
    train, _, test = build_datasets("folder", str(images), str(tmp_path / "ann"), image_size=8,
                                    split=FolderSplit(0.25, 0.25, captions="all"))
    assert len(train) == 12  # 6 images x 2 lines
    assert all(len(captions) == 2 for captions in test.img2txt)


def test_transparent_images_are_composited_on_white(tmp_path):
    path = tmp_path / "cutout.png"
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)  # transparent: white, not black
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("fault, message", [
    ("no_images", "holds no .png"),
    ("missing_caption", "has no caption file img3.txt"),
    ("binary_caption", "binary data"),
    ("latin1_caption", "neither UTF-8 nor UTF-16"),
    ("empty_caption", "holds no caption"),
    ("unreadable_image", "cannot be decoded"),
    ("too_few", "cannot be split"),
])
def test_bad_folders_get_a_message_naming_the_file(tmp_path, fault, message):
    images = make_folder(tmp_path / "images", n=2 if fault == "too_few" else 12)
    some = images / "a" / "deeper" / "img3"
    if fault == "no_images":
        for png in images.rglob("*.png"):
            png.unlink()
    elif fault == "missing_caption":
        some.with_suffix(".txt").unlink()
    elif fault == "binary_caption":
        some.with_suffix(".txt").write_bytes(b"\x00\x01PNG")
    elif fault == "latin1_caption":
        some.with_suffix(".txt").write_bytes("Une tête.".encode("latin-1"))
    elif fault == "empty_caption":
        some.with_suffix(".txt").write_text("  \n...\n")
    elif fault == "unreadable_image":
        some.with_suffix(".png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=message) as error:
        train, val, test = build_datasets("folder", str(images), str(tmp_path / "ann"), image_size=8,
                                          split=FolderSplit(0.25, 0.25))
        for dataset in (train, val, test):
            for index in range(len(dataset)):
                dataset[index]
    if fault not in ("no_images", "too_few"):
        assert "img3" in str(error.value)
    assert not (tmp_path / "ann" / "folder_train.json").exists() or fault == "unreadable_image"


def test_folder_needs_an_image_root():
    with pytest.raises(DataError, match="needs --image_root"):
        build_datasets("folder", None, None)


@pytest.mark.parametrize("name", ["folder_train.json", "folder_val.json", "folder_test.json"])
def test_a_cut_split_file_names_the_file_to_delete_and_following_that_advice_works(tmp_path, name):
    import re
    images = make_folder(tmp_path / "images")
    ann = tmp_path / "ann"
    build_datasets("folder", str(images), str(ann), image_size=8)
    before = {p.name: p.read_text() for p in ann.glob("folder_*.json")}
    cut = ann / name
    cut.write_text(cut.read_text()[: len(cut.read_text()) // 2])
    with pytest.raises(DataError) as caught:
        build_datasets("folder", str(images), str(ann), image_size=8)
    (named,) = re.findall(r"delete (\S+) and run the same command again", str(caught.value))
    assert Path(named) == cut and "download" not in str(caught.value)
    Path(named).unlink()  # the advice, followed literally
    build_datasets("folder", str(images), str(ann), image_size=8)
    assert {p.name: p.read_text() for p in ann.glob("folder_*.json")} == before  # the same split again


def add_pair(folder: Path, name: str, colour=(9, 9, 9)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (9, 7), colour).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"A picture called {name}.\n", encoding="utf-8")


def test_a_linked_folder_is_read_and_a_loop_or_second_path_is_named(tmp_path, caplog):
    images = make_folder(tmp_path / "images")
    add_pair(tmp_path / "elsewhere", "outside")
    (images / "linked").symlink_to(tmp_path / "elsewhere")         # a folder kept outside the tree
    (images / "a" / "back_to_root").symlink_to(images)             # a loop
    (images / "again").symlink_to(images / "b")                    # a second path to a folder of the tree
    with caplog.at_level("INFO", logger="ptmst.data"):
        build_datasets("folder", str(images), str(tmp_path / "ann"), image_size=8, split=FolderSplit(0.25, 0.25))
    record = read(tmp_path / "ann" / "folder_split.json")
    assert record["pairs"] == 13  # the 12 of the tree and the linked folder's one, each once
    left = {item["path"]: item["reason"] for item in record["left_out"]}
    assert set(left) == {"a/back_to_root", "again"}
    assert all("read already" in reason for reason in left.values())
    train = read(tmp_path / "ann" / "folder_train.json")
    held = read(tmp_path / "ann" / "folder_val.json") + read(tmp_path / "ann" / "folder_test.json")
    assert "linked/outside.png" in {e["image"] for e in train + held}
    summary = [r.getMessage() for r in caplog.records if "pairs found" in r.getMessage()]
    assert summary and "13 image-caption pairs found" in summary[0] and "2 files left out" in summary[0]
    assert "again (" in summary[0]


def test_files_the_reader_does_not_take_are_named_with_their_reason(tmp_path, caplog):
    images = make_folder(tmp_path / "images")
    Image.new("RGB", (4, 4)).save(images / "a" / "animated.gif")
    (images / "a" / "animated.txt").write_text("A gif.\n")
    (images / "notes.md").write_text("# my notes\n")
    (images / "dangling.png").symlink_to(tmp_path / "gone.png")
    add_pair(tmp_path / "elsewhere", "far")
    (images / "b" / "far.png").symlink_to(tmp_path / "elsewhere" / "far.png")  # a linked file is used
    (images / "b" / "far.txt").symlink_to(tmp_path / "elsewhere" / "far.txt")
    found = folder_data.scan_folder(images)
    assert "b/far.png" in {p.image for p in found.pairs} and len(found.pairs) == 13
    left = {item.path: item.reason for item in found.left_out}
    assert set(left) == {"a/animated.gif", "a/animated.txt", "notes.md", "dangling.png"}
    assert "convert it to .png" in left["a/animated.gif"]
    assert "without an image" in left["a/animated.txt"]
    assert "does not exist" in left["dangling.png"]
    assert "not an image" in left["notes.md"]
    summary = found.summary(images, shown=2)
    assert "13 image-caption pairs found; 4 files left out" in summary and "and 2 more" in summary


def test_a_folder_without_surprises_says_so_and_keeps_its_digest(tmp_path):
    images = make_folder(tmp_path / "images")
    (images / folder_data.PREPARED_RECORD).write_text("{}")  # what the preparation scripts leave beside the pairs
    build_datasets("folder", str(images), None, image_size=8, split=FolderSplit(0.25, 0.25))
    found = folder_data.scan_folder(images)
    assert found.left_out == [] and found.summary(images).endswith("no file left out")
    # the order (and so the digest every recorded split holds) is that of sorted paths, as it always was
    brute = sorted(p for p in images.rglob("*.png"))
    assert [p.image for p in found.pairs] == [p.relative_to(images).as_posix() for p in brute]
