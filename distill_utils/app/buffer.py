"""``buffer.py``: train expert trajectories (dual encoders on real data, snapshotted every epoch) and
write them as the authors' twin files, under an index claimed before training (reruns append new
experts, torchrun ranks never collide), with a meta.json that records what model they belong to.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from networks import DualEncoder

from ..experts import trajectories
from ..students.coresets import ForgettingTracker, pairs_digest
from ..runtime.errors import writable_folder
from ..experts.training import ExpertOptim, make_optimizer, side_snapshot, train_one_epoch
from ..distillation.losses import LOSSES, MultilabelContrastiveLoss
from ..students.retrieval import RetrievalBenchmark
from ..runtime.runs import EXPERT_NEUTRAL_FLAGS, describe_differences, differing_flags
from ..runtime.runlog import MetricsLogger, format_recall, git_sha, resolve_device, seeded, setup_logging
from ..runtime.speed import SpeedOptions, enable_fast_math

from .cli import add_bool_flag, non_negative, positive, script_parser
from .context import load_data, model_config

log = logging.getLogger("ptmst.buffer")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "buffer.py",
        "Train expert trajectories (snapshots of both parameter sides every epoch).",
        "Example: python buffer.py --dataset flickr --image_encoder nfnet --text_encoder bert "
        "--num_experts 20 --train_epochs 10 --buffer_path ./buffer")
    group = parser.add_argument_group("experts")
    group.add_argument("--num_experts", type=positive(), default=100, help="experts to train (over all ranks)")
    group.add_argument("--train_epochs", type=positive(), default=50, help="epochs per expert (snapshots = epochs + 1)")
    group.add_argument("--lr_teacher_img", type=positive(float), default=0.1, help="SGD lr of the image side")
    group.add_argument("--lr_teacher_txt", type=positive(float), default=0.1, help="SGD lr of the text side")
    group.add_argument("--batch_size_train", "--batch_train", type=positive(), default=128, help="training batch size")
    group.add_argument("--batch_size_test", type=positive(), default=128, help="evaluation batch size")
    group.add_argument("--mom", type=non_negative(float), default=0.0, help="SGD momentum")
    group.add_argument("--l2", type=non_negative(float), default=0.0, help="SGD weight decay")
    add_bool_flag(group, "--decay", help="x0.1 learning rate at epoch train_epochs//2 + 1")
    group.add_argument("--loss_type", default="InfoNCE", choices=sorted(LOSSES), help="expert training loss")
    group.add_argument("--eval_freq", type=positive(), default=5, help="report test recall every N epochs")
    add_bool_flag(group, "--no_aug", help="no data augmentation (adds _NoAug to the folder name)")
    add_bool_flag(group, "--skip_save", help="train and evaluate but write no trajectory")
    group.add_argument("--buffer_path", default="./buffer", help="root folder of the trajectories")
    add_bool_flag(group, "--cache_images", help="keep decoded training images in memory (no JPEG decode per epoch)")
    add_bool_flag(group, "--bf16", help="bfloat16 autocast for expert training on CUDA (faster; not bit-exact)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_freq > args.train_epochs:
        log.warning("--eval_freq %d exceeds --train_epochs %d: only the final epoch is evaluated",
                    args.eval_freq, args.train_epochs)
    return args


def my_experts(num_experts: int) -> List[int]:
    """Experts this process trains: all of them, or rank r's share under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return list(range(rank, num_experts, world))


def expert_optim(args: argparse.Namespace) -> ExpertOptim:
    return ExpertOptim(args.lr_teacher_img, args.lr_teacher_txt, args.mom, args.l2, args.train_epochs, args.decay)


def train_expert(expert: int, args, data, config, benchmark, device, metrics) -> Tuple[list, list, ForgettingTracker]:
    """Train expert ``expert`` from seed ``args.seed + expert``; return its two trajectories and the
    forgetting events of its training pairs. Everything
    it draws (weights, batch order, dropout masks) comes from that seed, so an expert is the same whether
    its process trained others before it or not (a rerun that appends, a torchrun rank)."""
    with seeded(args.seed + expert, device):
        return _train_expert(expert, args, data, config, benchmark, device, metrics)


