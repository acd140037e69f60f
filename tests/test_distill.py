"""distill_ptm-st end to end on shapes: outputs, up-front validation, NaN stop, resume."""
import json

import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.experts import trajectories
from distill_utils.app import buffer, distill
from distill_utils.app.cli import run_script
from distill_utils.distillation.matching import MatchResult, TrajectoryMatcher
from tests.helpers import shapes_args


def distill_argv(shapes_root, tmp, phase_dirs, *extra, name="run"):
    return shapes_args(shapes_root, tmp, "--image_trainable", "--buffer_path", *map(str, phase_dirs),
                       "--subset_num", str(len(phase_dirs)), "--min_start_epoch", *["0"] * len(phase_dirs),
                       "--max_start_epoch", *["2"] * len(phase_dirs), "--num_queries", *["6"] * len(phase_dirs),
                       "--Iteration", *["4"] * len(phase_dirs), "--eval_it", "2", "--num_eval", "1",
                       "--epoch_eval_train", "2", "--mini_batch_size", "3", "--syn_steps", "2", "--lr_lr", "1e-7",
                       "--lr_img", "0.1", "--lr_txt", "0.1", "--lr_sim", "0.01", "--logged_dir", str(tmp / "logged"),
                       "--name", name, *extra)


@pytest.mark.slow
def test_two_phases_write_checkpoints_with_reference_keys(shapes_root, expert_dirs, tmp_path):
    _, _, shortcut, compact = expert_dirs
    folder = distill.main(distill_argv(shapes_root, tmp_path, [shortcut, compact], "--sim_type", "lowrank"))
    for phase in (0, 1):
        for it in (0, 2, 4):
            assert (folder / f"distilled_{phase}_{it}.pt").is_file()
            assert (folder / f"synthetic_{phase}_{it}.png").is_file()
            assert len((folder / f"captions_{phase}_{it}.txt").read_text().splitlines()) == 6
    payload = torch.load(folder / "distilled_1_4.pt", weights_only=True)
    for key in ("image", "text", "similarity_params", "similarity_mat", "syn_lr_img", "syn_lr_txt", "config"):
        assert key in payload, key
    assert payload["image"].shape == (6, 3, 16, 16) and payload["text"].shape == (6, 32)
    assert payload["similarity_mat"].shape == (6, 6)
    assert [tuple(p.shape) for p in payload["similarity_params"]] == [(6,), (6, 10), (6, 10)]  # rank 10 (phase 1)
    start = torch.load(folder / "distilled_1_0.pt", weights_only=True)
    assert not torch.equal(start["image"], payload["image"])  # the images were learned
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "r_mean" in r]
    assert [(r["phase"], r["iteration"]) for r in evaluations] == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]
    assert json.loads((folder / "args.json").read_text())["subset_num"] == 2


@pytest.mark.slow
def test_frozen_encoder_mode_runs(shapes_root, tmp_path):
    tmp = tmp_path
    buffer.main(shapes_args(shapes_root, tmp, "--num_experts", "1", "--train_epochs", "2", "--eval_freq", "2",
                             "--out_embedding", "12", "--batch_size_train", "32", "--buffer_path", str(tmp / "b")))
    normal = trajectories.expert_folder(tmp / "b", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    argv = distill_argv(shapes_root, tmp, [normal], "--out_embedding", "12", "--sim_type", "full")
    argv.remove("--image_trainable")
    folder = distill.main(argv)
    assert torch.load(folder / "distilled_0_4.pt", weights_only=True)["similarity_params"][0].shape == (6, 6)


@pytest.mark.parametrize("flag,values", [("--num_queries", ["6"]), ("--Iteration", ["1", "2", "3"]),
                                         ("--min_start_epoch", ["0"]), ("--sim_rank", ["4"])])
def test_inconsistent_per_phase_lists_are_refused_up_front(shapes_root, tmp_path, capsys, flag, values):
    argv = distill_argv(shapes_root, tmp_path, ["/does/not/exist", "/nor/this"])
    if flag in argv:
        position = argv.index(flag)
        argv[position + 1:position + 3] = values
    else:
        argv += [flag, *values]
    with pytest.raises(SystemExit):
        distill.main(argv)
    err = capsys.readouterr().err
    assert flag in err and "--subset_num is 2" in err
    assert not (tmp_path / "logged").exists() and not (tmp_path / "npz").exists()  # no work was done


def test_non_integer_per_phase_values_are_refused(shapes_root, tmp_path, capsys):
    argv = distill_argv(shapes_root, tmp_path, ["/a"])
    argv[argv.index("--max_start_epoch") + 1] = "2.5"
    with pytest.raises(SystemExit):
        distill.main(argv)
    assert "--max_start_epoch" in capsys.readouterr().err


def test_start_epochs_beyond_the_trajectory_are_refused(shapes_root, expert_dirs, tmp_path):
    _, _, shortcut, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [shortcut])
    argv[argv.index("--max_start_epoch") + 1] = "3"
    with pytest.raises(trajectories.TrajectoryError, match="has 3 snapshots"):
        distill.main(argv)


