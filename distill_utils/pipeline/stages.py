"""The pipeline's stages, each a script run by flags: data, the pretrained encoder, experts, shortcuts,
one distillation, its evaluation.

Reuse is by fingerprint, never by name or count alone: the data live in ``data/{digest}``, the
pretrained encoder in ``checkpoints/{digest}`` and the experts in ``buffer/{digest}``, each digest
taken over the settings and flags that decide that stage's result (``flags.json`` beside it lists
them), so a rerun with another setting makes new ones and never picks up stale work.

Why a pretraining stage: in the paper every expert and every evaluation student starts from the same
pretrained image encoder, and the synthetic set learns to steer that starting point. Nothing can be
downloaded here, so a short CLIP-style run on the shapes training data provides the shared start,
saved as ``{workdir}/checkpoints/{digest}/{encoder}.pth`` and loaded with ``--image_pretrained --checkpoint_dir``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from ..data import shapes
from ..experts import trajectories
from ..runtime import claims, runs
from ..runtime.atomic import atomic_save
from .launch import LOCAL
from .scripts import Scripts
from .settings import Settings

log = logging.getLogger("ptmst.pipeline")


@dataclass(frozen=True)
class Workdir:
    """A workdir (data, encoder, experts, runs and reports live under ``path``), the scripts that fill
    it, and where its jobs run (``pipeline.launch``: this process unless told). ``work / "name"`` is
    ``path / "name"``."""
    path: Path
    scripts: Scripts
    launcher: Any = LOCAL

    def local(self) -> "Workdir":
        """This workdir for the inside of a job: what a job runs, it runs itself."""
        return replace(self, launcher=LOCAL)

    def __truediv__(self, name: Union[str, os.PathLike]) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


class Stages:
    """Runs and times the stages; each stage's seconds go into the report."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def run(self, name: str, function, *args):
        log.info("=== %s", name)
        started = time.perf_counter()
        result = function(*args)
        self.seconds[name] = time.perf_counter() - started
        log.info("=== %s done in %.1fs", name, self.seconds[name])
        return result


def shapes_config(s: Settings) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(s.num_train, s.num_val, s.num_test, s.image_size)  # fixed data: --seed varies the rest


def data_folder(s: Settings, work: Workdir, create: bool = False) -> Path:
    """Where the built-in data of these settings live (another size of data: another folder)."""
    return runs.keyed_folder(work / "data", asdict(shapes_config(s)), (), create)


def generate_data(s: Settings, work: Workdir) -> Path:
    return shapes.generate(data_folder(s, work, create=True), shapes_config(s))


def common_flags(s: Settings, work: Workdir, pretrained: bool = True) -> List[str]:
    if not s.builtin:  # a dataset on disk, an encoder with weights of its own (efficientnet_lite0's are packaged)
        data, weights = ["--dataset", s.dataset], ["--image_pretrained", str(pretrained).lower()]
    else:
        folder = data_folder(s, work)
        data = ["--dataset", "shapes", "--image_root", str(folder), "--ann_root", str(folder)]
        weights = ["--image_pretrained", "--checkpoint_dir", str(encoder_folder(s, work))] if pretrained else [
            "--image_pretrained", "false"]
    model = ["--image_trainable"] if s.image_trainable else ["--image_trainable", "false",
                                                             "--out_embedding", str(s.out_embedding)]
    rates = [] if s.lr_teacher == Settings.lr_teacher else [
        "--lr_teacher_img", str(s.lr_teacher), "--lr_teacher_txt", str(s.lr_teacher)]
    return [*data, "--image_size", str(s.image_size), "--npz_dir", str(work / "npz"), "--num_workers", "0",
            "--image_encoder", s.image_encoder, "--text_encoder", s.text_encoder, *weights,
            *model, *rates, "--disabled_wandb", "--seed", str(s.seed)]


def expert_flags(s: Settings, work: Workdir, buffer: Path, count: int, epochs: int, seed: int, pretrained: bool):
    flags = common_flags(s, work, pretrained) + [
        "--num_experts", str(count), "--train_epochs", str(epochs), "--eval_freq", str(epochs), "--no_aug",
        "--batch_size_train", str(s.expert_batch), "--buffer_path", str(buffer)]
    flags[flags.index("--seed") + 1] = str(seed)
    return flags


def pretrain_flags(s: Settings, work: Workdir, root: Path) -> List[str]:
    return expert_flags(s, work, root, 1, s.pretrain_epochs, s.seed + 1000, pretrained=False)


def encoder_folder(s: Settings, work: Workdir, create: bool = False) -> Path:
    """``checkpoints/{digest}``: the digest of the pretraining run's flags (the pretraining run itself
    goes into ``pretrain/`` inside it)."""
    flags = vars(work.scripts.buffer.parse_args(pretrain_flags(s, work, work / "unused")))
    return runs.keyed_folder(work / "checkpoints", flags, runs.EXPERT_NEUTRAL_FLAGS, create)


def pretrain_encoder(s: Settings, work: Workdir) -> Path:
    """One CLIP-style run from random weights; its final image encoder becomes the shared start."""
    keyed = encoder_folder(s, work, create=True)
    with claims.folder_lock(keyed, owner=claims.this_process(), name=TOP_UP_LOCK):  # one pretraining per workdir
        return pretrained_encoder_in(s, work, keyed)


TOP_UP_LOCK = ".top_up.lock"


