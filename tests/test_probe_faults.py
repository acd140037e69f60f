"""The faults a reviewer's probe found (issue 35, items 2 and 5-15): each one now ends in a clear error
naming the file or flag, or in the right result, never a traceback or a silent loss."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_utils.data import text_cache
from distill_utils.experts import trajectories
from distill_utils.app import ablation, buffer, convexify, distill, evaluate
from distill_utils.data import DataError, shapes
from distill_utils.data.datasets import load_image
from distill_utils.students.evaluation import student_seed
from distill_utils.pipeline import stages, sweep
from distill_utils.pipeline.settings import QUICKSTART
from distill_utils.runtime.errors import UsageError
from distill_utils.runtime.runs import RunFolder
from tests.helpers import shapes_args, workdir
from tests.test_user_errors import distill_argv, script_error, write_pair

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 2: independent student seeds
def test_students_of_different_seeds_never_coincide():
    seeds = {student_seed(seed, run) for seed in range(20) for run in range(20)}
    assert len(seeds) == 400  # seed + run made (0, 1) and (1, 0) the same student
    assert student_seed(0, 1) != student_seed(1, 0) and student_seed(3, 2) == student_seed(3, 2)


def test_a_repeated_seed_is_refused_by_the_ablation(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--workdir", str(tmp_path), "--seeds", "0", "0"])
    assert "--seeds names 0 more than once" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5: garbage weights
@pytest.mark.parametrize("content", [b"", b"garbage, not a state dict" * 10])
def test_a_garbage_weights_file_is_named(shapes_root, tmp_path, capsys, content):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "convnet_tiny.pth").write_bytes(content)
    argv = shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--train_epochs", "1", "--buffer_path",
                       str(tmp_path / "b"), "--checkpoint_dir", str(weights))
    argv[argv.index("--image_pretrained") + 1] = "true"
    err = script_error(buffer.main, argv, capsys)
    assert f"weights file {weights / 'convnet_tiny.pth'} cannot be read" in err and "state_dict" in err


# --------------------------------------------------------------------------- 6, 7: damaged trajectory files
def test_a_truncated_trajectory_file_is_named(expert_dirs, tmp_path, capsys):
    _, normal, _, _ = expert_dirs
    folder = tmp_path / "normal"
    shutil.copytree(normal, folder)
    path = folder / "txt_replay_buffer_1.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = script_error(convexify.main, ["--normal_dir", str(folder), "--start", "0", "--end", "3"], capsys)
    assert f"cannot read trajectory file {path}" in err and "truncated" in err


def test_inf_in_a_text_side_tensor_names_the_text_file(shapes_root, expert_dirs, tmp_path, capsys):
    _, normal, _, _ = expert_dirs
    good = trajectories.TrajectoryBuffer(normal).experts()[0]
    folder = tmp_path / "damaged"
    folder.mkdir()
    image = [good.snapshot("image", t) for t in range(4)]
    text = [[p.clone() for p in good.snapshot("text", t)] for t in range(4)]
    text[2][0][0] = float("inf")
    write_pair(folder, 0, image, text)
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, folder), capsys)
    assert "txt_replay_buffer_0.pt[0]: text-side snapshot 2 holds NaN/Inf" in err
    assert "img_replay_buffer_0.pt" not in err.split("holds")[0]


# --------------------------------------------------------------------------- 8: diverged sets and NaN flags
@pytest.mark.parametrize("flag", ["--momentum_syn", "--temperature", "--lr_img", "--alpha", "--clamp_lr"])
def test_nan_and_inf_flags_are_refused_by_name(shapes_root, expert_dirs, tmp_path, capsys, flag):
    _, normal, _, _ = expert_dirs
    for value in ("nan", "inf"):
        err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, flag, value), capsys)
        assert f"argument {flag}" in err and "finite" in err, err


def test_a_diverged_set_scores_no_recall_in_eval_py(shapes_root, expert_dirs, tmp_path, caplog):
    _, normal, _, _ = expert_dirs
    folder = distill.main(distill_argv(shapes_root, tmp_path, normal))
    path = folder / "distilled_0_2.pt"
    payload = torch.load(path, weights_only=True)
    payload["image"] = payload["image"] * 1e30  # finite, but no student can train on it
    torch.save(payload, tmp_path / "huge.pt")
    rows = evaluate.main(shapes_args(shapes_root, tmp_path, "--image_trainable", "--ckpt_path", str(tmp_path / "huge.pt"),
                                     "--num_eval", "1", "--epoch_eval_train", "1", "--baseline"))
    (row,) = rows.values()
    assert row["mean"]["r_mean"] < 100.0 and row["mean"]["r_mean"] < 60.0
    assert "diverged" in caplog.text


# --------------------------------------------------------------------------- 11: data loss
def test_convexify_never_writes_over_its_own_experts(expert_dirs, tmp_path, capsys):
    _, normal, _, _ = expert_dirs
    folder = tmp_path / "normal"
    shutil.copytree(normal, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder, folder / ".." / folder.name):
        err = script_error(convexify.main, ["--normal_dir", str(folder), "--start", "0", "--end", "3", "--out_dir",
                                            str(out), "--overwrite"], capsys)
        assert "--out_dir" in err and "replace the experts" in err
    other = tmp_path / "other_experts"
    shutil.copytree(normal, other)
    err = script_error(convexify.main, ["--normal_dir", str(folder), "--start", "0", "--end", "3", "--out_dir",
                                        str(other), "--overwrite"], capsys)
    assert "holds expert trajectories that buffer.py wrote" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_finished_run_without_its_resume_state_is_never_overwritten(shapes_root, expert_dirs, tmp_path, capsys):
    _, normal, _, _ = expert_dirs
    folder = distill.main(distill_argv(shapes_root, tmp_path, normal))
    (folder / "latest.pt").unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pt", ".json")}
    for extra in ([], ["--resume"]):
        err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, "--lr_img", "0.5", *extra), capsys)
        assert "holds checkpoints" in err and "another --name" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pt", ".json")} == before
    assert (distill.main(distill_argv(shapes_root, tmp_path, normal, name="other")) / "latest.pt").is_file()


# --------------------------------------------------------------------------- 12: experts of another kind
def authors_style_copy(normal: Path, folder: Path) -> Path:
    """The experts as the authors' downloads come: twin files, no meta.json."""
    folder.mkdir(parents=True)
    for path in normal.glob("*_replay_buffer_*.pt"):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("flags, needle", [
    (["--image_trainable", "false", "--out_embedding", "16"], "does not fit the model"),
    (["--image_trainable", "--train_epochs", "2"], "holds experts of 4 snapshots"),
])
def test_experts_of_another_kind_are_not_appended_to_a_folder_without_meta(shapes_root, expert_dirs, tmp_path,
                                                                           capsys, flags, needle):
    _, normal, _, _ = expert_dirs
    root = tmp_path / "buffer"
    folder = authors_style_copy(normal, trajectories.expert_folder(root, "shapes", "convnet_tiny", "tiny_bert",
                                                                   "InfoNCE"))
    argv = shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--train_epochs", "3", "--eval_freq", "3",
                       "--batch_size_train", "32", "--buffer_path", str(root), *flags)
    err = script_error(buffer.main, argv, capsys)
    assert needle in err
    assert trajectories.twin_indices(folder) == [0, 1] and not (folder / "meta.json").exists()


