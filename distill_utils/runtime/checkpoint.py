"""The one module that reads and writes distilled-set checkpoints and the distiller's resume state.

``distilled_{phase}_{it}.pt`` keeps the reference's keys (image, text, similarity_params,
similarity_mat, syn_lr_img, syn_lr_txt) plus ``config`` and a format version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from ..distillation.synthetic import FrozenSubset, SyntheticSet
from .atomic import atomic_save
from .errors import UsageError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt")


class CheckpointError(UsageError):
    """A distilled-set checkpoint is missing, corrupt or does not fit the chosen model."""


def save_distilled(path: Path, synthetic: SyntheticSet, config: dict, phase: int, iteration: int) -> None:
    with torch.no_grad():
        payload = {
            "image": synthetic.images.detach().cpu(),
            "text": synthetic.texts.detach().cpu(),
            "similarity_params": [p.detach().cpu() for p in synthetic.similarity.parameters()],
            "similarity_mat": synthetic.similarity.matrix_full().detach().cpu(),
            "syn_lr_img": synthetic.syn_lr_img.detach().cpu(),
            "syn_lr_txt": synthetic.syn_lr_txt.detach().cpu(),
            "sim_type": synthetic.similarity.kind,
            "phase": phase, "iteration": iteration, "format_version": FORMAT_VERSION, "config": config,
        }
    atomic_save(payload, Path(path))


def load_distilled(path: Path) -> Tuple[FrozenSubset, dict]:
    """A checkpoint as a :class:`FrozenSubset` plus its saved config (``{}`` for foreign files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check --ckpt_path (distill_ptm-st.py writes "
                              f"logged_files/DATASET/RUN/distilled_PHASE_IT.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); it is corrupt "
                              f"or not a distilled set") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it is not a distilled set written by "
                              f"distill_ptm-st.py")
    images, texts, matrix = payload["image"], payload["text"], payload["similarity_mat"]
    n = images.shape[0]
    if texts.shape[0] != n or tuple(matrix.shape) != (n, n):
        raise CheckpointError(f"checkpoint {path} is inconsistent: {n} images, {texts.shape[0]} texts, similarity "
                              f"{tuple(matrix.shape)}")
    for key in ("image", "text", "similarity_mat"):
        if not torch.isfinite(payload[key]).all():
            raise CheckpointError(f"checkpoint {path} holds NaN/Inf in {key!r}: use an earlier checkpoint of the run")
    subset = FrozenSubset(images.float(), texts.float(), matrix.float(), float(payload["syn_lr_img"]),
                          float(payload["syn_lr_txt"]))
    return subset, payload.get("config", {})


def recorded_phase(path: Path):
    """The phase a checkpoint of ours records, or None (a foreign or unreadable file: checked later)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    phase = payload.get("phase") if isinstance(payload, dict) else None
    return phase if isinstance(phase, int) else None


def check_fits(subset: FrozenSubset, path: Path, image_size: int, text_dim: int) -> None:
    """Refuse a checkpoint whose shapes do not fit the chosen image size and text encoder."""
    if tuple(subset.images.shape[1:]) != (3, image_size, image_size):
        raise CheckpointError(f"checkpoint {path} holds images of shape {tuple(subset.images.shape[1:])} but "
                              f"--image_size is {image_size}: pass the --image_size the set was distilled at")
    if subset.texts.shape[1] != text_dim:
        raise CheckpointError(f"checkpoint {path} holds {subset.texts.shape[1]}-d text features but --text_encoder "
                              f"gives {text_dim}-d ones: pass the --text_encoder the set was distilled with")


def save_state(path: Path, state: dict) -> None:
    atomic_save(state, Path(path))


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"resume state {path} cannot be read ({type(error).__name__}: {error}); remove it to "
                              f"restart the run, or pick another --name") from None
