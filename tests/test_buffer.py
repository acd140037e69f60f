"""buffer.py end to end on shapes, and the trajectory-file module's guarantees."""
import json

import pytest
import torch

from distill_utils.experts import trajectories
from distill_utils.app import buffer
from distill_utils.data import DataError
from distill_utils.experts.trajectories import TrajectoryBuffer, TrajectoryError
from tests.helpers import fake_trajectory, shapes_args


@pytest.fixture(scope="module")
def tiny_buffer(shapes_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("buffer")
    argv = shapes_args(shapes_root, tmp, "--image_trainable", "--num_experts", "2", "--train_epochs", "2",
                       "--eval_freq", "1", "--batch_size_train", "32", "--buffer_path", str(tmp / "buffer"))
    written = buffer.main(argv)
    folder = trajectories.expert_folder(tmp / "buffer", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    return folder, written, argv


def test_buffer_writes_one_snapshot_per_epoch_plus_start(tiny_buffer):
    folder, written, _ = tiny_buffer
    assert written == [0, 1]
    meta = json.loads((folder / "meta.json").read_text())
    buffer = TrajectoryBuffer(folder)
    experts_ = buffer.experts()
    assert len(experts_) == 2
    for expert in experts_:
        assert expert.num_snapshots == 3
        for side in ("image", "text"):
            shapes = [tuple(t.shape) for t in expert.snapshot(side, 0)]
            assert shapes == [tuple(s) for _, s in meta[f"{side}_params"]]
            assert not torch.equal(expert.flat(side, 0), expert.flat(side, 1))  # training moved them
            assert not torch.equal(expert.flat(side, 1), expert.flat(side, 2))
    assert not torch.equal(experts_[0].flat("image", 0), experts_[1].flat("image", 0))  # seed + i per expert
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and "r_mean" in lines[0] and "train_loss" in lines[0]
    assert not list(folder.glob(".claim_*")) and not list(folder.glob("*.tmp"))


def test_authors_file_layout_is_kept(tiny_buffer):
    folder, _, _ = tiny_buffer
    content = torch.load(folder / "img_replay_buffer_0.pt", weights_only=True)
    assert isinstance(content, list) and len(content) == 1          # a list holding one trajectory
    assert len(content[0]) == 3 and isinstance(content[0][0], list)  # snapshots, each a list of tensors
    assert all(t.device.type == "cpu" for t in content[0][0])


def test_rerun_appends_with_the_next_index(tiny_buffer):
    folder, _, argv = tiny_buffer
    argv = list(argv)
    argv[argv.index("--num_experts") + 1] = "1"
    with pytest.raises(TrajectoryError, match="another model"):  # a different model is refused
        buffer.main(argv + ["--image_trainable", "false"])
    argv[argv.index("--train_epochs") + 1] = "1"
    with pytest.raises(TrajectoryError, match=r"3 snapshots.*Pass --train_epochs 2"):  # and experts of other lengths
        buffer.main(argv)
    assert trajectories.twin_indices(folder) == [0, 1]
    assert buffer.main(argv + ["--train_epochs", "2"]) == [2]  # the fix the message names
    assert trajectories.twin_indices(folder) == [0, 1, 2]


def test_torchrun_ranks_split_the_experts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert buffer.my_experts(7) == [1, 4]


def test_claims_never_collide(tmp_path):
    first = trajectories.claim_next_index(tmp_path)
    second = trajectories.claim_next_index(tmp_path)  # first still claimed (a rank still training)
    assert (first, second) == (0, 1)
    trajectories.release_claim(tmp_path, first)
    assert trajectories.claim_next_index(tmp_path) == 0


def test_files_pair_by_index_not_listing_order(tmp_path):
    shapes = [(3, 2), (3,)]
    for index in (10, 2, 7):  # scrambled creation order, with gaps
        torch.save([fake_trajectory(shapes, 2, seed=100 + index)], tmp_path / f"txt_replay_buffer_{index}.pt")
    for index in (7, 10, 2):
        torch.save([fake_trajectory(shapes, 2, seed=index)], tmp_path / f"img_replay_buffer_{index}.pt")
    buffer = TrajectoryBuffer(tmp_path)
    assert buffer.indices == [2, 7, 10]
    for index, expert in zip(buffer.indices, buffer.experts()):
        assert torch.equal(expert.snapshot("image", 1)[0], fake_trajectory(shapes, 2, seed=index)[1][0])
        assert torch.equal(expert.snapshot("text", 1)[0], fake_trajectory(shapes, 2, seed=100 + index)[1][0])


def test_plain_torch_save_of_nested_lists_loads(tmp_path):
    """The authors' downloadable files: plain torch.save, possibly several trajectories per file."""
    shapes = [(4, 4), (4,)]
    torch.save([fake_trajectory(shapes, 3, 1), fake_trajectory(shapes, 3, 2)], tmp_path / "img_replay_buffer_0.pt")
    torch.save([fake_trajectory(shapes, 3, 3), fake_trajectory(shapes, 3, 4)], tmp_path / "txt_replay_buffer_0.pt")
    expected = trajectories.ExpectedShapes(image=[("w", (4, 4)), ("b", (4,))], text=[("w", (4, 4)), ("b", (4,))])
    found = TrajectoryBuffer(tmp_path, expected).experts()
    assert len(found) == 2 and found[1].num_snapshots == 3
    assert torch.equal(found[1].flat("text", 2), torch.cat([t.flatten() for t in fake_trajectory(shapes, 3, 4)[2]]))


def test_lone_twin_files_are_named_and_skipped_never_paired(tmp_path, caplog):
    shapes = [(2,)]
    torch.save([fake_trajectory(shapes, 2, 0)], tmp_path / "img_replay_buffer_0.pt")
    torch.save([fake_trajectory(shapes, 2, 0)], tmp_path / "txt_replay_buffer_0.pt")
    torch.save([fake_trajectory(shapes, 2, 0)], tmp_path / "img_replay_buffer_1.pt")
    torch.save([fake_trajectory(shapes, 2, 1)], tmp_path / "txt_replay_buffer_2.pt")
    with caplog.at_level("WARNING"):
        buffer = TrajectoryBuffer(tmp_path)
    assert buffer.indices == [0]
    assert "img_replay_buffer_1.pt" in caplog.text and "txt_replay_buffer_2.pt" in caplog.text
    assert trajectories.claim_next_index(tmp_path) == 3  # lone files keep their index taken


def test_shape_mismatch_is_refused(tmp_path):
    torch.save([fake_trajectory([(4, 4), (4,)], 2, 0)], tmp_path / "img_replay_buffer_0.pt")
    torch.save([fake_trajectory([(4, 4), (4,)], 2, 0)], tmp_path / "txt_replay_buffer_0.pt")
    expected = trajectories.ExpectedShapes(image=[("w", (4, 4)), ("b", (4,))], text=[("w", (8, 4)), ("b", (8,))])
    with pytest.raises(TrajectoryError, match=r"text-side snapshot does not fit.*tensor 0 \(w\) has shape \(4, 4\)"):
        TrajectoryBuffer(tmp_path, expected).experts()
    expected = trajectories.ExpectedShapes(image=[("w", (4, 4))], text=[("w", (4, 4)), ("b", (4,))])
    with pytest.raises(TrajectoryError, match="2 tensors where the model has 1"):
        TrajectoryBuffer(tmp_path, expected).experts()


def test_corrupt_file_is_named(tmp_path):
    (tmp_path / "img_replay_buffer_0.pt").write_bytes(b"\x00" * 100)
    torch.save([fake_trajectory([(2,)], 2, 0)], tmp_path / "txt_replay_buffer_0.pt")
    with pytest.raises(TrajectoryError, match=r"img_replay_buffer_0\.pt.*corrupt"):
        TrajectoryBuffer(tmp_path).experts()


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(TrajectoryError, match="holds no expert"):
        TrajectoryBuffer(tmp_path)
    with pytest.raises(TrajectoryError, match="does not exist"):
        TrajectoryBuffer(tmp_path / "nope")


def test_interrupted_write_leaves_no_truncated_file(tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trajectories.write_expert(tmp_path, 0, fake_trajectory([(2,)], 2, 0), fake_trajectory([(2,)], 2, 0))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == []
    assert trajectories.claim_next_index(tmp_path) == 0


def test_missing_dataset_fails_clearly(tmp_path):
    argv = shapes_args(tmp_path / "nowhere", tmp_path, "--num_experts", "1", "--train_epochs", "1",
                       "--buffer_path", str(tmp_path / "b"))
    with pytest.raises(DataError, match=r"shapes_train\.json does not exist"):
        buffer.main(argv)


def test_strict_boolean_flags():
    parse = buffer.build_parser().parse_args
    assert parse(["--no_aug"]).no_aug is True
    assert parse(["--no_aug", "false"]).no_aug is False
    assert parse(["--disabled_wandb", "True"]).disabled_wandb is True
    assert parse(["--image_pretrained", "False"]).image_pretrained is False
    with pytest.raises(SystemExit):
        parse(["--no_aug", "maybe"])


def test_a_non_finite_snapshot_is_named_when_first_used(tmp_path):
    image = fake_trajectory([(2,)], 3, 0)
    image[1] = [torch.full((2,), float("inf"))]  # damaged in the middle only: found on first use
    torch.save([image], tmp_path / "img_replay_buffer_0.pt")
    torch.save([fake_trajectory([(2,)], 3, 1)], tmp_path / "txt_replay_buffer_0.pt")
    expert = TrajectoryBuffer(tmp_path).experts()[0]
    expert.flat("image", 2)
    with pytest.raises(TrajectoryError, match=r"img_replay_buffer_0\.pt\[0\]: image-side snapshot 1 holds NaN/Inf"):
        expert.flat("image", 1)


def test_an_expert_is_the_same_trained_alone_or_after_others(tiny_buffer, tmp_path):
    """Expert 1 of a two-expert call equals expert 1 appended by a second call: its dropout masks come
    from its own seed, not from what the process drew before (expert 0's training and evaluation)."""
    folder, _, argv = tiny_buffer
    argv = list(argv)
    argv[argv.index("--buffer_path") + 1] = str(tmp_path / "buffer")
    argv[argv.index("--num_experts") + 1] = "1"
    assert buffer.main(argv) == [0]
    assert buffer.main(argv) == [1]
    alone = trajectories.expert_folder(tmp_path / "buffer", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    for side in ("image", "text"):
        together = trajectories.load_trajectory_file(trajectories.twin_path(folder, side, 1))
        appended = trajectories.load_trajectory_file(trajectories.twin_path(alone, side, 1))
        for a, b in zip(together[0], appended[0]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
