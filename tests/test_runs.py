"""The run-folder object and the result fingerprints that decide what may be reused."""
import json

import pytest

from distill_utils.runtime import atomic, runs
from distill_utils.runtime.runs import RunFolder, RunFolderError


def test_a_run_is_read_with_the_flags_of_its_latest_start(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "args.json").write_text(json.dumps({"Iteration": [4, 4]}))
    assert run.recorded_args()["Iteration"] == [4, 4]
    history = [{"args": {"Iteration": [4, 4]}}, {"args": {"Iteration": [6, 6]}, "changed": {"Iteration": [[4, 4], [6, 6]]}}]
    (tmp_path / "args_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    assert [p.name for p in run.final_checkpoints()] == ["distilled_0_6.pt", "distilled_1_6.pt"]
    assert not run.finished()
    for name in ("distilled_0_6.pt", "distilled_1_6.pt"):
        (tmp_path / name).touch()
    assert run.finished()
    assert not RunFolder(tmp_path / "missing").finished()


def test_a_line_cut_by_an_old_append_is_skipped_not_merged(tmp_path, caplog):
    run = RunFolder(tmp_path)
    good = json.dumps({"args": {"Iteration": [4]}})
    (tmp_path / "args_history.jsonl").write_text(good + "\n" + '{"args": {"Itera' + good + "\n")
    assert run.recorded_args() == {"Iteration": [4]}
    assert "skipped 1 damaged line" in caplog.text


def test_a_start_killed_while_recording_leaves_the_history_whole(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.record_start({"Iteration": [2], "lr_img": 0.1}, None, {}, "abc")
    real = atomic.text_writer

    def half_then_killed(text):
        def write(stream):
            stream.write(text[: len(text) // 2].encode())
            raise KeyboardInterrupt
        return write

    monkeypatch.setattr(atomic, "text_writer", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        run.record_start({"Iteration": [2], "lr_img": 0.5}, {"phase": 0, "iteration": 2}, {"lr_img": [0.1, 0.5]}, "abc")
    monkeypatch.setattr(atomic, "text_writer", real)
    lines = (tmp_path / "args_history.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["args"]["lr_img"] == 0.1
    run.record_start({"Iteration": [2], "lr_img": 0.5}, {"phase": 0, "iteration": 2}, {"lr_img": [0.1, 0.5]}, "abc")
    assert [json.loads(line)["args"]["lr_img"] for line in (tmp_path / "args_history.jsonl").read_text().splitlines()] \
        == [0.1, 0.5]
    assert json.loads((tmp_path / "args.json").read_text())["lr_img"] == 0.1  # the first start's flags stay


def test_the_fingerprint_ignores_where_and_how_fast_but_not_what():
    flags = {"lr_img": 10.0, "seed": 0, "buffer_path": ["a"], "name": "x", "device": "cpu", "num_workers": 0}
    same = {**flags, "name": "y", "device": "cuda", "num_workers": 8, "logged_dir": "elsewhere"}
    assert runs.result_digest(flags) == runs.result_digest(same)
    for key, value in (("lr_img", 5.0), ("seed", 1), ("buffer_path", ["b"])):
        assert runs.result_digest({**flags, key: value}) != runs.result_digest(flags), key
    assert runs.differing_flags(flags, {**same, "lr_img": 5.0}) == {"lr_img": [10.0, 5.0]}


def test_a_matching_run_is_found_by_its_flags_and_an_edited_one_is_refused(tmp_path):
    flags = {"Iteration": [2], "lr_img": 10.0, "name": "unnamed"}
    first = runs.find_matching_run(tmp_path, "lors_b20_s0", flags)
    other = runs.find_matching_run(tmp_path, "lors_b20_s0", {**flags, "lr_img": 5.0})
    assert first.path != other.path and first.name.startswith("lors_b20_s0_")
    first.record_start({**flags, "name": first.name}, None, {}, "abc")
    assert runs.find_matching_run(tmp_path, "lors_b20_s0", flags).path == first.path
    edited = json.loads(first.history.read_text())
    edited["args"]["lr_img"] = 1.0
    first.history.write_text(json.dumps(edited) + "\n")
    with pytest.raises(RunFolderError, match=r"--lr_img 1\.0 -> 10\.0"):
        runs.find_matching_run(tmp_path, "lors_b20_s0", flags)


def test_a_keyed_folder_records_its_flags_and_refuses_an_edited_record(tmp_path):
    assert not runs.keyed_folder(tmp_path, {"lr": 1}).exists()  # only the caller that makes the work creates it
    folder = runs.keyed_folder(tmp_path, {"lr": 1, "num_workers": 4}, create=True)
    assert json.loads((folder / "flags.json").read_text()) == {"lr": 1}
    assert runs.keyed_folder(tmp_path, {"lr": 1, "num_workers": 0}) == folder
    assert runs.keyed_folder(tmp_path, {"lr": 2}) != folder
    (folder / "flags.json").write_text(json.dumps({"lr": 3}))
    with pytest.raises(RunFolderError, match="edited by hand"):
        runs.keyed_folder(tmp_path, {"lr": 1})


def test_metrics_after_the_resume_point_are_dropped(tmp_path):
    run = RunFolder(tmp_path)
    records = [{"phase": 0, "iteration": i} for i in (0, 10, 20, 30)] + [{"phase": 1, "iteration": 0}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"phase": 1, "iter')
    assert run.trim_metrics(0, 20) == 3
    assert [json.loads(line) for line in run.metrics.read_text().splitlines()] == records[:3]


def test_a_new_folder_beside_ones_made_with_other_flags_says_why(tmp_path, caplog):
    first = runs.find_matching_run(tmp_path, "lors_b20_s0", {"Iteration": [2], "lr_img": 10.0})
    first.record_start({"Iteration": [2], "lr_img": 10.0}, None, {}, "abc")
    with caplog.at_level("INFO", logger="ptmst"):
        second = runs.find_matching_run(tmp_path, "lors_b20_s0", {"Iteration": [2], "lr_img": 5.0})
    assert second.path != first.path
    assert f"nearest, {first.name}, differs in --lr_img 10.0 -> 5.0" in caplog.text
    runs.keyed_folder(tmp_path / "experts", {"lr": 1}, create=True)
    caplog.clear()
    with caplog.at_level("INFO", logger="ptmst"):
        runs.keyed_folder(tmp_path / "experts", {"lr": 2}, create=True)
    assert "differs in --lr 1 -> 2" in caplog.text