def _train_expert(expert: int, args, data, config, benchmark, device, metrics) -> Tuple[list, list, ForgettingTracker]:
    model = config.build(seed=args.seed + expert).to(device)
    speed = SpeedOptions.for_device(device, args.bf16).for_model(model)
    speed.prepare_model(model)
    optimizer, scheduler = make_optimizer(model, expert_optim(args), speed)
    criterion = MultilabelContrastiveLoss(args.loss_type)
    generator = torch.Generator().manual_seed(args.seed + expert)
    loader = DataLoader(data.train, batch_size=args.batch_size_train, shuffle=True, drop_last=False,
                        num_workers=args.num_workers, generator=generator, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    image_snapshots, text_snapshots = [], []
    forgetting = ForgettingTracker(len(data.train))
    for snapshot, store in zip(side_snapshot(model), (image_snapshots, text_snapshots)):
        store.append(snapshot)
    for epoch in range(args.train_epochs):
        started = time.perf_counter()
        loss = train_one_epoch(model, loader, data.train_text, optimizer, criterion, device, speed,
                               desc=f"expert {expert} epoch {epoch + 1}/{args.train_epochs}", observe=forgetting.update)
        seconds = time.perf_counter() - started
        record = {"expert": expert, "epoch": epoch + 1, "train_loss": loss, "epoch_seconds": seconds}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.train_epochs:
            record.update(benchmark.evaluate(model))
            log.info("expert %d epoch %d loss %.4f (%.1fs) | %s", expert, epoch + 1, loss, seconds, format_recall(record))
        else:
            log.info("expert %d epoch %d loss %.4f (%.1fs)", expert, epoch + 1, loss, seconds)
        metrics.log(record)
        for snapshot, store in zip(side_snapshot(model), (image_snapshots, text_snapshots)):
            store.append(snapshot)
        scheduler.step()
    if not all(torch.isfinite(t).all() for t in image_snapshots[-1] + text_snapshots[-1]):
        raise FloatingPointError(f"expert {expert} diverged (NaN/Inf parameters); lower --lr_teacher_img/--lr_teacher_txt")
    return image_snapshots, text_snapshots, forgetting


def expert_meta(args: argparse.Namespace, model: DualEncoder) -> dict:
    return {"dataset": args.dataset, "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
            "image_trainable": args.image_trainable, "image_pretrained": args.image_pretrained,
            "train_epochs": args.train_epochs, "loss_type": args.loss_type, "git_sha": git_sha(),
            "image_params": trajectories.parameter_shapes(model.side_named_parameters("image")),
            "text_params": trajectories.parameter_shapes(model.side_named_parameters("text")),
            "args": vars(args)}


def check_folder_kind(folder: Path, args: argparse.Namespace, meta: dict) -> None:
    """New experts join a folder only when they are of the kind already there: the same parameter
    shapes on both sides (encoders, trainable or frozen image encoder, widths) and the same number of
    snapshots. ``meta.json`` is written for a new folder only; one that holds experts without it (the
    authors' downloads) gets none, since it would claim these flags for experts trained with unknown ones."""
    indices = trajectories.twin_indices(folder)
    if not indices:
        trajectories.write_meta(folder, meta)
        return
    recorded = trajectories.read_meta(folder)
    if recorded is None:
        expected = trajectories.ExpectedShapes(image=meta["image_params"], text=meta["text_params"])
        expert = trajectories.TrajectoryBuffer(folder, expected).experts_in_file(indices[0])[0]  # checks shapes
        snapshots, source = expert.num_snapshots, expert.where
        log.info("%s holds experts without a meta.json (as the authors' downloads come): none is written, and the "
                 "new experts are checked against %s", folder, expert.name)
    else:
        trajectories.write_meta(folder, {**recorded, "image_params": meta["image_params"],
                                         "text_params": meta["text_params"]}, check_only=True)
        snapshots, source = int(recorded.get("train_epochs", args.train_epochs)) + 1, folder / trajectories.META_NAME
        differences = differing_flags(recorded.get("args", {}), vars(args), EXPERT_NEUTRAL_FLAGS)
        if differences:
            log.warning("%s: its experts were trained with other flags (%s); the new ones are added beside them, and "
                        "meta.json keeps the first run's record", folder, describe_differences(differences))
    if snapshots != args.train_epochs + 1:
        raise trajectories.TrajectoryError(
            f"{folder} holds experts of {snapshots} snapshots ({source}) but --train_epochs {args.train_epochs} makes "
            f"{args.train_epochs + 1}: experts of two lengths in one folder would break every phase's start range. "
            f"Pass --train_epochs {snapshots - 1}, or another --buffer_path for the new kind.")


def prepare_folder(args: argparse.Namespace) -> Path:
    """The output folder, proven writable before any long work (claiming an index later cleans what dead
    writers left there)."""
    folder = trajectories.expert_folder(args.buffer_path, args.dataset, args.image_encoder, args.text_encoder,
                                        args.loss_type, args.no_aug)
    return writable_folder(folder, "--buffer_path")


def train_and_write(args, data, config, benchmark, device, metrics, folder) -> int:
    """One expert: claim its index first, so its seed (``--seed`` + index) is never used twice in the
    folder and reruns add new experts instead of repeating old ones; write its pair; release."""
    index = trajectories.claim_next_index(folder)
    try:
        image_traj, text_traj, forgetting = train_expert(index, args, data, config, benchmark, device, metrics)
        digest = pairs_digest(data.train.image_paths(), data.train.captions)
        paths = trajectories.write_expert(folder, index, image_traj, text_traj, forgetting.as_record(digest))
    finally:
        trajectories.release_claim(folder, index)
    log.info("saved expert %d as %s + %s (%.1f MB)", index, paths[0].name, paths[1].name,
             sum(p.stat().st_size for p in paths) / 1e6)
    return index


def main(argv: Optional[Sequence[str]] = None) -> List[int]:
    """Train this process's experts; return the indices written."""
    setup_logging()
    args = parse_args(argv)
    device = resolve_device(args.device)
    folder = None if args.skip_save else prepare_folder(args)
    enable_fast_math(device)
    torch.manual_seed(args.seed)
    data = load_data(args, device, augment=not args.no_aug, cache_decoded=args.cache_images)
    config = model_config(args, data.text_dim)
    folder_text = folder if folder is not None else "(not saved: --skip_save)"
    log.info("experts -> %s (%d train captions, text features %d-d, device %s)", folder_text, len(data.train),
             data.text_dim, device)
    if folder is not None:
        check_folder_kind(folder, args, expert_meta(args, config.build(seed=args.seed)))
    benchmark = RetrievalBenchmark(data.test, data.test_text, device, args.batch_size_test, args.num_workers)
    log_folder = folder if folder is not None else writable_folder(Path(args.buffer_path), "--buffer_path")
    metrics = MetricsLogger(log_folder / "metrics.jsonl", not args.disabled_wandb, args.wandb_project,
                            f"buffer_{args.dataset}_{args.image_encoder}_{args.text_encoder}", vars(args))
    written = []
    try:
        for expert in my_experts(args.num_experts):
            if folder is None:
                train_expert(expert, args, data, config, benchmark, device, metrics)
            else:
                written.append(train_and_write(args, data, config, benchmark, device, metrics, folder))
    finally:
        metrics.close()
    return written
