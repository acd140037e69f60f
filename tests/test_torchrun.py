"""distill_ptm-st.py under torchrun: 2 gloo processes on the CPU against one process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_utils.experts import trajectories
from distill_utils.app import buffer, distill
from tests.helpers import shapes_args
from tests.test_distill import distill_argv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "distill_ptm-st.py")
# torchrun gives each process one thread; the single process must sum its kernels alike to compare bits
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
KEYS = ("image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt")


def argv(shapes_root, tmp, shortcut, name, *extra, iterations=4, trainable=True):
    """One phase on the shapes experts, two segments per iteration, every graph kept (an explicit
    policy: ``auto``'s timed choice may differ between two runs in the last bits). A trainable
    image encoder matches its segments one after another, a frozen one batched (where a process has
    two)."""
    return shapes_args(shapes_root, tmp, *(["--image_trainable"] if trainable else []), "--buffer_path", str(shortcut), "--subset_num", "1",
                       "--min_start_epoch", "0", "--max_start_epoch", "2", "--num_queries", "6", "--Iteration",
                       str(iterations), "--eval_it", str(min(iterations, 10)), "--num_eval", "1",
                       "--epoch_eval_train", "2", "--mini_batch_size", "3", "--syn_steps", "2", "--lr_lr", "1e-7",
                       "--lr_img", "0.01", "--lr_txt", "0.01", "--lr_sim", "0.001", "--logged_dir",
                       str(tmp / "logged"), "--name", name, "--device", "cpu", "--segments_per_iter", "2",
                       "--keep_graphs", "2", "--segment_batching", "sequential" if trainable else "vmap", *extra)


def torchrun(nproc: int, args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               SCRIPT, *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finished(process, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def one_process(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def distilled(tmp, name, it):
    return torch.load(tmp / "logged" / "shapes" / name / f"distilled_0_{it}.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_distil_the_set_one_process_distils(shapes_root, expert_dirs, tmp_path):
    shortcut = expert_dirs[2]
    two = torchrun(2, argv(shapes_root, tmp_path, shortcut, "two"))
    output = finished(two)
    assert two.returncode == 0, output
    assert "2 processes (torchrun), 1 segment(s) per iteration each" in output
    alone = one_process(argv(shapes_root, tmp_path, shortcut, "one"))
    assert alone.returncode == 0, alone.stderr
    single = one_process(argv(shapes_root, tmp_path, shortcut, "k1", "--segments_per_iter", "1"))
    assert single.returncode == 0, single.stderr
    a, b, c = (distilled(tmp_path, name, 4) for name in ("two", "one", "k1"))
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"])  # the second segment changed the set: the test can fail
    run = tmp_path / "logged" / "shapes" / "two"
    written = sorted(p.name for p in run.iterdir())
    assert "distilled_0_4.pt" in written and not [n for n in written if n.endswith(".tmp")]


@pytest.mark.slow
def test_two_processes_match_what_one_process_matches_batched(shapes_root, tmp_path):
    """A frozen encoder: one process batches its two segments, each of two processes has one; the sets
    agree to float32 rounding, and the sequential matching agrees with both."""
    buffer.main(shapes_args(shapes_root, tmp_path, "--num_experts", "2", "--train_epochs", "3", "--eval_freq", "3",
                            "--batch_size_train", "32", "--buffer_path", str(tmp_path / "buffer")))
    shortcut = trajectories.expert_folder(tmp_path / "buffer", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    two = torchrun(2, argv(shapes_root, tmp_path, shortcut, "two", trainable=False))
    output = finished(two)
    assert two.returncode == 0, output
    runs = {"one": (), "sequential": ("--segment_batching", "sequential"), "k1": ("--segments_per_iter", "1")}
    for name, extra in runs.items():
        alone = one_process(argv(shapes_root, tmp_path, shortcut, name, *extra, trainable=False))
        assert alone.returncode == 0, alone.stderr
    sets = {name: distilled(tmp_path, name, 4) for name in ("two", *runs)}
    for key in KEYS:
        for other in ("one", "sequential"):
            assert torch.allclose(sets["two"][key], sets[other][key], rtol=1e-5, atol=1e-6), (key, other)
    assert not torch.allclose(sets["two"]["image"], sets["k1"]["image"], rtol=1e-5, atol=1e-6)


def rank_pid(name: str, rank: int) -> int:
    """The pid of the torchrun worker of run ``name`` with RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if name.encode() in command and f"RANK={rank}".encode() in environment and SCRIPT.encode() in command:
            return int(entry.name)
    raise LookupError(f"no rank {rank} of {name}")


@pytest.mark.slow
def test_a_run_whose_rank_is_killed_stops_and_resumes_on_one_process_to_the_same_set(shapes_root, expert_dirs,
                                                                                   tmp_path):
    shortcut = expert_dirs[2]
    run = tmp_path / "logged" / "shapes" / "killed"
    process = torchrun(2, argv(shapes_root, tmp_path, shortcut, "killed", iterations=60))
    deadline = time.time() + 240
    while not (run / "distilled_0_10.pt").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.02)
    os.kill(rank_pid("killed", 1), signal.SIGKILL)
    output = finished(process, timeout=120)  # the other rank must not hang
    assert process.returncode != 0
    stopped = [line for line in output.splitlines() if line.startswith("error:")]
    if stopped:  # rank 0 saw the lost peer before torchrun ended it: the message says what to do
        assert "another rank stopped" in stopped[0] and "--resume" in stopped[0], stopped
    assert not (run / "distilled_0_60.pt").exists()

    resumed = one_process(argv(shapes_root, tmp_path, shortcut, "killed", "--resume", iterations=60))
    assert resumed.returncode == 0, resumed.stderr
    whole = one_process(argv(shapes_root, tmp_path, shortcut, "whole", iterations=60))
    assert whole.returncode == 0, whole.stderr
    a, b = distilled(tmp_path, "killed", 60), distilled(tmp_path, "whole", 60)
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_refusal_on_rank_0_stops_every_rank_with_its_message(shapes_root, expert_dirs, tmp_path):
    shortcut = expert_dirs[2]
    first = torchrun(2, argv(shapes_root, tmp_path, shortcut, "taken", iterations=2))
    assert first.wait(timeout=300) == 0
    again = torchrun(2, argv(shapes_root, tmp_path, shortcut, "taken", iterations=2))
    output = finished(again, timeout=120)
    assert again.returncode != 0
    assert "already holds a run: pass --resume" in output
    assert "rank 1: rank 0 stopped before the run began" in output


def test_segments_that_do_not_split_over_the_processes_are_refused(shapes_root, expert_dirs, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        distill.parse_args(distill_argv(shapes_root, tmp_path, [expert_dirs[2]], "--segments_per_iter", "3"))
    message = capsys.readouterr().err
    assert "--segments_per_iter 3 does not split over the 2 processes" in message
    assert "pass a multiple of 2" in message


def test_under_torchrun_a_numbered_gpu_is_refused():
    ranks = distill.Ranks(1, 2, 1)
    with pytest.raises(distill.UsageError, match="every process takes cuda:LOCAL_RANK"):
        distill.rank_device("cuda:1", ranks)
    assert distill.rank_device("cpu", ranks) == torch.device("cpu")
