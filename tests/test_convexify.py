"""convexify: the formula against a brute-force loop; compact == full; bad arguments; reruns."""
import math
import os

import pytest
import torch

from distill_utils.experts import trajectories
from distill_utils.app import convexify
from distill_utils.experts.shortcut import convexify_trajectory
from distill_utils.experts.trajectories import TrajectoryBuffer
from tests.helpers import fake_trajectory

SHAPES = [(3, 4), (4,), (2, 2)]


def brute_force(trajectory, start, end):
    snaps = trajectory[start:end]
    k = len(snaps) - 1
    out = []
    for t in range(k + 1):
        snapshot = []
        for layer in range(len(snaps[0])):
            norms = [math.sqrt(float(((snaps[p + 1][layer].double() - snaps[p][layer].double()) ** 2).sum()))
                     for p in range(k)]
            total = sum(norms)
            beta = sum(norms[:t]) / total if total > 0 else 0.0
            snapshot.append((1 - beta) * snaps[0][layer].double() + beta * snaps[k][layer].double())
        out.append(snapshot)
    return out


def trajectory_with_a_frozen_layer(seed, snapshots=7):
    trajectory = fake_trajectory(SHAPES, snapshots, seed)
    for snapshot in trajectory:
        snapshot[2] = trajectory[0][2].clone()  # this parameter never moves
    return trajectory


@pytest.mark.parametrize("start,end", [(0, 7), (1, 5), (2, 4)])
def test_formula_matches_brute_force(start, end):
    trajectory = trajectory_with_a_frozen_layer(0)
    got = convexify_trajectory(trajectory, start, end)
    want = brute_force(trajectory, start, end)
    assert len(got) == end - start
    for g_snap, w_snap in zip(got, want):
        for g, w in zip(g_snap, w_snap):
            assert torch.allclose(g.double(), w, atol=1e-6)
    for layer in range(len(SHAPES)):  # endpoints copied exactly
        assert torch.equal(got[0][layer], trajectory[start][layer])
        assert torch.equal(got[-1][layer], trajectory[end - 1][layer])
    assert all(torch.equal(s[2], trajectory[0][2]) for s in got)  # the frozen layer stays put


def test_paced_by_accumulated_step_lengths():
    """A layer that moves 1 then 3 along a line sits at 1/4 of the way after the first step."""
    steps = [torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])]
    shortcut = convexify_trajectory([[s] for s in steps], 0, 3)
    assert torch.allclose(shortcut[1][0], 0.75 * steps[0] + 0.25 * steps[2])


@pytest.fixture
def normal_dir(tmp_path):
    folder = tmp_path / "buffer" / "normal"
    folder.mkdir(parents=True)
    for index in range(2):
        trajectories.write_expert(folder, index, trajectory_with_a_frozen_layer(index),
                                  trajectory_with_a_frozen_layer(10 + index))
    return folder


def test_full_output_mirrors_input_names(normal_dir):
    out = convexify.main(["--normal_dir", str(normal_dir), "--start", "1", "--end", "6"])
    assert out == normal_dir.parent / "convexified_1_6"
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(p.name for p in normal_dir.glob("*.pt"))
    loaded = trajectories.load_trajectory_file(out / "txt_replay_buffer_1.pt")
    want = brute_force(trajectory_with_a_frozen_layer(11), 1, 6)
    assert len(loaded) == 1 and len(loaded[0]) == 5
    assert torch.allclose(loaded[0][3][0].double(), want[3][0], atol=1e-6)


def test_compact_materialises_exactly_like_full(normal_dir):
    full = convexify.main(["--normal_dir", str(normal_dir), "--start", "0", "--end", "6"])
    compact = convexify.main(["--normal_dir", str(normal_dir), "--start", "0", "--end", "6", "--compact"])
    full_experts, compact_experts = TrajectoryBuffer(full).experts(), TrajectoryBuffer(compact).experts()
    assert len(compact_experts) == 2 and compact_experts[0].num_snapshots == 6
    for a, b in zip(full_experts, compact_experts):
        for side in ("image", "text"):
            for t in range(6):
                assert torch.equal(a.flat(side, t), b.flat(side, t)), (side, t)
    full_bytes = sum(p.stat().st_size for p in full.glob("*.pt"))
    compact_bytes = sum(p.stat().st_size for p in compact.glob("*.pt"))
    assert compact_bytes < full_bytes


