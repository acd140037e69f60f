"""A run cut at any kind of point and resumed ends bit for bit where the uninterrupted run ends, its
metrics.jsonl included; a resume steps at the flags it is given; the experts may change in between."""
import json
import shutil

import pytest
import torch

from distill_utils.runtime import checkpoint
from distill_utils.app import distill
from distill_utils.distillation import phases as phase_loop
from distill_utils.distillation.matching import TrajectoryMatcher
from tests.test_distill import distill_argv


class Cut(Exception):
    """Stands in for a kill at a chosen point (the process state after it is thrown away)."""


def cut_at(monkeypatch, target, name, when):
    """Make ``target.name`` raise :class:`Cut` on the calls for which ``when(count, *args)`` is true."""
    real, calls = getattr(target, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if when(calls["n"], *args):
            raise Cut
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return lambda: monkeypatch.setattr(target, name, real)


CUTS = {
    # phase 0, iteration 3: the state of iteration 2 is on disk
    "mid-phase": lambda mp: cut_at(mp, TrajectoryMatcher, "match", lambda n, *a: n == 4),
    # phase 0 finished and saved, phase 1 not started: the global stream must come from the state
    "between phases": lambda mp: cut_at(mp, phase_loop, "start_phase", lambda n, run, spec, buffer: spec.index == 1),
    # evaluations run at (0, 0), (0, 2), (0, 4), (1, 0), (1, 2): cut inside phase 1's second one
    "during evaluation": lambda mp: cut_at(mp, phase_loop, "evaluate_subsets", lambda n, *a: n == 5),
}


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", CUTS)
def test_a_run_cut_anywhere_resumes_to_the_uninterrupted_result(shapes_root, expert_dirs, tmp_path, monkeypatch,
                                                                kind):
    _, normal, shortcut, _ = expert_dirs
    phases = [shortcut, normal]
    extra = ("--blend", "0.3")  # blend draws and head dropout both come from the global generator
    whole = distill.main(distill_argv(shapes_root, tmp_path, phases, *extra, name="whole"))
    restore = CUTS[kind](monkeypatch)
    with pytest.raises(Cut):
        distill.main(distill_argv(shapes_root, tmp_path, phases, *extra, name="cut"))
    restore()
    torch.manual_seed(12345)  # a fresh process's generator knows nothing of the cut one's
    torch.rand(7)
    resumed = distill.main(distill_argv(shapes_root, tmp_path, phases, *extra, "--resume", name="cut"))
    for phase in (0, 1):
        for it in (0, 2, 4):
            a, b = (torch.load(run / f"distilled_{phase}_{it}.pt", weights_only=True) for run in (whole, resumed))
            for key in ("image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt"):
                assert torch.equal(a[key], b[key]), (kind, phase, it, key)
    assert records(resumed) == records(whole)


@pytest.mark.slow
def test_the_nan_stops_advice_works_when_followed(shapes_root, expert_dirs, tmp_path, capsys):
    """--lr_img 1e30 overflows the synthetic images; lowering it and resuming, as the message says, finishes."""
    _, normal, _, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [normal], "--lr_img", "1e30")
    with pytest.raises(FloatingPointError, match=r"iteration [0-9].*Lower --lr_img.*--resume --name run") as stop:
        distill.main(argv)
    folder = tmp_path / "logged" / "shapes" / "run"
    assert checkpoint.load_state(folder / "latest.pt")["iteration"] == 0, stop.value
    distill.main(distill_argv(shapes_root, tmp_path, [normal], "--lr_img", "0.1", "--resume"))
    last, _ = checkpoint.load_distilled(folder / "distilled_0_4.pt")
    assert torch.isfinite(last.images).all() and last.images.abs().max() < 1e3
    groups = checkpoint.load_state(folder / "latest.pt")
    assert groups["phase"] == 1  # finished


@pytest.mark.slow
def test_moving_a_damaged_expert_out_and_resuming_goes_on_with_the_others(shapes_root, expert_dirs, tmp_path,
                                                                          monkeypatch, caplog):
    _, normal, _, _ = expert_dirs
    experts = tmp_path / "experts"
    shutil.copytree(normal, experts)
    argv = distill_argv(shapes_root, tmp_path, [experts], "--Iteration", "6")
    restore = cut_at(monkeypatch, TrajectoryMatcher, "match", lambda n, *a: n == 4)
    with pytest.raises(Cut):
        distill.main(argv)
    restore()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("img_replay_buffer_1.pt", "txt_replay_buffer_1.pt"):  # as the damaged-expert message says
        shutil.move(str(experts / name), moved / name)
    with caplog.at_level("WARNING", logger="ptmst"):
        folder = distill.main(argv + ["--resume"])
    assert "gone: img_replay_buffer_1.pt[0]" in caplog.text
    assert (folder / "distilled_0_6.pt").is_file()

    shutil.move(str(moved / "img_replay_buffer_1.pt"), experts / "img_replay_buffer_1.pt")
    shutil.move(str(moved / "txt_replay_buffer_1.pt"), experts / "txt_replay_buffer_1.pt")
    argv = [a if a != "run" else "run2" for a in argv]
    restore = cut_at(monkeypatch, TrajectoryMatcher, "match", lambda n, *a: n == 4)
    with pytest.raises(Cut):
        distill.main(argv)
    restore()
    for side in ("img", "txt"):  # an expert added before the resume is named too
        shutil.copy(experts / f"{side}_replay_buffer_1.pt", experts / f"{side}_replay_buffer_2.pt")
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptmst"):
        assert (distill.main(argv + ["--resume"]) / "distilled_0_6.pt").is_file()
    assert "new: img_replay_buffer_2.pt[0]" in caplog.text and "draws differ" in caplog.text


@pytest.mark.slow
def test_segment_batching_auto_resumes_with_the_choice_it_made(shapes_root, expert_dirs, tmp_path, monkeypatch):
    """Batched and one-after-another differ in the last bits, so a resume that timed them afresh would
    leave the uninterrupted run: the choice travels in the state. Batching is made to win its trials."""
    from distill_utils.distillation import segments
    real_observe = segments.BatchingChoice.observe
    monkeypatch.setattr(segments.BatchingChoice, "observe", lambda self, b, s: real_observe(self, 0.0, 1.0))
    _, normal, shortcut, _ = expert_dirs
    extra = ("--segments_per_iter", "2", "--keep_graphs", "2", "--segment_batching", "auto")
    whole = distill.main(distill_argv(shapes_root, tmp_path, [shortcut], *extra, name="whole"))
    sequential = distill.main(distill_argv(shapes_root, tmp_path, [shortcut], *extra[:-1], "sequential",
                                           name="sequential"))
    # trials at iterations 0 and 1, batched from 2: cut in iteration 2, whose state holds the choice
    restore = cut_at(monkeypatch, segments, "match_batched", lambda n, *a: n == 3)
    with pytest.raises(Cut):
        distill.main(distill_argv(shapes_root, tmp_path, [shortcut], *extra, name="cut"))
    restore()
    resumed = distill.main(distill_argv(shapes_root, tmp_path, [shortcut], *extra, "--resume", name="cut"))
    final = [torch.load(run / "distilled_0_4.pt", weights_only=True) for run in (whole, resumed, sequential)]
    for key in ("image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt"):
        assert torch.equal(final[0][key], final[1][key]), key
    assert not torch.equal(final[0]["image"], final[2]["image"])  # the choice shows in the bits: the test can fail
