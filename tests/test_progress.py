"""Progress output that suits a log file: no carriage-return updates, a bounded number of lines."""
import time

import pytest

from distill_utils.runtime import progress
from distill_utils.app import buffer
from tests.helpers import shapes_args


def test_a_log_gets_plain_lines_at_most_every_interval(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    for _ in progress.progress(range(6), desc="outer"):
        for _ in progress.progress(range(1000), desc="inner", inner=True):
            pass
        time.sleep(0.02)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and "inner" not in err
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("outer: 100%")  # not one per step: 6 steps, 0.12 s


def test_a_terminal_keeps_live_bars(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    for _ in progress.progress(range(3), desc="live", mininterval=0):
        pass
    assert "\r" in capsys.readouterr().err


def test_buffer_py_logged_to_a_file_stays_readable(shapes_root, tmp_path, capsys, caplog):
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_experts", "1", "--train_epochs", "3",
                       "--eval_freq", "3", "--batch_size_train", "8", "--buffer_path", str(tmp_path / "b"))
    with caplog.at_level("INFO", logger="ptmst"):
        buffer.main(argv)  # stderr is captured here, as in a log file: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "batch/s" not in err  # 15 batches per epoch, no per-batch updates
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("expert 0 epoch")]
    assert len(epochs) == 3  # one line per epoch instead


@pytest.mark.slow
def test_a_distillation_logged_to_a_file_writes_a_few_lines_per_phase(shapes_root, expert_dirs, tmp_path, capsys):
    from distill_utils.app import distill
    from tests.test_distill import distill_argv
    _, normal, shortcut, _ = expert_dirs
    argv = distill_argv(shapes_root, tmp_path, [shortcut, normal], "--eval_it", "6")
    argv[argv.index("--Iteration") + 1:argv.index("--Iteration") + 3] = ["6", "6"]
    distill.main(argv)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert sum(line.startswith("phase 0:") for line in err.splitlines()) <= 3  # 6 iterations, not 6 lines
