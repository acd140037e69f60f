"""Fault injection: racing writers, kills at chosen points, full disks, and the files they leave.

Each test sets up the fault for real where it can (several processes, SIGKILL, a tiny tmpfs when this
machine lets us mount one) and by an injected OSError otherwise.
"""
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_utils.experts import trajectories
from distill_utils.app import buffer
from distill_utils.runtime.atomic import write_all, torch_writer
from distill_utils.app.cli import run_script
from distill_utils.experts.trajectories import TrajectoryBuffer
from distill_utils.pipeline import sweep
from tests.helpers import shapes_args, workdir

ROOT = Path(__file__).resolve().parents[1]


def marked_trajectory(marker: float):
    return [[torch.full((3,), marker)], [torch.full((3,), marker + 0.5)]]


def claim_and_write(folder: str, writer: int, count: int, barrier) -> None:
    barrier.wait()
    for k in range(count):
        index = trajectories.claim_next_index(Path(folder))
        try:
            marker = float(writer * 1000 + k)
            trajectories.write_expert(Path(folder), index, marked_trajectory(marker), marked_trajectory(-marker))
        finally:
            trajectories.release_claim(Path(folder), index)


def markers(folder: Path):
    found = {}
    for index in trajectories.twin_indices(folder):
        for side in ("image", "text"):
            value = torch.load(trajectories.twin_path(folder, side, index), weights_only=True)[0][0][0][0].item()
            found.setdefault(index, []).append(value)
    return found


@pytest.mark.slow
def test_racing_writers_never_overwrite_an_expert(tmp_path):
    """Several processes claim and write at once: every expert written survives, each image file sits
    beside its own text file. (The claim-then-list race lost 5-29 of 160-300 experts this way.)"""
    writers, each = 6, 30
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [context.Process(target=claim_and_write, args=(str(tmp_path), w, each, barrier)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    found = markers(tmp_path)
    assert len(found) == writers * each
    assert sorted(image for image, _ in found.values()) == sorted(float(w * 1000 + k) for w in range(writers)
                                                                   for k in range(each))
    assert all(text == -image for image, text in found.values())  # twins from the same writer and step
    assert not list(tmp_path.glob(".claim_*")) and not list(tmp_path.glob("*.tmp"))


def test_claims_of_dead_processes_on_this_host_are_cleaned_with_their_partial_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".claim_0").write_text(f"{os.uname().nodename} pid {dead.pid}\n")
    (tmp_path / ".img_replay_buffer_0.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "txt_replay_buffer_0.pt").write_bytes(b"renamed before the kill")
    (tmp_path / ".claim_1").write_text(f"{os.uname().nodename} pid {os.getpid()}\n")  # alive: ours
    (tmp_path / ".claim_2").write_text("another-host pid 12345\n")  # cannot be checked from here
    assert trajectories.remove_stale_writes(tmp_path) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".claim_1", ".claim_2", ".lock"]
    assert trajectories.claim_next_index(tmp_path) == 0


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
from distill_utils.experts import trajectories
point = {point!r}
real_replace = os.replace
calls = []
def replace(src, dst):
    calls.append(dst)
    if point == "between renames" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
real_save = torch.save
def save(obj, stream, *a, **k):
    if point == "while writing":
        stream.write(b"PK half a file")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, stream, *a, **k)
torch.save = save
folder = Path({folder!r})
index = trajectories.claim_next_index(folder)
t = [[torch.ones(3)], [torch.zeros(3)]]
trajectories.write_expert(folder, index, t, t)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["while writing", "between renames"])
def test_a_writer_killed_mid_expert_leaves_nothing_that_blocks_the_folder(tmp_path, point, caplog):
    trajectories.write_expert(tmp_path, 0, marked_trajectory(1.0), marked_trajectory(-1.0))
    code = KILLED_WRITER.format(root=str(ROOT), point=point, folder=str(tmp_path))
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert (tmp_path / ".claim_1").exists()  # what the kill left
    assert TrajectoryBuffer(tmp_path).indices == [0]  # readers go on with the complete experts
    assert trajectories.claim_next_index(tmp_path) == 1  # the next writer cleans up and reuses the index
    trajectories.release_claim(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "img_replay_buffer_0.pt", "txt_replay_buffer_0.pt"]


