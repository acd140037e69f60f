"""Expert snapshots kept on the device: same values as the files, the budget respected."""
import pytest
import torch

from distill_utils.experts import snapshot_cache, trajectories
from distill_utils.experts.snapshot_cache import GIB, SnapshotCache, auto_budget_bytes

SIZES = {"image": [(5, 7), (4,)], "text": [(4,)]}  # 35 + 4 image values, 4 text values per snapshot


def make_experts(folder, count=2, snapshots=4):
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        sides = {side: [[torch.randn(shape, generator=generator) for shape in SIZES[side]] for _ in range(snapshots)]
                 for side in SIZES}
        trajectories.write_expert(folder, index, sides["image"], sides["text"])
    return trajectories.TrajectoryBuffer(folder).experts()


def by_hand(expert, side, t):
    return torch.cat([p.reshape(-1) for p in expert.snapshot(side, t)])


def test_kept_snapshots_equal_the_files_and_are_served_again(tmp_path):
    experts = make_experts(tmp_path)
    cache = SnapshotCache(torch.device("cpu"), budget_bytes=GIB)
    first = {(e.name, side, t): cache.get(e, side, t) for e in experts for side in SIZES for t in range(4)}
    for (name, side, t), tensor in first.items():
        expert = next(e for e in experts if e.name == name)
        assert torch.equal(tensor, by_hand(expert, side, t))
        assert cache.get(expert, side, t) is tensor  # served from memory, not rebuilt
    assert cache.misses == len(first) and cache.hits == len(first)
    assert cache.kept_bytes == sum(t.numel() * 4 for t in first.values())


def test_nothing_beyond_the_budget_is_kept_but_values_stay_right(tmp_path):
    expert = make_experts(tmp_path, count=1)[0]
    image_bytes = (35 + 4) * 4
    cache = SnapshotCache(torch.device("cpu"), budget_bytes=2 * image_bytes + 10)
    for t in range(4):
        assert torch.equal(cache.get(expert, "image", t), by_hand(expert, "image", t))
    assert sorted(key[2] for key in cache.kept) == [0, 1]  # filled in order, never evicted
    assert cache.kept_bytes == 2 * image_bytes
    assert torch.equal(cache.get(expert, "image", 3), by_hand(expert, "image", 3))
    assert cache.hits == 0 and cache.misses == 5


def test_an_undecided_budget_keeps_nothing_until_it_is_settled(tmp_path, monkeypatch):
    expert = make_experts(tmp_path, count=1)[0]
    monkeypatch.setattr(snapshot_cache, "auto_budget_bytes", lambda device: GIB)  # as a GPU would
    cache = SnapshotCache(torch.device("cpu"), budget_bytes=None)
    cache.get(expert, "text", 0)
    assert not cache.kept
    cache.settle_budget()
    cache.get(expert, "text", 0)
    assert list(cache.kept) == [(expert.name, "text", 0)]
    assert "undecided" not in cache.describe() and "1 snapshots" in cache.describe()


def test_flag_fixes_the_budget_and_the_cpu_default_keeps_nothing():
    fixed = SnapshotCache.from_flag(torch.device("cpu"), 0.5)
    assert fixed.budget_bytes == GIB // 2
    fixed.settle_budget()
    assert fixed.budget_bytes == GIB // 2
    automatic = SnapshotCache.from_flag(torch.device("cpu"), None)
    assert automatic.budget_bytes is None
    automatic.settle_budget()
    assert automatic.budget_bytes == 0
    assert auto_budget_bytes(torch.device("cpu")) == 0


@pytest.mark.gpu
def test_cuda_budget_and_device_copies(tmp_path):
    device = torch.device("cuda")
    expert = make_experts(tmp_path, count=1)[0]
    torch.cuda.reset_peak_memory_stats(device)
    assert auto_budget_bytes(device) > 0
    cache = SnapshotCache(device, budget_bytes=GIB)
    kept = cache.get(expert, "image", 2)
    assert kept.device.type == "cuda" and torch.equal(kept.cpu(), by_hand(expert, "image", 2))
    assert cache.get(expert, "image", 2) is kept