def test_existing_run_folder_is_never_overwritten(shapes_root, expert_dirs, tmp_path):
    _, normal, _, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [normal])
    argv[argv.index("--Iteration") + 1] = "0"
    distill.main(argv)
    with pytest.raises(checkpoint.CheckpointError, match="already holds a run"):
        distill.main(argv)


def test_resume_keeps_args_json_and_records_changed_flags(shapes_root, expert_dirs, tmp_path, monkeypatch):
    _, normal, _, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [normal])
    real_match, calls = TrajectoryMatcher.match, {"n": 0}

    def cut(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # iteration 2, after its checkpoint
            raise KeyboardInterrupt
        return real_match(self, *args, **kwargs)

    monkeypatch.setattr(TrajectoryMatcher, "match", cut)
    with pytest.raises(KeyboardInterrupt):
        distill.main(argv)
    monkeypatch.setattr(TrajectoryMatcher, "match", real_match)
    folder = tmp_path / "logged" / "shapes" / "run"
    written = (folder / "args.json").read_text()
    distill.main(argv + ["--resume", "--eval_it", "4"])
    assert (folder / "args.json").read_text() == written
    history = [json.loads(line) for line in (folder / "args_history.jsonl").read_text().splitlines()]
    assert [h["resumed_at"] for h in history] == [None, {"phase": 0, "iteration": 2}]
    assert history[1]["changed"] == {"eval_it": [2, 4]} and history[1]["args"]["eval_it"] == 4


def test_a_finished_run_is_left_as_it_is_and_refuses_flags_that_would_decide_another_result(
        shapes_root, expert_dirs, tmp_path):
    _, normal, _, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [normal])
    argv[argv.index("--Iteration") + 1] = "0"
    folder = distill.main(argv)
    history = (folder / "args_history.jsonl").read_text()
    assert distill.main(argv + ["--resume"]) == folder  # nothing left to do, nothing recorded
    assert (folder / "args_history.jsonl").read_text() == history
    with pytest.raises(checkpoint.CheckpointError, match=r"has finished.*--lr_img 0\.1 -> 0\.5.*another --name"):
        distill.main(argv + ["--resume", "--lr_img", "0.5"])
    assert (folder / "args_history.jsonl").read_text() == history