def test_experts_of_the_same_kind_join_a_folder_without_meta_and_write_none(shapes_root, expert_dirs, tmp_path):
    _, normal, _, _ = expert_dirs
    root = tmp_path / "buffer"
    folder = authors_style_copy(normal, trajectories.expert_folder(root, "shapes", "convnet_tiny", "tiny_bert",
                                                                   "InfoNCE"))
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_experts", "1", "--train_epochs", "3",
                       "--eval_freq", "3", "--batch_size_train", "32", "--buffer_path", str(root))
    assert buffer.main(argv) == [2]
    assert not (folder / "meta.json").exists()  # it would claim these flags for experts of unknown ones


# --------------------------------------------------------------------------- 14: the recipes' GPU argument
def test_a_recipe_without_its_gpu_argument_is_refused(tmp_path):
    done = subprocess.run(["bash", "sh/distill.sh", "flickr500"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": "false"})
    assert done.returncode == 2
    assert "first argument is the GPU list" in done.stderr and "bash sh/distill.sh 0 flickr500" in done.stderr


def test_cpu_in_the_gpu_position_hides_every_gpu(tmp_path):
    probe = tmp_path / "python"
    probe.write_text('#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=[$CUDA_VISIBLE_DEVICES]"\n')
    probe.chmod(0o755)
    done = subprocess.run(["bash", "sh/distill.sh", "cpu", "flickr100"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(probe)})
    assert done.returncode == 0, done.stderr
    assert "CUDA_VISIBLE_DEVICES=[]" in done.stdout


# --------------------------------------------------------------------------- 15: damaged side files
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_a_damaged_text_feature_cache_is_rebuilt(tmp_path, caplog, content):
    path = tmp_path / "cache.npz"
    path.write_bytes(content)
    calls = []

    class Encoder:
        def encode(self, captions, batch_size, progress):
            calls.append(len(captions))
            return torch.ones(len(captions), 3)

    got = text_cache.load_or_build(path, ["a b", "c d"], Encoder)
    assert calls == [2] and got.shape == (2, 3) and "unreadable" in caplog.text
    assert np.load(path)["bert_test_embed"].shape == (2, 3)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00 not utf-8", b"[1, 2, 3]"])
def test_a_damaged_meta_json_is_named(expert_dirs, tmp_path, capsys, content):
    _, normal, _, _ = expert_dirs
    folder = tmp_path / "normal"
    shutil.copytree(normal, folder)
    (folder / "meta.json").write_bytes(content)
    err = script_error(convexify.main, ["--normal_dir", str(folder), "--start", "0", "--end", "3"], capsys)
    assert f"{folder / 'meta.json'}" in err and "delete it" in err


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"[1]"])
def test_a_damaged_shapes_meta_makes_the_data_again(tmp_path, content):
    config = shapes.ShapesConfig(num_train=4, num_val=2, num_test=2, image_size=8)
    shapes.generate(tmp_path, config, progress=False)
    (tmp_path / "shapes_meta.json").write_bytes(content)
    shapes.generate(tmp_path, config, progress=False)
    assert json.loads((tmp_path / "shapes_meta.json").read_text())["num_train"] == 4