def test_compact_half_precision_is_close(normal_dir):
    full = convexify.main(["--normal_dir", str(normal_dir), "--start", "0", "--end", "6"])
    half = convexify.main(["--normal_dir", str(normal_dir), "--start", "0", "--end", "6", "--compact",
                           "--dtype", "float16", "--out_dir", str(normal_dir.parent / "half")])
    for a, b in zip(TrajectoryBuffer(full).experts(), TrajectoryBuffer(half).experts()):
        for t in range(6):
            assert torch.allclose(a.flat("image", t), b.flat("image", t), rtol=1e-3, atol=1e-3)


def test_rerun_skips_unless_overwrite(normal_dir, capsys):
    argv = ["--normal_dir", str(normal_dir), "--start", "0", "--end", "4"]
    out = convexify.main(argv)
    stamp = (out / "img_replay_buffer_0.pt").stat().st_mtime_ns
    before = (out / "img_replay_buffer_0.pt").read_bytes()
    convexify.main(argv)
    assert "2 already there, skipped" in capsys.readouterr().out
    assert (out / "img_replay_buffer_0.pt").stat().st_mtime_ns == stamp
    convexify.main(argv + ["--overwrite"])
    assert len((out / "img_replay_buffer_0.pt").read_bytes()) == len(before)


@pytest.mark.parametrize("compact", [False, True])
def test_a_shortcut_is_made_again_when_its_expert_was_retrained(normal_dir, capsys, compact):
    argv = ["--normal_dir", str(normal_dir), "--start", "1", "--end", "6"] + (["--compact"] if compact else [])
    out = convexify.main(argv)
    trajectories.write_expert(normal_dir, 1, trajectory_with_a_frozen_layer(30), trajectory_with_a_frozen_layer(31))
    retrained = (normal_dir / "img_replay_buffer_1.pt").stat().st_mtime_ns
    for path in convexify.shortcut_files(out, 1, compact):  # made a second before expert 1 was trained again
        os.utime(path, ns=(retrained - 10**9, retrained - 10**9))
    capsys.readouterr()
    convexify.main(argv)
    assert "1 already there, skipped" in capsys.readouterr().out  # expert 0 kept, expert 1 made again
    want = brute_force(trajectory_with_a_frozen_layer(31), 1, 6)
    remade = TrajectoryBuffer(out).experts()[1]
    assert torch.allclose(remade.flat("text", 3).double(), torch.cat([w.flatten() for w in want[3]]), atol=1e-6)
    convexify.main(argv)
    assert "2 already there, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--start", "0", "--end", "8"], "beyond the trajectory"),
    (["--start", "3", "--end", "4"], "at least two snapshots"),
    (["--start", "0", "--end", "6", "--dtype", "float16"], "--compact output only"),
])
def test_bad_arguments(normal_dir, capsys, argv, message):
    with pytest.raises(SystemExit):
        convexify.main(["--normal_dir", str(normal_dir), *argv])
    assert message in capsys.readouterr().err


def test_empty_and_unpaired_folders(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convexify.main(["--normal_dir", str(tmp_path), "--start", "0", "--end", "3"])
    assert "holds no img/txt_replay_buffer_n.pt pairs" in capsys.readouterr().err
    torch.save([fake_trajectory(SHAPES, 3, 0)], tmp_path / "img_replay_buffer_0.pt")
    with pytest.raises(SystemExit):
        convexify.main(["--normal_dir", str(tmp_path), "--start", "0", "--end", "3"])
    assert "unpaired" in capsys.readouterr().err