def test_nan_stops_and_keeps_the_last_good_checkpoint(shapes_root, expert_dirs, tmp_path, monkeypatch):
    _, normal, _, _ = expert_dirs
    real_match = TrajectoryMatcher.match
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        result = real_match(self, *args, **kwargs)
        return MatchResult(float("nan"), result.per_side, result.start_distance) if calls["n"] == 3 else result

    monkeypatch.setattr(TrajectoryMatcher, "match", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 2.*distilled_0_2\.pt.*--resume"):
        distill.main(distill_argv(shapes_root, tmp_path, [normal]))
    folder = tmp_path / "logged" / "shapes" / "run"
    subset, _ = checkpoint.load_distilled(folder / "distilled_0_2.pt")
    assert torch.isfinite(subset.images).all()
    assert checkpoint.load_state(folder / "latest.pt")["iteration"] == 2


@pytest.mark.parametrize("flags, advice", [
    (["--keep_graphs", "2"], r"iteration 0.*--keep_graphs 2.*--mini_batch_size 3.*--resume --name run"),
    (["--keep_graphs", "auto"], r"--keep_graphs auto.*Give --keep_graphs a count below the kept_graphs"),
    (["--expert_cache_gb", "1"], r"lower --expert_cache_gb \(0\.0 GiB"),  # only once snapshots are kept
], ids=["matching_flags", "auto", "expert_cache"])
def test_out_of_memory_names_the_flags_to_lower(shapes_root, expert_dirs, tmp_path, monkeypatch, flags, advice):
    _, normal, _, _ = expert_dirs

    def exhausted(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrajectoryMatcher, "match", exhausted)
    with pytest.raises(MemoryError, match=advice):
        distill.main(distill_argv(shapes_root, tmp_path, [normal], *flags))
    assert (tmp_path / "logged" / "shapes" / "run" / "latest.pt").is_file()


def assert_same_distilled(run_a, run_b):
    for name in ("distilled_0_4.pt", "distilled_1_4.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (run_a, run_b))
        for key in ("image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt"):
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.slow
def test_snapshots_kept_in_memory_give_the_same_run(shapes_root, expert_dirs, tmp_path, caplog):
    _, _, shortcut, compact = expert_dirs
    phases = [shortcut, compact]
    plain = distill.main(distill_argv(shapes_root, tmp_path, phases, name="plain"))
    with caplog.at_level("INFO", logger="ptmst"):
        kept = distill.main(distill_argv(shapes_root, tmp_path, phases, "--expert_cache_gb", "1", name="kept"))
    served = [r.getMessage() for r in caplog.records if "expert snapshots" in r.getMessage()]
    assert len(served) == 2 and all("0 fetches served from there" not in m for m in served), served
    assert_same_distilled(plain, kept)


def test_negative_expert_cache_is_refused(shapes_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        distill.parse_args(distill_argv(shapes_root, tmp_path, [tmp_path], "--expert_cache_gb", "-1"))
    assert "--expert_cache_gb" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "some"])
def test_keep_graphs_takes_a_count_or_auto(shapes_root, tmp_path, capsys, value):
    assert distill.parse_args(distill_argv(shapes_root, tmp_path, [tmp_path], "--keep_graphs", "auto")).keep_graphs == "auto"
    with pytest.raises(SystemExit):
        distill.parse_args(distill_argv(shapes_root, tmp_path, [tmp_path], "--keep_graphs", value))
    assert f"--keep_graphs: must be auto or a whole number >= 0, got {value}" in capsys.readouterr().err


def test_keep_graphs_defaults_to_auto(shapes_root, tmp_path):
    assert distill.parse_args(distill_argv(shapes_root, tmp_path, [tmp_path])).keep_graphs == "auto"


@pytest.mark.slow
def test_the_default_auto_keeps_every_graph_on_the_cpu(shapes_root, expert_dirs, tmp_path, monkeypatch):
    _, _, shortcut, compact = expert_dirs
    phases = [shortcut, compact]
    every = distill.main(distill_argv(shapes_root, tmp_path, phases, "--keep_graphs", "2", name="every"))
    real_match, kept = TrajectoryMatcher.match, []

    def counted(self, *args, **kwargs):
        result = real_match(self, *args, **kwargs)
        kept.append(result.kept_graphs)
        return result

    monkeypatch.setattr(TrajectoryMatcher, "match", counted)
    auto = distill.main(distill_argv(shapes_root, tmp_path, phases, name="auto"))  # the default
    assert kept == [2] * 8  # --syn_steps 2, two phases of 4 iterations
    assert_same_distilled(every, auto)


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(shapes_root, expert_dirs, tmp_path, monkeypatch):
    _, normal, shortcut, _ = expert_dirs
    phases = [shortcut, normal]
    whole = distill.main(distill_argv(shapes_root, tmp_path, phases, name="whole"))

    real_match = TrajectoryMatcher.match
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # phase 0, iteration 3: the last checkpoint is at iteration 2
            raise KeyboardInterrupt
        return real_match(self, *args, **kwargs)

    monkeypatch.setattr(TrajectoryMatcher, "match", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.main(distill_argv(shapes_root, tmp_path, phases, name="cut"))
    monkeypatch.setattr(TrajectoryMatcher, "match", real_match)
    resumed = distill.main(distill_argv(shapes_root, tmp_path, phases, "--resume", name="cut"))
    assert_same_distilled(whole, resumed)


@pytest.mark.slow
def test_an_nfnet_student_distils_with_its_standardisation_factored(shapes_root, tmp_path):
    """The distiller's default path for NFNet students (weights standardised outside the graphs) end to end,
    from experts that buffer.py trained through timm's own layers."""
    nfnet = ("--image_encoder", "test_nfnet", "--out_embedding", "12")
    buffer.main(shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_experts", "1", "--train_epochs", "2",
                             "--eval_freq", "2", "--batch_size_train", "32", "--buffer_path", str(tmp_path / "b"),
                             *nfnet[2:], image_encoder="test_nfnet"))
    normal = trajectories.expert_folder(tmp_path / "b", "shapes", "test_nfnet", "tiny_bert", "InfoNCE")
    argv = distill_argv(shapes_root, tmp_path, [normal], "--sim_type", "full", "--keep_graphs", "1", *nfnet)
    folder = distill.main(argv)
    start, end = (torch.load(folder / f"distilled_0_{it}.pt", weights_only=True) for it in (0, 4))
    assert torch.isfinite(end["image"]).all() and not torch.equal(start["image"], end["image"])
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["matching_loss"] for r in records if r.get("matching_loss") is not None]  # logged at evaluations
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)


