"""The shell recipes in sh/: one interface (GPU then DATASET or RECIPE, further flags passed through and
winning), every paper recipe valid, and the nine recipes run end to end through the scripts at toy
scale, one of them with the real NFNet-L0 and BERT-base architectures."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils.app import buffer, distill, evaluate
from distill_utils.data import shapes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [f"{d}{n}" for d in ("flickr", "coco", "cc3m") for n in (500, 200, 100)]
LAYOUT = {"flickr": "flickr30k_{}.json", "coco": "coco_karpathy_{}.json", "cc3m": "cc3m_captions_{}.json"}


def recorded_argv(tmp_path, script, *args, env=None):
    """Run ``bash sh/SCRIPT args`` with a stand-in Python that records its arguments; return them."""
    log = tmp_path / "argv.jsonl"
    log.unlink(missing_ok=True)
    stub = tmp_path / "python_stub"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; "
                    f"open(\"{log}\", \"a\").write(json.dumps(sys.argv[1:]) + \"\\n\")' \"$@\"\n")
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "sh" / script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(stub), **(env or {})})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates_and_passes_further_flags_through(tmp_path, recipe):
    done, calls = recorded_argv(tmp_path, "distill.sh", "0", recipe, "--keep_graphs", "0", "--lr_sim", "3")
    assert done.returncode == 0, done.stderr
    (script, *argv), = calls
    assert script == "distill_ptm-st.py"
    args = distill.parse_args(argv)
    assert args.dataset == recipe[:-3] and args.name == recipe
    assert sum(args.num_queries) == int(recipe[-3:]) - 1 and len(distill.phase_specs(args)) == args.subset_num
    assert args.keep_graphs == 0 and args.lr_sim == 3.0  # given after the recipe: they win
    assert args.image_trainable == (args.dataset != "cc3m") and args.sim_type == "full"  # cc3m frozen, as theirs


def test_buffer_recipe_takes_one_dataset_and_torchrun_on_request(tmp_path):
    done, calls = recorded_argv(tmp_path, "buffer.sh", "0", "coco", "--num_experts", "3")
    assert done.returncode == 0, done.stderr
    (script, *argv), = calls
    args = buffer.parse_args(argv)
    assert script == "buffer.py" and args.dataset == "coco" and args.num_experts == 3
    assert args.image_root == "./distill_utils/data/COCO/"
    done, _ = recorded_argv(tmp_path, "buffer.sh", "0", "imagenet")
    assert done.returncode == 2 and "unknown dataset 'imagenet'" in done.stderr
    done, calls = recorded_argv(tmp_path, "buffer.sh", "0")  # the authors' `bash sh/buffer.sh 0`: Flickr only
    assert done.returncode == 0 and len(calls) == 1 and buffer.parse_args(calls[0][1:]).dataset == "flickr"
    done, _ = recorded_argv(tmp_path, "buffer.sh")
    assert done.returncode == 2 and "Usage: bash sh/buffer.sh GPU [DATASET" in done.stderr


def test_eval_and_convexify_recipes(tmp_path):
    done, calls = recorded_argv(tmp_path, "eval.sh", "1", "cc3m200", "--eval_protocol", "val")
    (script, *argv), = calls
    assert script == "eval.py" and argv[argv.index("--run") + 1] == "./logged_files/cc3m/cc3m200"
    assert argv[-2:] == ["--eval_protocol", "val"]
    done, calls = recorded_argv(tmp_path, "convexify.sh", "flickr", "--overwrite")
    assert [c[c.index("--end") + 1] for c in calls] == ["6", "8"] and all(c[-1] == "--overwrite" for c in calls)
    done, _ = recorded_argv(tmp_path, "distill.sh", "0", "flickr50")
    assert done.returncode == 2 and "unknown recipe 'flickr50'" in done.stderr


def test_eval_takes_flags_and_checkpoints_from_a_run_folder(shapes_root, expert_dirs, tmp_path):
    from tests.test_distill import distill_argv
    _, normal, shortcut, _ = expert_dirs
    folder = distill.main(distill_argv(shapes_root, tmp_path, [shortcut, normal]))
    args = evaluate.parse_args(["--run", str(folder), "--num_eval", "1"])
    assert args.ckpt_path == [str(folder / "distilled_0_4.pt"), str(folder / "distilled_1_4.pt")]
    assert (args.dataset, args.image_encoder, args.text_encoder, args.image_size, args.image_trainable) == \
        ("shapes", "convnet_tiny", "tiny_bert", 16, True)
    assert evaluate.parse_args(["--run", str(folder), "--image_size", "32"]).image_size == 32  # given wins
    (folder / "distilled_1_4.pt").unlink()
    with pytest.raises(evaluate.checkpoint.CheckpointError, match="distilled_1_4.pt not there yet.*--resume"):
        evaluate.parse_args(["--run", str(folder)])


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stand_in_data(tmp_path_factory):
    """The built-in generator's images and captions under each dataset's own annotation file names."""
    root = tmp_path_factory.mktemp("stand_in")
    shapes.generate(root / "images_root", shapes.ShapesConfig(num_train=60, num_val=8, num_test=8, image_size=16,
                                                              seed=5), progress=False)
    annotations = root / "Annotation"
    annotations.mkdir()
    for pattern in LAYOUT.values():
        for split in ("train", "val", "test"):
            shutil.copy(root / "images_root" / f"shapes_{split}.json", annotations / pattern.format(split))
    return root


def reproduce(root, recipe, gpu_env, extra_env):
    env = {**os.environ, "PYTHON": sys.executable, "ANN_ROOT": str(root / "Annotation"),
           "IMAGE_ROOT": str(root / "images_root"), "BUFFER_ROOT": str(root / "buffer"),
           "LOGGED_DIR": str(root / "logged"), "SKIP_DATA": "1", "NUM_EXPERTS": "1", **extra_env}
    return subprocess.run(["bash", str(ROOT / "sh" / "reproduce.sh"), gpu_env, recipe], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)


def tiny_flags(root, recipe):
    phases = 1 if recipe.endswith("100") else 2
    data = f"--image_size 16 --num_workers 0 --npz_dir {root / 'npz'} --image_pretrained false"
    return {"ENCODERS": "convnet_tiny_tiny_bert",
            "BUFFER_FLAGS": f"{data} --image_encoder convnet_tiny --text_encoder tiny_bert --train_epochs 7 "
                            f"--eval_freq 7 --batch_size_train 128",
            "DISTILL_FLAGS": f"{data} --image_encoder convnet_tiny --text_encoder tiny_bert "
                             f"--Iteration {' '.join(['2'] * phases)} --eval_it 2 --num_eval 1 --epoch_eval_train 1 "
                             f"--syn_steps 2 --mini_batch_size 8 --lr_img 0.1 --lr_txt 0.1 --lr_sim 0.01 --lr_lr 0",
            "EVAL_FLAGS": "--num_eval 1 --epoch_eval_train 1 --num_workers 0"}


@pytest.mark.slow
def test_the_nine_recipes_run_end_to_end_and_a_second_call_continues(stand_in_data):
    root = stand_in_data
    for recipe in RECIPES:
        done = reproduce(root, recipe, "", tiny_flags(root, recipe))
        assert done.returncode == 0, f"{recipe}:\n{done.stderr[-3000:]}"
        dataset = recipe[:-3]
        table = (root / "logged" / dataset / recipe / "eval_results.md").read_text()
        assert f"PTM-ST ({int(recipe[-3:]) - 1} pairs)" in table and "random real subset" in table
    again = reproduce(root, "coco200", "", tiny_flags(root, "coco200"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "experts: 1 of 1 already there" in again.stderr and "is finished" in again.stderr
    assert "2 expert(s) written" not in again.stdout  # shortcut files were skipped, not redone


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    """Random weights written where a download would be found: an NFNet-L0 state dict for --checkpoint_dir
    and a BERT-base folder from save_pretrained (with the bert-base-uncased vocabulary the MiniLM package
    ships), read through the same code path as real ones."""
    from transformers import BertConfig, BertModel

    from networks import create_image_encoder
    from networks.text_encoders import _vocab_tokenizer
    weights = tmp_path_factory.mktemp("weights")
    torch.save(create_image_encoder("nfnet_l0").state_dict(), weights / "nfnet_l0.pth")
    BertModel(BertConfig()).save_pretrained(weights / "bert-base-uncased")
    _vocab_tokenizer().save_pretrained(weights / "bert-base-uncased")
    return weights


def real_model_flags(weights, tmp_path, train_epochs=2):
    data = f"--image_size 32 --num_workers 0 --npz_dir {tmp_path / 'npz'} --checkpoint_dir {weights}"
    return {"SHORTCUT_ENDS": "3 3", "BUFFER_ROOT": str(tmp_path / "buffer"), "LOGGED_DIR": str(tmp_path / "logged"),
            "BUFFER_FLAGS": f"{data} --train_epochs {train_epochs} --eval_freq 2 --batch_size_train 128",
            "DISTILL_FLAGS": f"{data} --Iteration 2 --eval_it 2 --num_eval 1 --epoch_eval_train 1 --syn_steps 2 "
                             f"--mini_batch_size 8 --lr_img 0.1 --lr_txt 0.1 --lr_sim 0.01 --lr_lr 0",
            "EVAL_FLAGS": "--num_eval 1 --epoch_eval_train 1 --num_workers 0"}


@pytest.mark.slow
def test_a_recipe_runs_with_the_real_nfnet_l0_and_bert_base(stand_in_data, stand_in_weights, tmp_path):
    done = reproduce(stand_in_data, "flickr100", "", real_model_flags(stand_in_weights, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "buffer/flickr/nfnet_bert/InfoNCE/normal/meta.json").read_text())
    assert meta["image_encoder"] == "nfnet" and len(meta["image_params"]) > 100  # the whole NFNet-L0
    assert sum(torch.Size(shape).numel() for _, shape in meta["image_params"]) > 30_000_000
    assert "PTM-ST (99 pairs)" in (tmp_path / "logged/flickr/flickr100/eval_results.md").read_text()


def authors_text_head(generator):
    """Their text projection head from 768-d BERT features to NFNet-L0's 2304, in its parameter order:
    projection.weight, projection.bias, fc.weight, fc.bias, layer_norm.weight, layer_norm.bias."""
    shapes = [(2304, 768), (2304,), (2304, 2304), (2304,), (2304,), (2304,)]
    return [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]


@pytest.mark.slow
def test_trajectories_written_as_the_authors_buffer_py_writes_them_run_through_every_stage(
        stand_in_data, stand_in_weights, tmp_path):
    """One trajectory per file, plain torch.save of [trajectory], no meta.json, parameters in the order of
    their model: timm nfnet_l0 (num_classes=0, average pooling) inside their image wrapper, then their
    text projection head. reproduce.sh finds the expert there (NUM_EXPERTS=1) and trains none."""
    import timm
    normal = tmp_path / "buffer/flickr/nfnet_bert/InfoNCE/normal"
    normal.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    image = [p.detach().clone() for p in timm.create_model("nfnet_l0", num_classes=0, global_pool="avg").parameters()]
    text = authors_text_head(generator)
    image_trajectory, text_trajectory = [], []
    for _ in range(3):  # epochs 0, 1, 2
        image_trajectory.append([p.clone() for p in image])
        text_trajectory.append([p.clone() for p in text])
        image = [p + 1e-3 * torch.randn(p.shape, generator=generator) for p in image]
        text = [p + 1e-3 * torch.randn(p.shape, generator=generator) for p in text]
    torch.save([image_trajectory], normal / "img_replay_buffer_0.pt")
    torch.save([text_trajectory], normal / "txt_replay_buffer_0.pt")
    done = reproduce(stand_in_data, "flickr100", "", real_model_flags(stand_in_weights, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "experts: 1 of 1 already there" in done.stderr
    assert (tmp_path / "buffer/flickr/nfnet_bert/InfoNCE/convexified_0_3/img_replay_buffer_0.pt").is_file()
    assert "PTM-ST (99 pairs)" in (tmp_path / "logged/flickr/flickr100/eval_results.md").read_text()


def run_prepare(tmp_path, *datasets):
    (tmp_path / "sh").mkdir(exist_ok=True)
    shutil.copy(ROOT / "sh" / "prepare_data.sh", tmp_path / "sh")
    env = {**os.environ, "CHECK_URL": "http://127.0.0.1:9", "PYTHON": sys.executable}  # a closed port: offline
    return subprocess.run(["bash", str(tmp_path / "sh" / "prepare_data.sh"), *datasets], capture_output=True,
                          text=True, env=env, timeout=60)


def test_prepare_data_offline_says_what_to_download_and_where(tmp_path):
    done = run_prepare(tmp_path, "coco")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot reach http://127.0.0.1:9" in done.stderr
    assert "./data/Annotation" in done.stderr and "./distill_utils/data/COCO/train2014/" in done.stderr
    assert "flickr:" not in done.stderr  # only what was asked for
    assert run_prepare(tmp_path, "imagenet").returncode == 2


def test_prepare_data_with_everything_in_place_needs_no_network(tmp_path):
    (tmp_path / "data" / "Annotation").mkdir(parents=True)
    (tmp_path / "data" / "Annotation" / "flickr30k_train.json").write_text("[]")
    (tmp_path / "distill_utils" / "data" / "Flickr30k").mkdir(parents=True)
    (tmp_path / "distill_utils" / "data" / "Flickr30k" / ".prepared").touch()
    done = run_prepare(tmp_path, "flickr")
    assert done.returncode == 0 and "nothing to download" in done.stdout


def test_nproc_runs_a_recipe_under_torchrun_with_its_flags(tmp_path):
    """NPROC=2: the recipe goes to torchrun on two processes, every further flag after the recipe's."""
    log = tmp_path / "torchrun.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "torchrun"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; "
                    f"open(\"{log}\", \"a\").write(json.dumps(sys.argv[1:]) + \"\\n\")' \"$@\"\n")
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "sh" / "distill.sh"), "0,1", "flickr500", "--segments_per_iter", "2"],
                          capture_output=True, text=True,
                          env={**os.environ, "NPROC": "2", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert call[:4] == ["--standalone", "--nproc_per_node", "2", "distill_ptm-st.py"]
    args = distill.parse_args(call[4:])
    assert args.segments_per_iter == 2 and args.name == "flickr500"