def pretrained_encoder_in(s: Settings, work: Workdir, keyed: Path) -> Path:
    target = keyed / f"{s.image_encoder}.pth"
    if target.is_file():
        return target
    root = keyed / "pretrain"
    folder = trajectories.expert_folder(root, "shapes", s.image_encoder, s.text_encoder, "InfoNCE", True)
    if not (folder.is_dir() and trajectories.twin_indices(folder)):
        work.scripts.buffer.main(pretrain_flags(s, work, root))
    expert = trajectories.TrajectoryBuffer(folder).experts()[0]
    prefix = "image_encoder."
    names = [name[len(prefix):] for name, _ in trajectories.read_meta(folder)["image_params"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(zip(names, expert.snapshot("image", expert.num_snapshots - 1))), target)
    return target


def top_up_experts(s: Settings, work: Workdir, flags: Sequence[str] = (), base: str = "buffer") -> Path:
    """The settings' experts (``flags``, buffer.py's, win over the settings') in
    ``work/base/{digest}/...``, the digest taken over every flag that decides an expert; trained until
    that folder holds ``s.num_experts``. Return the folder of the experts."""
    def argv(root: Path, count: int) -> List[str]:
        return expert_flags(s, work, root, count, s.train_epochs, s.seed, pretrained=True) + list(flags)
    root, folder = experts_place(s, work, flags, base, create=True)
    # another call on this workdir (a second ablation, study or quick start) tops up the same folder: one at
    # a time, so the second finds the experts the first trained and never trains more than planned
    with claims.folder_lock(root, owner=claims.this_process(), name=TOP_UP_LOCK):
        have = len(trajectories.twin_indices(folder)) if folder.is_dir() else 0
        if have < s.num_experts:
            log.info("experts: %d of %d in %s, training %d", have, s.num_experts, folder, s.num_experts - have)
            work.scripts.buffer.main(argv(root, s.num_experts - have))
    return folder


def experts_place(s: Settings, work: Workdir, flags: Sequence[str] = (), base: str = "buffer",
                  create: bool = False):
    """``(work/base/{digest}, its expert folder)`` of the settings' experts with buffer.py's ``flags``."""
    argv = expert_flags(s, work, work / "unused", s.num_experts, s.train_epochs, s.seed, pretrained=True) + list(flags)
    parsed = work.scripts.buffer.parse_args(argv)
    root = runs.keyed_folder(work / base, vars(parsed), runs.EXPERT_NEUTRAL_FLAGS, create=create)
    return root, trajectories.expert_folder(root, parsed.dataset, parsed.image_encoder, parsed.text_encoder,
                                            parsed.loss_type, parsed.no_aug)


def experts_trained(s: Settings, work: Workdir, flags: Sequence[str] = (), base: str = "buffer") -> bool:
    """Whether the experts :func:`top_up_experts` would train are all there already."""
    _, folder = experts_place(s, work, flags, base)
    return folder.is_dir() and len(trajectories.twin_indices(folder)) >= s.num_experts


def encoder_pretrained(s: Settings, work: Workdir) -> bool:
    return (encoder_folder(s, work) / f"{s.image_encoder}.pth").is_file()


def train_experts(s: Settings, work: Workdir) -> Path:
    return top_up_experts(s, work)


def make_shortcuts(s: Settings, work: Workdir, normal: Path) -> List[Path]:
    return [work.scripts.convexify.main(["--normal_dir", str(normal), "--start", str(start), "--end", str(end)])
            for start, end, _, _ in s.phases]


def run_distillation(s: Settings, work: Workdir, shortcuts: Sequence[Path], name: str) -> Path:
    return work.scripts.distill.main(common_flags(s, work) + [
        "--buffer_path", *map(str, shortcuts), "--subset_num", str(len(shortcuts)),
        "--min_start_epoch", *[str(p[2]) for p in s.phases], "--max_start_epoch", *[str(p[3]) for p in s.phases],
        "--num_queries", *map(str, s.num_queries), "--Iteration", *map(str, s.iterations),
        "--eval_it", str(s.eval_it), "--syn_steps", str(s.syn_steps), "--mini_batch_size", str(s.mini_batch_size),
        "--keep_graphs", str(s.syn_steps),  # tiny model: all graphs fit, and kept graphs are exact and faster
        "--lr_img", str(s.lr_img), "--lr_txt", str(s.lr_txt), "--lr_sim", str(s.lr_sim), "--lr_lr", str(s.lr_lr),
        "--ema_decay", str(s.ema_decay), "--sim_type", s.sim_type, "--epoch_eval_train", str(s.epoch_eval_train),
        "--loss_type", s.loss_type, *(["--clamp_lr", str(s.clamp_lr)] if s.clamp_lr is not None else []),
        "--num_eval", str(s.num_eval), "--logged_dir", str(work / "logged_files"), "--name", name])


def full_data_flags(s: Settings) -> List[str]:
    return ["--full_epochs", *map(str, s.full_epochs), "--full_lr_scale", *map(str, s.full_lr_scales),
            "--full_batch", *map(str, s.full_batches)]


def run_evaluation(s: Settings, work: Workdir, run: Path, report: Path) -> Dict[str, dict]:
    return work.scripts.evaluate.main(common_flags(s, work) + [
        "--ckpt_path", *map(str, runs.RunFolder(run).final_checkpoints()),
        "--baseline", "random", "random_split", "full",
        *full_data_flags(s), "--epoch_eval_train", str(s.epoch_eval_train), "--loss_type", s.loss_type,
        "--num_eval", str(s.num_eval), "--out_dir", str(report), "--export", str(report / EXPORT)])


EXPORT = "synthetic_set"  # the distilled set in the report, loadable without this code (eval.py --export)