def test_an_enormous_image_is_named(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then beyond twice the limit
    with pytest.raises(DataError, match=r"huge\.png is too large to decode safely.*Shrink it"):
        load_image(path)


def test_an_empty_caption_is_named(shapes_root, tmp_path, capsys):
    ann = tmp_path / "ann"
    shutil.copytree(shapes_root, ann, ignore=shutil.ignore_patterns("*.png"))
    entries = json.loads((ann / "shapes_train.json").read_text())
    entries[3]["caption"] = " ... "
    (ann / "shapes_train.json").write_text(json.dumps(entries))
    argv = shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--train_epochs", "1", "--buffer_path",
                       str(tmp_path / "b"), "--ann_root", str(ann))
    err = script_error(buffer.main, argv, capsys)
    assert "shapes_train.json, entry 3" in err and "no words" in err


# --------------------------------------------------------------------------- 13: advice the command takes
def test_a_run_that_stops_inside_the_ablation_gets_the_ablations_advice(monkeypatch, tmp_path):
    def stops(argv):
        raise FloatingPointError("phase 0, iteration 3: NaN. Lower --lr_img, then rerun with --resume --name x.")

    monkeypatch.setattr(distill, "main", stops)
    with pytest.raises(UsageError) as error:
        sweep.distill_run(workdir(tmp_path), RunFolder(tmp_path / "lors_b4_s0_abc"), ["--lr_img", "1"])
    text = str(error.value)
    assert text.startswith(f"ablation run {tmp_path / 'lors_b4_s0_abc'} stopped: phase 0, iteration 3")
    assert "--resume and --name are set for you" in text and "run the same ablation command again" in text


# --------------------------------------------------------------------------- 1: the quick start's stages
def test_the_quick_starts_stages_are_keyed_by_what_decides_them(tmp_path):
    from dataclasses import replace
    s, work = QUICKSTART["smoke"], workdir(tmp_path)
    assert stages.encoder_folder(s, work) != stages.encoder_folder(replace(s, seed=1), work)
    assert stages.encoder_folder(s, work) != stages.encoder_folder(replace(s, pretrain_epochs=2), work)
    assert stages.data_folder(s, work) != stages.data_folder(replace(s, num_train=30), work)
    assert stages.data_folder(s, work) == stages.data_folder(replace(s, seed=1), work)  # fixed data
    assert not any(tmp_path.iterdir())  # naming a folder makes nothing