@pytest.mark.slow
def test_a_full_disk_mid_run_loses_nothing_and_resume_ends_where_an_uninterrupted_run_ends(
        shapes_root, expert_dirs, tmp_path, monkeypatch, capsys):
    _, normal, shortcut, _ = expert_dirs
    phases = [shortcut, normal]
    whole = distill.main(distill_argv(shapes_root, tmp_path, phases, name="whole"))
    real_save, saves = checkpoint.atomic_save, []

    def disk_fills(obj, path):
        saves.append(path)
        if len(saves) == 5:  # phase 0, iteration 4: its distilled set; iteration 2's state is on disk
            raise OSError(28, "No space left on device", str(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", disk_fills)
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: distill.main(distill_argv(shapes_root, tmp_path, phases, name="full")))
    assert stopped.value.code == 2 and "no space left on the device while writing" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "atomic_save", real_save)
    resumed = distill.main(distill_argv(shapes_root, tmp_path, phases, "--resume", name="full"))
    assert_same_distilled(whole, resumed)


def test_more_segments_per_iteration_than_distinct_ones_is_warned_by_name(shapes_root, expert_dirs, tmp_path,
                                                                          caplog):
    _, normal, _, _ = expert_dirs  # 2 experts, starts {0, 1}: 4 distinct segments
    argv = distill_argv(shapes_root, tmp_path, [normal], "--segments_per_iter", "5", "--Iteration", "1",
                        "--eval_it", "1")
    with caplog.at_level("WARNING"):
        distill.main(argv)
    assert "--segments_per_iter 5 exceeds the 4 distinct segments phase 0 can draw (2 experts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        distill.main(distill_argv(shapes_root, tmp_path, [normal], "--segments_per_iter", "4", "--Iteration", "1",
                                  "--eval_it", "1", name="four"))
    assert "distinct segments" not in caplog.text


@pytest.mark.parametrize("late_phase", ["experts_too_short", "more_pairs_than_data", "no_experts"])
def test_a_bad_last_phase_stops_before_the_first_phase_matches(shapes_root, expert_dirs, tmp_path, capsys,
                                                               monkeypatch, late_phase):
    _, _, shortcut, _ = expert_dirs
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = distill_argv(shapes_root, tmp_path, [shortcut, empty if late_phase == "no_experts" else shortcut])
    if late_phase == "experts_too_short":
        position = argv.index("--max_start_epoch")
        argv[position + 2] = "9"  # phase 1's starts reach past the 3-epoch experts' last snapshot
    elif late_phase == "more_pairs_than_data":
        position = argv.index("--num_queries")
        argv[position + 2] = "100000"
    matched = []
    monkeypatch.setattr(TrajectoryMatcher, "match", lambda *a, **k: matched.append(1))
    with pytest.raises(SystemExit):
        run_script(lambda: distill.main(argv))
    err = capsys.readouterr().err
    assert not matched and "Traceback" not in err
    expected = {"experts_too_short": "phase 1", "more_pairs_than_data": "100000",
                "no_experts": str(empty)}[late_phase]
    assert expected in err
