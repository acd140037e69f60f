"""Bad input gets one paragraph naming the flag or file and a fix that works, exit status 2, no
traceback, nothing half-written; cheap checks run before expensive work; runs never dead-end."""
import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.experts import trajectories
from distill_utils.app import buffer, convexify, distill, evaluate
from distill_utils.app import shapes as shapes_app
from distill_utils.app.cli import run_script
from tests.helpers import fake_trajectory, shapes_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def experts_made(expert_dirs):
    return expert_dirs[0], expert_dirs[1]


def distill_argv(shapes_root, tmp, buffer, *extra, name="run", queries="6"):
    return shapes_args(shapes_root, tmp, "--image_trainable", "--buffer_path", str(buffer), "--subset_num", "1",
                       "--min_start_epoch", "0", "--max_start_epoch", "2", "--num_queries", queries,
                       "--Iteration", "2", "--eval_it", "2", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--mini_batch_size", "3", "--syn_steps", "2", "--lr_lr", "0", "--lr_img", "0.1",
                       "--lr_txt", "0.1", "--lr_sim", "0.01", "--logged_dir", str(tmp / "logged"), "--name", name,
                       *extra)


def script_error(main, argv, capsys) -> str:
    """Run ``main(argv)`` as a script runs it; return its one-paragraph error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: main(argv))
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err and re.search(r"(^|\n)(error|usage):", err), err
    return err


# --------------------------------------------------------------------------- item 4: eval.py
def test_eval_checks_its_output_folder_before_training_any_student(shapes_root, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "d.pt"
    synthetic = evaluate.FrozenSubset(torch.randn(4, 3, 16, 16), torch.randn(4, 32), torch.eye(4), 0.1, 0.1)
    checkpoint.save_distilled(saved, _as_set(synthetic), {}, 0, 0)
    trained = []
    monkeypatch.setattr(evaluate, "evaluate_subsets", lambda *a, **k: trained.append(1))
    (tmp_path / "a_file").write_text("x")
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--ckpt_path", str(saved), "--out_dir", str(tmp_path / "a_file" / "sub"))
    err = script_error(evaluate.main, argv, capsys)
    assert "--out_dir" in err and not trained


def test_eval_prints_the_table_before_a_write_that_fails(shapes_root, tmp_path, capsys, monkeypatch):
    saved = tmp_path / "d.pt"
    checkpoint.save_distilled(saved, _as_set(evaluate.FrozenSubset(
        torch.randn(4, 3, 16, 16), torch.randn(4, 32), torch.eye(4), 0.1, 0.1)), {}, 0, 0)

    def disk_full(items):
        raise OSError(28, "No space left on device", str(items[0][0]))

    monkeypatch.setattr(evaluate, "write_all", disk_full)
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--ckpt_path", str(saved), "--baseline")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_script(lambda: evaluate.main(argv))
    captured = capsys.readouterr()
    assert "| Img R@1 |" in captured.out and "PTM-ST (4 pairs)" in captured.out
    assert "no space left on the device while writing" in captured.err and "eval_results" in captured.err


def test_eval_refuses_phases_out_of_order_or_twice(shapes_root, tmp_path, capsys):
    paths = []
    for phase in (0, 1):
        paths.append(tmp_path / f"distilled_{phase}_2.pt")
        checkpoint.save_distilled(paths[-1], _as_set(evaluate.FrozenSubset(
            torch.randn(4, 3, 16, 16), torch.randn(4, 32), torch.eye(4), 0.1, 0.1)), {}, phase, 2)
    base = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1")
    err = script_error(evaluate.main, base + ["--ckpt_path", str(paths[1]), str(paths[0])], capsys)
    assert "phases [1, 0]" in err and f"{paths[0]} {paths[1]}" in err  # the fix: the right order, spelled out
    err = script_error(evaluate.main, base + ["--ckpt_path", str(paths[0]), str(paths[0])], capsys)
    assert "more than once" in err


def _as_set(frozen):
    from distill_utils.distillation.synthetic import SyntheticSet, make_similarity
    return SyntheticSet(frozen.images, frozen.texts, make_similarity("full", len(frozen.images)), 0.1, 0.1)


# --------------------------------------------------------------------------- item 5: one writer per run folder
HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from distill_utils.runtime.claims import folder_lock, this_process
folder = Path({folder!r})
folder.mkdir(parents=True, exist_ok=True)
with folder_lock(folder, wait=False, owner=this_process()):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_and_a_killed_holder_does_not_block_it(shapes_root, experts_made, tmp_path,
                                                                                capsys):
    _, normal = experts_made
    folder = tmp_path / "logged" / "shapes" / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, "--resume"), capsys)
        assert f"pid {holder.pid}" in err and "in use" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (distill.main(distill_argv(shapes_root, tmp_path, normal)) / "latest.pt").is_file()


# --------------------------------------------------------------------------- item 6: resume with other flags
def test_resume_refuses_flags_that_do_not_fit_and_the_fix_works(shapes_root, experts_made, tmp_path, capsys):
    _, normal = experts_made
    folder = distill.main(distill_argv(shapes_root, tmp_path, normal))
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, "--resume", queries="5"), capsys)
    assert "--num_queries was [6] and is now [5]" in err and "--num_queries 6" in err
    history = (folder / "args_history.jsonl").read_text().splitlines()
    assert len(history) == 1  # the refused start left no record and changed nothing
    assert distill.main(distill_argv(shapes_root, tmp_path, normal, "--resume")) == folder  # the run's own values


# --------------------------------------------------------------------------- item 7: no dead ends
def test_a_start_up_failure_leaves_no_dead_end(shapes_root, experts_made, tmp_path, capsys):
    _, normal = experts_made
    argv = distill_argv(shapes_root, tmp_path, normal)
    broken = list(argv)
    broken[broken.index("--image_root") + 1] = str(tmp_path / "no_images")
    err = script_error(distill.main, broken, capsys)
    assert "--image_root" in err
    folder = tmp_path / "logged" / "shapes" / "run"
    assert not (folder / "args.json").exists()
    assert (distill.main(argv + ["--resume"]) / "latest.pt").is_file()  # --resume of a run that never started
    script_error(distill.main, broken + ["--name", "other"], capsys)
    assert (distill.main(argv + ["--name", "other"]) / "latest.pt").is_file()  # the same command, fixed


# --------------------------------------------------------------------------- item 8: damaged experts
def write_pair(folder, index, image, text):
    torch.save([image], folder / f"img_replay_buffer_{index}.pt")
    torch.save([text], folder / f"txt_replay_buffer_{index}.pt")


def test_nan_and_ragged_experts_are_named_when_the_folder_is_opened(shapes_root, experts_made, tmp_path, capsys):
    _, normal = experts_made
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    good = trajectories.TrajectoryBuffer(normal).experts()[0]
    image = [good.snapshot("image", t) for t in range(4)]
    text = [good.snapshot("text", t) for t in range(4)]
    write_pair(damaged, 0, image, text)
    diverged = [list(s) for s in image]
    for t in (1, 2, 3):  # diverged in epoch 1: non-finite from then on
        diverged[t] = [p.clone().fill_(float("nan")) for p in diverged[t]]
    write_pair(damaged, 1, diverged, text)
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, damaged), capsys)
    assert "img_replay_buffer_1.pt" in err and "NaN/Inf" in err and "snapshot 2" in err  # the last one used
    assert not (tmp_path / "logged" / "shapes" / "run" / "args.json").exists()
    write_pair(damaged, 1, image[:2], text[:2])
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, damaged), capsys)
    assert "img_replay_buffer_1.pt" in err and "has 2 snapshots" in err


def test_corrupt_and_foreign_trajectory_files_are_named(tmp_path, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    torch.save({"not": "a trajectory"}, normal / "img_replay_buffer_0.pt")
    torch.save([fake_trajectory([(2,)], 3, 0)], normal / "txt_replay_buffer_0.pt")
    err = script_error(convexify.main, ["--normal_dir", str(normal), "--start", "0", "--end", "2"], capsys)
    assert "img_replay_buffer_0.pt is not a list of trajectories" in err
    torch.save([[[datetime.date(2026, 1, 1)]]], normal / "img_replay_buffer_0.pt")  # not loadable weights-only
    with pytest.raises(trajectories.TrajectoryError, match="img_replay_buffer_0.pt.*corrupt"):
        trajectories.TrajectoryBuffer(normal).experts()


# --------------------------------------------------------------------------- item 9: fixes that work
def test_the_pretrained_error_of_a_built_in_encoder_names_a_fix_that_works(shapes_root, tmp_path, capsys):
    argv = shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--train_epochs", "1", "--eval_freq", "1",
                       "--batch_size_train", "64", "--buffer_path", str(tmp_path / "b"))
    argv.remove("--image_pretrained")
    argv.remove("false")  # the default: true
    err = script_error(buffer.main, argv, capsys)
    assert "--image_pretrained false" in err
    assert buffer.main(argv + ["--image_pretrained", "false"]) == [0]


# --------------------------------------------------------------------------- item 10: sizes
def test_pairs_beyond_the_training_set_are_refused_before_the_run_starts(shapes_root, experts_made, tmp_path, capsys):
    _, normal = experts_made
    argv = distill_argv(shapes_root, tmp_path, normal, queries="500")
    err = script_error(distill.main, argv, capsys)
    assert "--num_queries 500" in err and "120 training pairs" in err
    assert not list((tmp_path / "logged" / "shapes" / "run").glob("*.pt"))
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, "--mini_batch_size", "7"), capsys)
    assert "--mini_batch_size 7 exceeds --num_queries 6" in err


# --------------------------------------------------------------------------- the error classes
@pytest.mark.parametrize("flags,needle", [
    (["--image_encoder", "no_such_net"], "--image_encoder"),
    (["--text_encoder", "no_such_bert"], "--text_encoder"),
    (["--device", "gpu0"], "--device"),
    (["--npz_dir", "{file}"], None),
    (["--buffer_path", "{file}"], "--buffer_path"),
    (["--image_root", "{tmp}/nowhere"], "--image_root"),
])
def test_buffer_py_user_errors(shapes_root, tmp_path, capsys, flags, needle):
    (tmp_path / "a_file").write_text("x")
    flags = [f.format(file=tmp_path / "a_file", tmp=tmp_path) for f in flags]
    argv = shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--train_epochs", "1", "--buffer_path",
                       str(tmp_path / "b"), *flags)
    if needle is None:  # an unwritable text cache costs time only: the run goes on
        assert buffer.main(argv) == [0]
        return
    err = script_error(buffer.main, argv, capsys)
    assert needle in err


@pytest.mark.parametrize("flags,needle", [
    (["--name", "../escape"], "--name"),
    (["--name", "/abs"], "--name"),
    (["--logged_dir", "{file}"], "--logged_dir"),
    (["--device", "cuda:7"], "--device"),
])
def test_distill_user_errors(shapes_root, experts_made, tmp_path, capsys, flags, needle):
    _, normal = experts_made
    (tmp_path / "a_file").write_text("x")
    flags = [f.format(file=tmp_path / "a_file") for f in flags]
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, *flags), capsys)
    assert needle in err
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("entry,needle", [
    ({"image": None, "caption": "a cat", "image_id": 1}, "'image' is None"),
    ({"image": "images/train_00000.png", "caption": None, "image_id": 1}, "holds None"),
    ({"image": "images/train_00000.png", "caption": [], "image_id": 1}, "empty list"),
])
def test_malformed_annotation_entries_are_named(shapes_root, tmp_path, capsys, entry, needle):
    ann = tmp_path / "ann"
    ann.mkdir()
    for split in ("train", "val", "test"):
        entries = json.loads((shapes_root / f"shapes_{split}.json").read_text())
        if split == "train":
            entries[3] = entry
        (ann / f"shapes_{split}.json").write_text(json.dumps(entries))
    argv = shapes_args(shapes_root, tmp_path, "--ann_root", str(ann), "--num_experts", "1", "--train_epochs", "1",
                       "--buffer_path", str(tmp_path / "b"))
    err = script_error(buffer.main, argv, capsys)
    assert "shapes_train.json, entry 3" in err and needle in err


def test_missing_images_are_found_before_captions_are_encoded(shapes_root, tmp_path, capsys):
    images = tmp_path / "images_copy"
    (images / "images").mkdir(parents=True)
    for path in (shapes_root / "images").iterdir():
        if path.name != "test_00005.png":
            (images / "images" / path.name).write_bytes(path.read_bytes())
    argv = shapes_args(shapes_root, tmp_path, "--image_root", str(images), "--num_experts", "1",
                       "--train_epochs", "1", "--buffer_path", str(tmp_path / "b"))
    err = script_error(buffer.main, argv, capsys)
    assert "test_00005.png" in err and "--image_root" in err
    assert not (tmp_path / "npz").exists()  # no caption was encoded


def test_output_roots_of_the_generator_and_the_quick_start(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    err = script_error(shapes_app.main, ["--root", str(tmp_path / "a_file" / "shapes")], capsys)
    assert "--root" in err
    from distill_utils.app import quickstart
    err = script_error(quickstart.main, ["--workdir", str(tmp_path / "a_file"), "--preset", "smoke"], capsys)
    assert "--workdir" in err


@pytest.mark.slow
def test_ctrl_c_in_the_quick_start_is_one_line_and_a_rerun_goes_on(tmp_path):
    command = [sys.executable, "-m", "distill_utils.app.quickstart", "--workdir", str(tmp_path / "q"), "--preset", "smoke"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "q").glob("buffer/**/img_replay_buffer_0.pt")):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and "run the same command again" in err
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def test_a_dataloader_worker_error_shows_its_own_message_first(shapes_root, tmp_path, capsys):
    images = tmp_path / "images_copy"
    shutil.copytree(shapes_root / "images", images / "images")
    (images / "images" / "train_00003.png").write_bytes(b"not a png")
    argv = shapes_args(shapes_root, tmp_path, "--image_root", str(images), "--num_experts", "1", "--train_epochs", "1",
                       "--batch_size_train", "64", "--buffer_path", str(tmp_path / "b"))
    argv[argv.index("--num_workers") + 1] = "1"
    err = script_error(buffer.main, argv, capsys)
    assert "train_00003.png cannot be decoded" in err and "DataLoader worker" in err
    assert "Original Traceback" not in err


@pytest.fixture
def read_only_folder(mount_tmpfs):
    """A read-only filesystem: it refuses root too."""
    return mount_tmpfs("read_only", "ro,size=1m")


def test_read_only_output_folders_are_refused_before_any_work(shapes_root, expert_dirs, tmp_path, read_only_folder,
                                                              capsys):
    _, normal = expert_dirs[:2]
    err = script_error(buffer.main, shapes_args(shapes_root, tmp_path, "--num_experts", "1", "--buffer_path",
                                                 str(read_only_folder / "b")), capsys)
    assert "--buffer_path" in err and "Read-only file system" in err
    err = script_error(distill.main, distill_argv(shapes_root, tmp_path, normal, "--logged_dir",
                                                  str(read_only_folder / "runs")), capsys)
    assert "--logged_dir" in err and "Read-only file system" in err
    assert not (tmp_path / "npz").exists()  # refused before any caption was encoded


@pytest.mark.parametrize("late_row", ["empty_expert_dir", "no_forgetting_record", "too_many_pairs"])
def test_eval_stops_at_a_bad_late_row_before_any_student(shapes_root, expert_dirs, tmp_path, capsys, monkeypatch,
                                                         late_row):
    """The distilled set's students train first and the reference rows after, so a row that cannot be made
    must be found at load time, not after minutes of students."""
    import shutil
    _, normal, _, _ = expert_dirs
    size = 4 if late_row != "too_many_pairs" else 100  # two phases of 100: random pairs may repeat, a coreset not
    saved = [tmp_path / f"distilled_{phase}_2.pt" for phase in (0, 1)]
    for phase, path in enumerate(saved):
        checkpoint.save_distilled(path, _as_set(evaluate.FrozenSubset(
            torch.randn(size, 3, 16, 16), torch.randn(size, 32), torch.eye(size), 0.1, 0.1)), {}, phase, 2)
    experts = tmp_path / "experts"
    if late_row == "empty_expert_dir":
        experts.mkdir()
    else:
        shutil.copytree(normal, experts)
        for record in experts.glob("forgetting_*.json"):
            record.unlink()
    baseline = {"empty_expert_dir": "herding", "no_forgetting_record": "forgetting", "too_many_pairs": "kcenter"}
    trained = []
    monkeypatch.setattr(evaluate, "evaluate_subsets", lambda *a, **k: trained.append(1))
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--ckpt_path", *map(str, saved), "--expert_dir", str(experts),
                       "--baseline", "random", baseline[late_row])
    err = script_error(evaluate.main, argv, capsys)
    assert not trained, "a student trained before the bad row was found"
    expected = {"empty_expert_dir": str(experts), "no_forgetting_record": "forgetting_0.json",
                "too_many_pairs": "kcenter baseline needs 200 training pairs"}[late_row]
    assert expected in err


def test_a_full_disk_names_the_file_and_the_flag_not_a_temporary(shapes_root, tmp_path, capsys, monkeypatch):
    """atomic.py writes through '.NAME.XXXXXXXX.tmp' temporaries: the message names NAME and the flag
    that moves it, as the user gave it."""
    import sys
    saved = tmp_path / "d.pt"
    checkpoint.save_distilled(saved, _as_set(evaluate.FrozenSubset(
        torch.randn(4, 3, 16, 16), torch.randn(4, 32), torch.eye(4), 0.1, 0.1)), {}, 0, 0)
    out = tmp_path / "results"

    def disk_full(items):
        final = Path(items[0][0])
        raise OSError(28, "No space left on device", str(final.parent / f".{final.name}.k2j_x9q1.tmp"))

    monkeypatch.setattr(evaluate, "write_all", disk_full)
    monkeypatch.setattr(evaluate, "evaluate_subsets", lambda *a, **k: {"selected": {
        "mean": {"r_mean": 1.0}, "std": {"r_mean": 0.0}}})
    monkeypatch.setattr(evaluate, "format_table", lambda rows: "table")
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_eval", "1", "--epoch_eval_train", "1",
                       "--ckpt_path", str(saved), "--baseline", "--out_dir", str(out))
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    with pytest.raises(SystemExit):
        run_script(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    assert ".tmp" not in err and str(out / "eval_results") in err
    assert "pass --out_dir a folder on another disk" in err


@pytest.mark.parametrize("written, expected", [
    ("/w/runs/.latest.pt.abc123xy.tmp", "/w/runs/latest.pt"),
    ("/w/reports/.ablation_q1w2e3r4.partial/README.md", "the ablation report being written in /w/reports"),
    ("/w/reports/.study_components_a1b2c3d4.partial/fig.png", "the study_components report being written in /w/reports"),
    ("/w/plain/file.json", "/w/plain/file.json"),
])
def test_temporary_names_become_the_files_they_turn_into(written, expected):
    from distill_utils.runtime.errors import final_path
    assert final_path(written) == expected


def test_the_flag_named_is_the_deepest_output_folder_holding_the_file():
    from distill_utils.app.cli import output_flags
    from distill_utils.runtime.errors import flag_holding
    flags = output_flags(["--workdir", "/w", "--image_root=/data/img", "--logged_dir", "/w/runs", "--seed", "3"],
                         {"--workdir": "./ablation"})
    assert flags == {"--workdir": "/w", "--image_root": "/data/img", "--logged_dir": "/w/runs"}
    assert flag_holding("/w/runs/x/.a.pt.abcdef12.tmp", flags) == "--logged_dir"
    assert flag_holding("/w/reports/r.md", flags) == "--workdir"
    assert flag_holding("/elsewhere/r.md", flags) is None
