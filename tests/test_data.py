"""Loaders on a generated folder, caption normalisation, and every bad input."""
import json
import shutil

import pytest
import torch

from distill_utils.data import DataError, build_datasets, pre_caption, shapes


def test_pre_caption():
    assert pre_caption('  A Dog (brown)!  runs; "fast"... ') == "a dog brown runs fast"
    assert pre_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))
    assert pre_caption("a~b#c*d:e") == "a b c d e"


def test_shapes_is_deterministic_and_complete(tmp_path):
    config = shapes.ShapesConfig(num_train=6, num_val=3, num_test=3, image_size=16, seed=7)
    shapes.generate(tmp_path / "a", config, progress=False)
    shapes.generate(tmp_path / "b", config, progress=False)
    for name in ("shapes_train.json", "shapes_val.json", "shapes_test.json", "images/train_00003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train = json.loads((tmp_path / "a" / "shapes_train.json").read_text())
    assert len(train) == 6 * 5 and set(train[0]) == {"image", "caption", "image_id"}
    other = shapes.ShapesConfig(num_train=6, num_val=3, num_test=3, image_size=16, seed=8)
    shapes.generate(tmp_path / "c", other, progress=False)
    assert (tmp_path / "c" / "shapes_train.json").read_bytes() != (tmp_path / "a" / "shapes_train.json").read_bytes()


def test_shapes_captions_name_the_shape_colours():
    import random
    rng = random.Random(0)
    for _ in range(50):
        items, background = shapes.random_scene(rng)
        for caption in shapes.captions_for(items, background, rng):
            for item in items:
                assert item.colour in caption
                assert any(noun in caption for noun in shapes.SHAPES[item.kind])


def test_loaders_on_shapes(shapes_root):
    train, val, test = build_datasets("shapes", str(shapes_root), str(shapes_root), image_size=16)
    assert len(train) == 24 * 5 and len(val) == 8 and len(test) == 8
    image, index = train[3]
    assert image.shape == (3, 16, 16) and index == 3
    assert train.captions[3] == pre_caption(train.captions[3])
    assert len(test.text) == 40 and test.img2txt[2] == [10, 11, 12, 13, 14] and test.txt2img[12] == 2
    image, index = test[1]
    assert image.shape == (3, 16, 16) and index == 1
    # the test transform is deterministic; the training one augments
    assert torch.equal(test[1][0], test[1][0])


def test_image_and_annotation_roots_are_honoured(shapes_root, tmp_path):
    annotations, images = tmp_path / "ann", tmp_path / "img"
    annotations.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(shapes_root / f"shapes_{split}.json", annotations)
    shutil.copytree(shapes_root / "images", images / "images")
    train, _, test = build_datasets("shapes", str(images), str(annotations), image_size=16, augment=False)
    assert train[0][0].shape == (3, 16, 16) and test[0][0].shape == (3, 16, 16)


def _copy(shapes_root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(shapes_root, target)
    return target


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"shapes_train\.json does not exist.*distill_utils\.app\.shapes"):
        build_datasets("shapes", str(tmp_path), str(tmp_path))
    with pytest.raises(DataError, match=r"flickr30k_train\.json does not exist.*hf download"):
        build_datasets("flickr", str(tmp_path), str(tmp_path))


def test_malformed_json_and_entries(shapes_root, tmp_path):
    root = _copy(shapes_root, tmp_path)
    (root / "shapes_val.json").write_text("[{\"image\": ")
    with pytest.raises(DataError, match=r"shapes_val\.json is not valid JSON"):
        build_datasets("shapes", str(root), str(root))
    (root / "shapes_val.json").write_text(json.dumps([{"image": "images/val_00000.png"}]))
    with pytest.raises(DataError, match=r"shapes_val\.json, entry 0, lacks the key\(s\) \['caption'\]"):
        build_datasets("shapes", str(root), str(root))


def test_missing_and_corrupt_images(shapes_root, tmp_path):
    root = _copy(shapes_root, tmp_path)
    train, _, _ = build_datasets("shapes", str(root), str(root), image_size=16)
    (root / train.images[0]).unlink()
    with pytest.raises(DataError, match=r"train_00000\.png does not exist.*--image_root"):
        train[0]
    (root / train.images[5]).write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"train_00001\.png cannot be decoded.*corrupt"):
        train[5]


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        build_datasets("imagenet")


def test_decoded_cache_keeps_images(shapes_root):
    train, _, _ = build_datasets("shapes", str(shapes_root), str(shapes_root), image_size=16, cache_decoded=True)
    train[0]
    train[1]  # the second caption of the same image: no new decode
    assert len(train.folder.cache) == 1