def test_a_failed_second_file_leaves_neither_file_of_the_pair(tmp_path, monkeypatch):
    writes = []

    def full_disk_on_second(obj):
        def write(stream):
            writes.append(1)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            torch.save(obj, stream)
        return write

    monkeypatch.setattr(trajectories, "torch_writer", full_disk_on_second)
    with pytest.raises(OSError) as raised:
        trajectories.write_expert(tmp_path, 0, marked_trajectory(1.0), marked_trajectory(2.0))
    assert raised.value.errno == errno.ENOSPC and "img_replay_buffer_0.pt" in raised.value.filename
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_removes_the_first_file_of_the_pair(tmp_path, monkeypatch):
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        write_all([(tmp_path / "a", torch_writer(1)), (tmp_path / "b", torch_writer(2))])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_filesystem(mount_tmpfs):
    """A 1 MiB filesystem."""
    return mount_tmpfs("tiny", "size=1m")


@pytest.mark.slow
def test_a_full_disk_stops_buffer_py_with_a_message_and_keeps_every_finished_expert(
        shapes_root, tmp_path, tiny_filesystem, capsys):
    (tiny_filesystem / "filler").write_bytes(b"\0" * 700_000)
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_experts", "6", "--train_epochs", "1",
                       "--eval_freq", "1", "--batch_size_train", "64", "--buffer_path", str(tiny_filesystem / "b"))
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: buffer.main(argv))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "no space left on the device while writing" in error and "unexpected pos" not in error
    folder = trajectories.expert_folder(tiny_filesystem / "b", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    written = TrajectoryBuffer(folder).indices
    assert written and len(written) < 6
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".claim_*"))
    assert trajectories.twin_indices(folder) == written and not trajectories.incomplete_twins(folder)


