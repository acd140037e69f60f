"""Small builders shared by tests (tiny argument lists, fake trajectories)."""
from pathlib import Path
from typing import List

import torch


def shapes_args(root: Path, tmp: Path, *extra: str, image_encoder: str = "convnet_tiny",
                text_encoder: str = "tiny_bert") -> List[str]:
    """Common flags for a tiny CPU run on the generated shapes dataset."""
    return ["--dataset", "shapes", "--image_root", str(root), "--ann_root", str(root), "--image_size", "16",
            "--npz_dir", str(tmp / "npz"), "--num_workers", "0", "--image_encoder", image_encoder,
            "--text_encoder", text_encoder, "--image_pretrained", "false", "--disabled_wandb", *extra]


def fake_trajectory(shapes, snapshots: int, seed: int) -> List[List[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=generator) for shape in shapes] for _ in range(snapshots)]


def path_without_apt(folder: Path) -> str:
    """A PATH of links to the basic tools the data scripts use, without apt-get or dpkg-deb."""
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    for tool in ("bash", "dirname", "ls", "head", "mkdir", "rm", "touch", "sed", "cat"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return str(folder)


def workdir(path):
    """A pipeline workdir at ``path`` run by the real scripts (what the quick start and the ablation build)."""
    from distill_utils.app.cli import scripts
    from distill_utils.pipeline.stages import Workdir
    return Workdir(Path(path), scripts())
