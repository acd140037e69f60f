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

from distill_utils import trajectories
from distill_utils.app import buffer
from distill_utils.atomic import write_all, torch_writer
from distill_utils.app.cli import run_script
from distill_utils.trajectories import TrajectoryBuffer
from tests.helpers import shapes_args

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
from distill_utils import trajectories
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
from distill_utils.app import quickstart
s = quickstart.PRESETS["smoke"]
work = Path(sys.argv[1])
quickstart.generate_data(s, work)
quickstart.pretrain_encoder(s, work)
print(quickstart.top_up_experts(s, work))
"""


def test_two_calls_on_one_workdir_train_the_shared_encoder_and_experts_once(tmp_path):
    """Two quick starts, ablations or studies at once: each shared stage is trained by one of them, the other
    waits and reuses it, and the expert folder never holds more experts than planned."""
    import os
    import subprocess
    import sys
    from distill_utils import trajectories
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
