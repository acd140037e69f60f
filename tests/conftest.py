"""Shared fixtures: CPU only, offline hub, a tiny generated ``shapes`` dataset, small models."""
import itertools
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill_utils.experts import trajectories  # noqa: E402
from distill_utils.app import buffer, convexify
from distill_utils.data import shapes  # noqa: E402
from tests.helpers import shapes_args  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small shapes dataset (16 px): 24 train images x 5 captions, 8 val, 8 test."""
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate(root, shapes.ShapesConfig(num_train=24, num_val=8, num_test=8, image_size=16, seed=3),
                    progress=False)
    return root


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _steady_clock(monkeypatch):
    """``--keep_graphs auto`` and ``--segment_batching auto`` choose by timing their trials, so two runs
    on a loaded machine could choose differently and differ in the last bits. In this process every
    timed interval lasts one tick: the trials tie and keep the first option (keeping graphs, segments
    one after another), as an idle CPU does. Tests of the choice itself pass their timings explicitly."""
    from distill_utils.distillation import matching, segments
    ticks = itertools.count()
    clock = lambda device: float(next(ticks))  # noqa: E731
    monkeypatch.setattr(matching, "synchronized_clock", clock)
    monkeypatch.setattr(segments, "synchronized_clock", clock)


@pytest.fixture(scope="session")
def expert_dirs(shapes_root, tmp_path_factory):
    """Two 3-epoch experts on shapes: (folder, normal/, convexified_0_3/, convexified_0_4_compact/)."""
    tmp = tmp_path_factory.mktemp("experts")
    buffer.main(shapes_args(shapes_root, tmp, "--image_trainable", "--num_experts", "2", "--train_epochs", "3",
                             "--eval_freq", "3", "--batch_size_train", "32", "--buffer_path", str(tmp / "buffer")))
    normal = trajectories.expert_folder(tmp / "buffer", "shapes", "convnet_tiny", "tiny_bert", "InfoNCE")
    shortcut = convexify.main(["--normal_dir", str(normal), "--start", "0", "--end", "3"])
    compact = convexify.main(["--normal_dir", str(normal), "--start", "0", "--end", "4", "--compact"])
    return tmp, normal, shortcut, compact


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(name, options)``: a tmpfs under tmp_path (e.g. ``"size=1m"``, ``"ro,size=1m"``), or a skip
    where this machine does not allow mounting one (it needs root); unmounted at teardown."""
    import subprocess
    mounted = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root); the injected-OSError tests cover the same paths")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