def test_rerunning_buffer_py_never_repeats_an_expert(shapes_root, tmp_path):
    argv = shapes_args(shapes_root, tmp_path, "--image_trainable", "--num_experts", "1", "--train_epochs", "1",
                       "--eval_freq", "1", "--batch_size_train", "64", "--buffer_path", str(tmp_path / "b"))
    assert buffer.main(argv) == [0]
    assert buffer.main(argv) == [1]  # a rerun, e.g. after the interrupt message invited one
    folder = trajectories.expert_folder(tmp_path / "b", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    first, second = TrajectoryBuffer(folder).experts()
    for side in ("image", "text"):
        assert not torch.equal(first.flat(side, 0), second.flat(side, 0))
        assert not torch.equal(first.flat(side, 1), second.flat(side, 1))
    seeds = [json.loads(line)["expert"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert seeds == [0, 1]  # metrics name the index, which is the seed offset


def test_temporaries_no_writer_holds_are_named_by_readers_and_removed_by_the_next_writer(tmp_path, caplog):
    trajectories.write_expert(tmp_path, 0, marked_trajectory(1.0), marked_trajectory(-1.0))
    (tmp_path / ".img_replay_buffer_1.pt.x1y2.tmp").write_bytes(b"\0" * 1000)  # e.g. from an older version
    (tmp_path / ".claim_2").write_text(f"{os.uname().nodename} pid {os.getpid()}\n")
    (tmp_path / ".txt_replay_buffer_2.pt.live.tmp").write_bytes(b"being written")  # a live writer's
    with caplog.at_level("WARNING"):
        assert TrajectoryBuffer(tmp_path).indices == [0]
    assert ".img_replay_buffer_1.pt.x1y2.tmp" in caplog.text and ".txt_replay_buffer_2" not in caplog.text
    assert trajectories.claim_next_index(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".txt_replay_buffer_2.pt.live.tmp"]


RACE_TOP_UP = """
import sys
from pathlib import Path
from distill_utils.app.cli import scripts
from distill_utils.pipeline import stages
from distill_utils.pipeline.settings import QUICKSTART
s = QUICKSTART["smoke"]
work = stages.Workdir(Path(sys.argv[1]), scripts())
stages.generate_data(s, work)
stages.pretrain_encoder(s, work)
print(stages.top_up_experts(s, work))
"""


def test_two_calls_on_one_workdir_train_the_shared_encoder_and_experts_once(tmp_path):
    """Two quick starts, ablations or studies at once: each shared stage is trained by one of them, the other
    waits and reuses it, and the expert folder never holds more experts than planned."""
    import os
    import subprocess
    import sys
    from distill_utils.experts import trajectories
    from distill_utils.app import quickstart
    script = tmp_path / "race.py"
    script.write_text(RACE_TOP_UP)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    racers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")], cwd=root, text=True, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [r.communicate(timeout=600) for r in racers]
    assert all(r.returncode == 0 for r in racers), [o[1][-2000:] for o in outputs]
    folders = {o[0].strip().splitlines()[-1] for o in outputs}
    assert len(folders) == 1
    planned = quickstart.PRESETS["smoke"].num_experts
    assert len(trajectories.twin_indices(Path(folders.pop()))) == planned
    trained = sum((o[0] + o[1]).count("saved expert") for o in outputs)  # pretraining (1 run) + the experts
    assert trained == 1 + planned


def write_marked_experts(folder: Path, markers) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, marker in enumerate(markers):
        trajectories.write_expert(folder, index, marked_trajectory(marker), marked_trajectory(-marker))


def test_the_digest_of_a_large_trajectory_file_sees_a_change_in_its_middle(tmp_path):
    """Files over the whole-file limit are read at their ends only: torch.save's zip directory there holds
    every tensor's CRC-32, so one changed value in the middle still changes the digest."""
    path = tmp_path / "img_replay_buffer_0.pt"
    values = torch.zeros(3_000_000)  # 12 MB, over the limit
    torch.save([values], path)
    assert path.stat().st_size > trajectories.WHOLE_FILE_LIMIT
    before = trajectories.file_digest(path)
    values[1_500_000] = 1.0
    torch.save([values], path)
    assert trajectories.file_digest(path) != before
    torch.save([values], path)  # the same content written again: the same digest
    assert trajectories.file_digest(path) == trajectories.file_digest(path)


def test_a_run_made_from_other_experts_is_never_reused_and_the_advice_works(tmp_path, monkeypatch):
    from distill_utils.app import ablation
    from distill_utils.runtime.errors import UsageError
    from distill_utils.runtime.runs import RunFolder
    experts = tmp_path / "experts"
    write_marked_experts(experts, [1.0, 2.0])
    run = RunFolder(tmp_path / "logged" / "lors_b10_s0_abc")
    run.path.mkdir(parents=True)
    (run.path / "args.json").write_text(json.dumps({"Iteration": [3]}))
    run.checkpoint(0, 3).write_bytes(b"a finished run")
    run.record_experts(trajectories.experts_identity([experts]))
    distilled = []
    work = workdir(tmp_path)
    # the folder exists before the distiller starts: the sweep's lock of the run lies in it
    monkeypatch.setattr(sweep, "distill_run", lambda work, folder, flags: (distilled.append(folder),
                                                                           folder.path.mkdir(parents=True,
                                                                                             exist_ok=True)))
    sweep.ensure_run(work, run, [], "run 1/1")  # the same experts: reused
    assert distilled == []

    for change, named in [("rewritten", "img_replay_buffer_1.pt"), ("new", "img_replay_buffer_2.pt"),
                          ("gone", "img_replay_buffer_0.pt")]:
        if change == "rewritten":
            trajectories.write_expert(experts, 1, marked_trajectory(7.0), marked_trajectory(-7.0))
        elif change == "new":
            write_marked_experts(experts, [1.0, 7.0, 3.0])
        else:
            for side in ("image", "text"):
                trajectories.twin_path(experts, side, 0).unlink()
        with pytest.raises(UsageError) as refused:
            sweep.ensure_run(work, run, [], "run 1/1")
        message = str(refused.value)
        assert f"{change}: {named}" in message and str(run.path) in message and distilled == []
        run.record_experts(trajectories.experts_identity([experts]))  # accept this state for the next case

    trajectories.write_expert(experts, 1, marked_trajectory(9.0), marked_trajectory(-9.0))
    with pytest.raises(UsageError, match="Move that run folder away and run the same command again"):
        sweep.ensure_run(work, run, [], "run 1/1")
    run.path.rename(tmp_path / "kept_aside")  # the advice, followed literally
    monkeypatch.setattr(sweep, "recorded_seconds", lambda path: 0.0)
    sweep.ensure_run(work, RunFolder(run.path), [], "run 1/1")
    assert [folder.path for folder in distilled] == [run.path]  # distilled afresh from the experts there now


def test_a_resume_names_the_experts_rewritten_since_the_run_started(tmp_path, caplog):
    from distill_utils.app import distill
    from distill_utils.runtime.runs import RunFolder
    experts = tmp_path / "experts"
    write_marked_experts(experts, [1.0, 2.0])
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    distill.record_experts(run, [experts], resumed=False)
    first = json.loads(run.experts_record.read_text())
    assert set(first["phases"][0]["files"]) == {"img_replay_buffer_0.pt", "img_replay_buffer_1.pt",
                                                "txt_replay_buffer_0.pt", "txt_replay_buffer_1.pt"}
    trajectories.write_expert(experts, 0, marked_trajectory(5.0), marked_trajectory(-5.0))
    with caplog.at_level("WARNING", logger="ptmst"):
        distill.record_experts(run, [experts], resumed=True)
    assert "rewritten: img_replay_buffer_0.pt, txt_replay_buffer_0.pt" in caplog.text
    assert json.loads(run.experts_record.read_text()) == first  # the record of the start is kept


def test_the_ablation_gives_a_run_for_changed_experts_a_folder_of_its_own(tmp_path):
    from distill_utils.app import ablation
    from distill_utils.runtime.runs import RunFolder
    experts = tmp_path / "experts"
    write_marked_experts(experts, [1.0, 2.0])
    made = RunFolder(tmp_path / "logged" / "mttvl_b10_s0_abc")
    made.path.mkdir(parents=True)
    (made.path / "args.json").write_text(json.dumps({"Iteration": [3]}))
    made.record_experts(trajectories.experts_identity([experts]))
    assert sweep.for_the_experts_there(made, [str(experts)]).path == made.path
    write_marked_experts(experts, [1.0, 2.0, 3.0])  # topped up with a third expert since
    other = sweep.for_the_experts_there(made, [str(experts)])
    assert other.path != made.path and other.path.parent == made.path.parent
    assert other.name.startswith(made.name + "_e") and not other.holds_run()
    other.path.mkdir()  # once distilled there, the same experts find it again, and the first run is kept
    (other.path / "args.json").write_text(json.dumps({"Iteration": [3]}))
    other.record_experts(trajectories.experts_identity([experts]))
    assert sweep.for_the_experts_there(made, [str(experts)]).path == other.path
    assert made.experts_record.is_file()


def test_two_convexify_calls_at_once_make_each_shortcut_once(expert_dirs, tmp_path):
    import re
    import shutil
    _, normal, _, _ = expert_dirs
    experts = tmp_path / "normal"
    shutil.copytree(normal, experts)
    out = tmp_path / "shortcut"
    # each shortcut takes a second to write, so the two calls overlap whichever starts first
    call = ("import sys, time; from distill_utils.app import convexify; full = convexify.convexify_full; "
            "convexify.convexify_full = lambda *a: (time.sleep(1.0), full(*a))[1]; "
            "convexify.main(['--normal_dir', sys.argv[1], '--start', '0', '--end', '3', '--out_dir', sys.argv[2]])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([sys.executable, "-c", call, str(experts), str(out)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [o[1][-1500:] for o in outputs]
    written = [int(re.search(r"(\d+) expert\(s\) written", o[0]).group(1)) for o in outputs]
    assert sorted(written) == [0, len(trajectories.twin_indices(experts))]  # one made them, the other found them
    assert trajectories.twin_indices(out) == trajectories.twin_indices(experts)
