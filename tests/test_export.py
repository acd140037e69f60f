"""Distilled sets others load without this code: eval.py --export on a quick-start run, loaded back with
Hugging Face datasets and safetensors, evaluated again with eval.py --synthetic (the same figures), and
exports that are incomplete, damaged or in the way refused by name."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.outputs import export
from distill_utils.app import evaluate, quickstart
from distill_utils.runtime.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ["--num_eval", "1", "--epoch_eval_train", "2", "--baseline", "random", "--num_workers", "0"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quick")
    report = quickstart.main(["--workdir", str(work), "--preset", "smoke"])
    (run,) = (work / "logged_files" / "shapes").glob("quickstart_*")
    return work, report.parent, run


def test_the_quick_start_exports_its_set_and_the_export_holds_the_exact_tensors(quick_run):
    _, report, run = quick_run
    folder = report / quickstart.EXPORT
    subsets, flags = export.load_export(folder)
    saved = [checkpoint.load_distilled(p)[0] for p in RunFolder(run).final_checkpoints()]
    assert len(subsets) == len(saved) == 2
    for got, want in zip(subsets, saved):
        assert torch.equal(got.images, want.images) and torch.equal(got.texts, want.texts)
        assert torch.equal(got.similarity, want.similarity)
        assert (got.lr_img, got.lr_txt) == (want.lr_img, want.lr_txt)
    assert flags["Iteration"] == [2, 2] and flags["dataset"] == "shapes"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n") and "task_categories:" in card
    assert "# PTM-ST: shapes distilled into 8 synthetic pairs" in card and "2 phases of 4 + 4 pairs" in card
    recall = json.loads((report / "eval_results.json").read_text())["rows"]["PTM-ST (8 pairs)"]["mean"]["r_mean"]
    assert f"| {recall:.2f} ± 0.00 |" in card  # the recall the quick start measured, with its protocol
    assert "paper protocol" in card


def test_an_export_loads_with_datasets_and_safetensors(quick_run):
    datasets = pytest.importorskip("datasets")
    from safetensors.torch import load_file
    folder = quick_run[1] / quickstart.EXPORT
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    assert loaded.num_rows == 8 and loaded[0]["image"].size == (16, 16) and loaded[0]["phase"] == 0
    assert len(loaded[0]["nearest_captions"]) == 3 and loaded[7]["phase"] == 1
    tensors = load_file(str(folder / export.TENSORS))
    assert tensors["images"].shape == (8, 3, 16, 16) and tensors["phase"].tolist() == [0] * 4 + [1] * 4
    # the PNG is the normalised tensor un-normalised: within one grey level of it
    pixels = torch.tensor(list(loaded[3]["image"].getdata()), dtype=torch.float32).view(16, 16, 3)
    assert (pixels - export.unnormalised(tensors["images"][3:4])[0].float()).abs().max() <= 1


def test_nearest_captions_are_the_highest_cosines():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    found = export.nearest_captions(torch.tensor([[2.0, 0.1]]), real, ["x", "y", "xy"], k=2)
    assert [c for c, _ in found[0]] == ["x", "xy"]
    assert found[0][0][1] == pytest.approx(2.0 / (2.0 ** 2 + 0.01) ** 0.5, abs=1e-4)


def eval_py(*flags):
    return subprocess.run([sys.executable, "eval.py", *flags], cwd=ROOT, capture_output=True, text=True)


def test_eval_synthetic_gives_exactly_the_runs_figures(quick_run, tmp_path):
    _, _, run = quick_run
    rows = evaluate.main(["--run", str(run), *STUDENTS, "--out_dir", str(tmp_path / "a"),
                          "--export", str(tmp_path / "set")])
    again = evaluate.main(["--synthetic", str(tmp_path / "set"), *STUDENTS])
    assert again == rows
    assert (tmp_path / "set_evaluations" / "eval_results.json").is_file()  # beside the export, not inside it
    assert not (tmp_path / "set" / "eval_results.json").exists()


def test_an_existing_export_is_kept_unless_overwrite_and_refused_before_any_student(quick_run, tmp_path):
    _, report, run = quick_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    done = eval_py("--run", str(run), *STUDENTS, "--export", str(taken))
    assert done.returncode != 0 and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    assert "PTM-ST (8 pairs)" not in done.stdout  # refused before the students trained
    assert (taken / "mine.txt").read_text() == "keep me"
    evaluate.main(["--run", str(run), *STUDENTS, "--out_dir", str(tmp_path / "o"), "--export", str(taken),
                   "--overwrite"])
    assert not (taken / "mine.txt").exists() and export.load_export(taken)[0]
    assert not list(tmp_path.glob(".taken.*"))  # no partial or old copy left
    alone = eval_py("--run", str(run), *STUDENTS, "--overwrite")
    assert alone.returncode == 2 and "--overwrite replaces an --export folder" in alone.stderr


def copy_of(report, tmp_path):
    import shutil
    target = tmp_path / "copy"
    shutil.copytree(report / quickstart.EXPORT, target)
    return target


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "train" / "00003.png").unlink(), "train/00003.png is missing"),
    (lambda d: (d / export.TENSORS).write_bytes((d / export.TENSORS).read_bytes()[:-40]),
     "synthetic.safetensors does not match manifest.json"),
    (lambda d: (d / "args.json").write_text("{}"), "args.json does not match manifest.json"),
    (lambda d: (d / export.MANIFEST).unlink(), "manifest.json is missing"),
    (lambda d: (d / export.MANIFEST).write_text("[1, 2"), "cannot be read as a manifest"),
])
def test_a_damaged_export_is_refused_by_name(quick_run, tmp_path, damage, named):
    folder = copy_of(quick_run[1], tmp_path)
    damage(folder)
    with pytest.raises(export.ExportError, match=named):
        export.load_export(folder)
    done = eval_py("--synthetic", str(folder), *STUDENTS)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert named.split(" ")[0].split("/")[-1] in done.stderr


def test_a_damaged_tensor_file_with_a_matching_manifest_is_refused(quick_run, tmp_path):
    folder = copy_of(quick_run[1], tmp_path)
    (folder / export.TENSORS).write_bytes(b"\x00" * 64)
    manifest = json.loads((folder / export.MANIFEST).read_text())
    manifest["sha256"][export.TENSORS] = export.digest(folder / export.TENSORS)
    (folder / export.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(export.ExportError, match="synthetic.safetensors cannot be read"):
        export.load_export(folder)


def test_a_failed_write_leaves_no_export(quick_run, tmp_path, monkeypatch):
    subsets, flags = export.load_export(quick_run[1] / quickstart.EXPORT)
    facts = export.CardFacts("PTM-ST", "shapes", "convnet_tiny", "tiny_bert", flags=flags)
    nearest = [[("c", 1.0)]] * 8
    from PIL import Image
    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(export.ExportError, match="No space left on device"):
        export.write_export(tmp_path / "set", subsets, facts, nearest)
    assert not (tmp_path / "set").exists() and not list(tmp_path.iterdir())
