"""Phased trajectory matching (``distill_ptm-st.py``).

Each phase k learns its own synthetic subset from scratch against its own (shortcut) trajectories;
when it finishes, its EMA state is frozen and every later evaluation trains students on the
finished subsets first. Table of contents of :func:`main`: parse and validate, open the expert
folders, load data, build the student, then per phase: initialise, loop (match, step, EMA,
evaluate, checkpoint), freeze.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..runtime import checkpoint
from ..experts import trajectories
from ..runtime.claims import FolderBusy, folder_lock, this_process
from ..data import DataError
from ..runtime.distributed import (SINGLE, Ranks, ranks_from_environment, share_from_rank0, share_of, start_group,
                                   stop_group, sum_across, wait_for_all)
from ..runtime.errors import UsageError, writable_folder
from ..students.evaluation import EvalSettings, evaluate_subsets
from ..distillation.losses import MultilabelContrastiveLoss
from ..distillation.matching import AUTO, NORMALIZATIONS, KeepChoice, MiniBatchSampler, TrajectoryMatcher
from ..distillation.prototypes import prototype_pairs
from ..runtime.progress import progress
from ..students.retrieval import RetrievalBenchmark, split_benchmarks
from ..runtime.runs import RunFolder, comparable, describe_differences, differing_flags
from ..runtime.runlog import MetricsLogger, format_recall, git_sha, resolve_device, setup_logging
from ..distillation.batched import supports_batching
from ..distillation.segments import BATCHED, SEQUENTIAL, BatchingChoice, Segment, draw_seeds, match_segments
from ..experts.snapshot_cache import GIB, SnapshotCache
from ..runtime.speed import enable_fast_math
from ..distillation.starts import ASYNC_MODES, StartRanges, StartSampler, dynamic_ranges, mean_change_per_epoch
from ..distillation.synthetic import (ExponentialMovingAverage, FrozenSubset, SyntheticRates, SyntheticSet,
                                      make_similarity)
from ..outputs.visualize import nearest_captions, save_grid, write_captions

from .cli import (add_bool_flag, check_eval_args, check_per_phase_lists, count_or, eval_settings, finite_float,
                  non_negative, positive, script_parser, user_message)
from .context import DataContext, load_data, model_config
from .methods import METHODS, apply_preset, check_method_fits, chosen_method, given_flags

log = logging.getLogger("ptmst.distill")
PER_PHASE = ("buffer_path", "min_start_epoch", "max_start_epoch", "num_queries", "Iteration", "sim_rank")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "distill_ptm-st.py",
        "Phased trajectory matching with shortcut trajectories: distil a dataset into a few "
        "hundred image/text-feature pairs, a similarity matrix and learned step sizes.",
        "Example (Flickr, 500 pairs): python distill_ptm-st.py --dataset flickr --buffer_path "
        "./buffer/flickr/nfnet_bert/InfoNCE/convexified_0_6 ./buffer/flickr/nfnet_bert/InfoNCE/convexified_0_8 "
        "--min_start_epoch 0 1 --max_start_epoch 2 3 --num_queries 200 299 --Iteration 2000 2000 "
        "--subset_num 2 --sim_type full --lr_sim 10 --mini_batch_size 40 --image_trainable. "
        "Per-phase flags take one value per phase (--subset_num of them). --method mttvl|lors|amd|repblend "
        "runs the other methods of the field through the same code (docs/methods.md).", student_evaluation=True)
    methods = parser.add_argument_group("method (a preset sets the flags below; flags given explicitly win)")
    methods.add_argument("--method", default="ptmst", choices=sorted(METHODS),
                         help="ptmst: phases on shortcut trajectories; mttvl: one phase, identity similarity; lors: "
                              "one phase, learned similarity; amd: lors + asynchronous dynamic starts + prototype "
                              "initialisation; repblend: lors on a frozen image encoder, both heads matched, blending")
    add_bool_flag(methods, "--learn_sim", default=True,
                  help="learn the similarity matrix (false: it stays the identity, as in MTT-VL)")
    methods.add_argument("--async_starts", default="off", choices=ASYNC_MODES,
                         help="off: both sides start at one snapshot; uniform: each side draws its own start from "
                              "the phase's range; dynamic: each from its own range, derived from its experts' "
                              "per-epoch change (AMD)")
    methods.add_argument("--phase_init", default="disjoint", choices=["disjoint", "independent"],
                         help="disjoint: a later phase starts from training pairs no earlier phase started from "
                              "(the same draw when there is no overlap); independent: each phase draws on its own "
                              "(phases may then share pairs: rarely from 29,000 training pairs, often from a few "
                              "hundred)")
    methods.add_argument("--pair_init", default="random", choices=["random", "prototype"],
                         help="initial pairs: random training pairs, or the pairs nearest the k-means centres of "
                              "joint image/text features (AMD)")
    methods.add_argument("--blend", type=finite_float, default=0.0,
                         help="representation blending in the student steps: each representation mixed with a "
                              "random partner's at a weight uniform in [0, BLEND] (RepBlend; 0: off)")
    methods.add_argument("--match_norm", default="per_side", choices=NORMALIZATIONS,
                         help="per_side: each side's distance over its own start-to-target distance; joint: both "
                              "over their sum (RepBlend)")
    phases = parser.add_argument_group("phases (one value per phase)")
    phases.add_argument("--subset_num", type=positive(), default=2, help="number of phases")
    phases.add_argument("--buffer_path", nargs="+", required=True, help="trajectory folder of each phase")
    phases.add_argument("--min_start_epoch", type=non_negative(), nargs="+", required=True,
                        help="smallest start snapshot of each phase")
    phases.add_argument("--max_start_epoch", type=positive(), nargs="+", required=True,
                        help="start snapshots are drawn from [min, max) in each phase")
    phases.add_argument("--num_queries", type=positive(), nargs="+", default=[200, 300], help="pairs per phase")
    phases.add_argument("--Iteration", type=non_negative(), nargs="+", default=[2000, 3000],
                        help="distillation iterations per phase")
    phases.add_argument("--sim_rank", type=positive(), nargs="+", default=None,
                        help="low-rank similarity rank per phase (default 5 10 for two phases, else 10)")
    match = parser.add_argument_group("matching")
    match.add_argument("--syn_steps", type=positive(), default=8, help="student steps per iteration")
    match.add_argument("--keep_graphs", type=count_or(AUTO), default=AUTO,
                       help="keep the first pass's graphs of the first N student steps instead of recomputing them "
                            "(exact; one step's graph of memory each). Default auto: the first 2 iterations time "
                            "keeping against recomputing (the recomputing run thrown away) and the faster is kept "
                            "(logged; part of the resume state); keeping then holds as many graphs as the GPU's free "
                            "memory allows (every one on the CPU). Kept graphs hold up to --syn_steps step graphs "
                            "where the authors' code holds about one; 0: memory constant in --syn_steps, for a "
                            "shared GPU or a large model on the CPU (benchmarks/README.md has the figures)")
    match.add_argument("--segments_per_iter", type=positive(), default=1,
                       help="expert segments matched per iteration (each its own expert and start, the same "
                            "mini-batches); the synthetic set steps once with the mean of their gradients. Under "
                            "torchrun each process matches its share, so this must be a multiple of the number "
                            "of processes. 1: one segment, as the authors' code")
    match.add_argument("--segment_batching", choices=("auto", BATCHED, SEQUENTIAL), default="auto",
                       help="how a process matches its segments when it has several: vmap as one batched "
                            "computation (torch.func.vmap over their parameters; a frozen encoder's features "
                            "computed once for all), sequential one after another (keeping graphs as "
                            "--keep_graphs says). Both give the same gradients to float rounding. Default auto: "
                            "the first 2 such iterations time both and the faster is kept (logged; part of the "
                            "resume state). An image encoder that draws its own dropout runs sequential")
    match.add_argument("--student_autocast", choices=("off", "bf16"), default="off",
                       help="bf16: the student steps' forward, backward and double backward under bfloat16 "
                            "autocast (matmuls and convolutions in bf16; the loss, the trajectory sums and the "
                            "synthetic set stay float32). Not exact: benchmarks.segments --autocast bf16 prints "
                            "its gradient error against float32. Default off")
    match.add_argument("--dist_timeout", type=positive(float), default=1800,
                       help="seconds a process waits for the others under torchrun before it stops the run "
                            "(they wait while rank 0 evaluates, so keep it above one evaluation's time)")
    match.add_argument("--expert_cache_gb", type=non_negative(float), default=None,
                       help="GiB of expert snapshots kept on the device instead of copied from the host every "
                            "iteration (default: on a GPU half the memory the first iteration left free; 0 on the "
                            "CPU, where the memory-mapped files are already in the page cache)")
    match.add_argument("--expert_epochs", type=positive(), default=1, help="target = start snapshot + this")
    match.add_argument("--mini_batch_size", type=positive(), default=20, help="synthetic pairs per student step")
    match.add_argument("--lr_img", type=non_negative(float), default=1000, help="lr of the synthetic images")
    match.add_argument("--lr_txt", type=non_negative(float), default=1000, help="lr of the synthetic text features")
    match.add_argument("--lr_lr", type=non_negative(float), default=0.01, help="lr of the learned step sizes")
    match.add_argument("--lr_sim", type=non_negative(float), default=100, help="lr of the similarity parameters")
    match.add_argument("--lr_teacher_img", type=positive(float), default=0.1, help="initial image-side step size")
    match.add_argument("--lr_teacher_txt", type=positive(float), default=0.1, help="initial text-side step size")
    match.add_argument("--momentum_syn", type=non_negative(float), default=0.5, help="momentum of images and texts")
    match.add_argument("--momentum_lr", type=non_negative(float), default=0.5, help="momentum of the step sizes")
    match.add_argument("--momentum_sim", type=non_negative(float), default=0.5, help="momentum of the similarity")
    match.add_argument("--sim_type", default="lowrank", choices=["full", "lowrank"], help="similarity generator")
    match.add_argument("--alpha", type=finite_float, default=1.0, help="low-rank scale: S = diag(a) + alpha/r L R^T")
    match.add_argument("--ema_decay", type=finite_float, default=0.99, help="EMA of everything learned (what is saved)")
    match.add_argument("--clamp_lr", type=finite_float, default=None, help="lower bound for the learned step sizes")
    match.add_argument("--pix_init", default="real", choices=["real", "noise"], help="initial synthetic images")
    match.add_argument("--txt_init", default="real", choices=["real", "noise"], help="initial synthetic texts")
    out = parser.add_argument_group("output")
    out.add_argument("--name", default=None, help="run name (default: DATASET_PAIRS_TIMESTAMP)")
    out.add_argument("--logged_dir", default="./logged_files", help="runs go to LOGGED_DIR/DATASET/NAME/")
    out.add_argument("--eval_it", type=positive(), default=50, help="evaluate and checkpoint every N iterations")
    add_bool_flag(out, "--resume", help="continue the run in LOGGED_DIR/DATASET/NAME from its last checkpoint")
    add_bool_flag(out, "--eval_init", default=True, help="also evaluate the initial set (iteration 0) of each phase")
    return parser


@dataclass(frozen=True)
class PhaseSpec:
    index: int
    buffer_path: str
    min_start: int
    max_start: int
    num_queries: int
    iterations: int
    sim_rank: int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    apply_preset(parser, chosen_method(argv))
    args = parser.parse_args(argv)
    check_eval_args(parser, args)
    if not 0.0 <= args.blend <= 1.0:
        parser.error(f"--blend must be in [0, 1] (the largest weight of a partner's representation), got {args.blend}")
    if args.sim_rank is None:
        args.sim_rank = [5, 10] if args.subset_num == 2 else [10] * args.subset_num
    check_per_phase_lists(parser, args, PER_PHASE, args.subset_num)
    for k, (low, high) in enumerate(zip(args.min_start_epoch, args.max_start_epoch)):
        if low >= high:
            parser.error(f"phase {k}: --min_start_epoch {low} must be below --max_start_epoch {high} "
                         f"(start snapshots are drawn from [min, max))")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    for k, queries in enumerate(args.num_queries):
        if args.mini_batch_size > queries:
            parser.error(f"--mini_batch_size {args.mini_batch_size} exceeds --num_queries {queries} of phase {k}: "
                         f"a student step draws its mini-batch from the phase's pairs; pass --mini_batch_size "
                         f"{min(args.num_queries)} or less")
    world = ranks_from_environment().world
    if args.segments_per_iter % world:
        parser.error(f"--segments_per_iter {args.segments_per_iter} does not split over the {world} processes "
                     f"torchrun started (each matches an equal share): pass a multiple of {world}, e.g. "
                     f"--segments_per_iter {world * max(1, args.segments_per_iter // world)}, or start "
                     f"{args.segments_per_iter} process(es)")
    if args.resume and not args.name:
        parser.error("--resume needs --name (the run folder to continue)")
    if args.name is not None and not plain_name(args.name):
        parser.error(f"--name {args.name!r} must be a plain folder name (letters, digits, '.', '_', '-'; not "
                     f"'.' or '..'): runs go to --logged_dir/DATASET/NAME and a name cannot point elsewhere")
    if args.name is None:
        args.name = f"{args.dataset}_{'_'.join(map(str, args.num_queries))}_{datetime.datetime.now():%Y%m%d_%H%M%S}"
    return args


def plain_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]+", name)) and name not in (".", "..") and not name.startswith("-")


def phase_specs(args: argparse.Namespace) -> List[PhaseSpec]:
    return [PhaseSpec(k, args.buffer_path[k], args.min_start_epoch[k], args.max_start_epoch[k], args.num_queries[k],
                      args.Iteration[k], args.sim_rank[k]) for k in range(args.subset_num)]


def open_buffers(specs: Sequence[PhaseSpec], expert_epochs: int) -> List[trajectories.TrajectoryBuffer]:
    """Open every phase's folder; every expert must have the snapshots the phase's start range and
    --expert_epochs reach, finite."""
    buffers = []
    for spec in specs:
        buffer = trajectories.TrajectoryBuffer(Path(spec.buffer_path))
        needed = spec.max_start - 1 + expert_epochs
        buffer.check_snapshots(needed, f"phase {spec.index} (--max_start_epoch {spec.max_start} with "
                                       f"--expert_epochs {expert_epochs})")
        buffers.append(buffer)
    return buffers


class ExpertCycle:
    """Experts in a seeded random order, cycled (reshuffled at each wrap). The saved order names the
    experts (file and trajectory), not positions in the folder's list, so a resume after an expert was
    moved out or added draws the experts the order names and skips the missing ones."""

    def __init__(self, experts: List[trajectories.Expert], generator: torch.Generator):
        self.experts = experts
        self.generator = generator
        self.order: List[str] = []
        self.position = 0
        self._by_name = {expert.name: expert for expert in experts}

    def next(self) -> trajectories.Expert:
        while self.position < len(self.order) and self.order[self.position] not in self._by_name:
            self.position += 1  # an expert moved out of the folder since the state was saved
        if self.position >= len(self.order):
            self.order = [self.experts[i].name for i in torch.randperm(len(self.experts), generator=self.generator)]
            self.position = 0
        expert = self._by_name[self.order[self.position]]
        self.position += 1
        return expert

    def state_dict(self) -> dict:
        return {"order": self.order, "position": self.position, "experts": sorted(self._by_name)}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        if order and isinstance(order[0], int):  # a state written before orders named their experts
            saved = state.get("experts") or [e.name for e in self.experts]
            order = [saved[i] if i < len(saved) else f"#{i}" for i in order]
        self.order, self.position = list(order), state["position"]
        before = set(state.get("experts", self.order))
        removed, added = sorted(before - set(self._by_name)), sorted(set(self._by_name) - before)
        if removed or added:
            log.warning("the experts changed since this state was saved (%s%s): the run goes on with the experts "
                        "there now, so from here its draws differ from an uninterrupted run's",
                        f"gone: {', '.join(removed)}" if removed else "",
                        ("; " if removed and added else "") + (f"new: {', '.join(added)}" if added else ""))


def initial_pairs(spec: PhaseSpec, args, data: DataContext, generator: torch.Generator,
                  joint: Optional["JointFeatures"]) -> torch.Tensor:
    """Which training pairs start the phase: random ones, or the prototypes of --pair_init prototype."""
    if args.pair_init == "prototype":
        return prototype_pairs(joint.image, joint.text, spec.num_queries, generator)
    order = torch.randperm(len(data.train), generator=generator)
    if args.phase_init == "independent":
        return order[:spec.num_queries]
    return first_untaken(order, spec.num_queries, earlier_random_picks(spec.index, args, len(data.train)))


def first_untaken(order: torch.Tensor, count: int, taken: set) -> torch.Tensor:
    """The first ``count`` entries of ``order`` outside ``taken``; when too few are left, the earliest taken
    ones fill the rest (a training set smaller than the phases together)."""
    free = [i for i in order.tolist() if i not in taken]
    if len(free) < count:
        free += [i for i in order.tolist() if i in taken][:count - len(free)]
    return torch.tensor(free[:count], dtype=order.dtype)


def earlier_random_picks(index: int, args, available: int) -> set:
    """The training pairs phases 0 .. index-1 started from under --phase_init disjoint (each phase's draw
    depends only on the seed and its index, so they are drawn again here, on a resume too)."""
    taken: set = set()
    for k in range(index):
        order = torch.randperm(available, generator=torch.Generator().manual_seed(args.seed * 1000 + k))
        taken.update(first_untaken(order, args.num_queries[k], taken).tolist())
    return taken


@dataclass
class JointFeatures:
    """Per training pair: the starting image encoder's features and the cached text features."""
    image: torch.Tensor
    text: torch.Tensor


@torch.no_grad()
def training_pair_features(student, data: DataContext, device: torch.device, batch_size: int,
                           num_workers: int) -> JointFeatures:
    encoder = copy.deepcopy(student.image_encoder).eval()
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator())  # leaves the global generator alone
    features = [encoder(images.to(device)).float().cpu()
                for images, _ in progress(loader, desc="prototype features", unit="batch", leave=False)]
    return JointFeatures(torch.cat(features), data.train_text.float().cpu())


def initial_set(spec: PhaseSpec, args, data: DataContext, generator: torch.Generator,
                joint: Optional[JointFeatures] = None) -> SyntheticSet:
    """``num_queries`` training pairs (test-time transform) and their cached text features."""
    picks = initial_pairs(spec, args, data, generator, joint)
    if args.pix_init == "real":
        images = torch.stack([data.train[i][0] for i in picks.tolist()])
    else:
        images = torch.randn(spec.num_queries, 3, args.image_size, args.image_size, generator=generator)
    if args.txt_init == "real":
        texts = data.train_text[picks]
    else:
        texts = torch.randn(spec.num_queries, data.text_dim, generator=generator)
    similarity = make_similarity(args.sim_type, spec.num_queries, spec.sim_rank, args.alpha, generator)
    return SyntheticSet(images, texts, similarity, args.lr_teacher_img, args.lr_teacher_txt, args.learn_sim)


@dataclass
class Run:
    """What the phases share: paths, data, model config, benchmarks, logger."""
    args: argparse.Namespace
    folder: Path
    data: DataContext
    config: object
    device: torch.device
    test: RetrievalBenchmark
    val: Optional[RetrievalBenchmark]
    metrics: MetricsLogger
    settings: EvalSettings
    joint: Optional[JointFeatures] = None  # for --pair_init prototype
    ranks: Ranks = SINGLE  # under torchrun only rank 0 evaluates and writes

    @property
    def files(self) -> RunFolder:
        """The run folder's file names (one place knows them)."""
        return RunFolder(self.folder)

    @property
    def latest(self) -> Path:
        return self.files.latest


def evaluate_and_save(run: Run, finished: List[FrozenSubset], ema_set: SyntheticSet, phase: int, it: int,
                      loss: Optional[float]) -> dict:
    subsets = finished + [FrozenSubset.from_set(ema_set)]
    summary = evaluate_subsets(subsets, run.config, run.settings, run.test, run.val, run.device,
                               desc=f"phase {phase} it {it}: students")
    record = {"phase": phase, "iteration": it, "matching_loss": loss, "syn_lr_img": ema_set.syn_lr_img.item(),
              "syn_lr_txt": ema_set.syn_lr_txt.item(),
              **{k: v for k, v in summary["selected"]["mean"].items()},
              **{f"{k}_std": v for k, v in summary["selected"]["std"].items()}}
    run.metrics.log(record)
    log.info("phase %d it %d | %s ± %.2f", phase, it, format_recall(summary["selected"]["mean"]),
             summary["selected"]["std"]["r_mean"])
    checkpoint.save_distilled(run.files.checkpoint(phase, it), ema_set, checkpoint_config(run), phase, it)
    save_grid(ema_set.images, run.folder / f"synthetic_{phase}_{it}.png")
    write_captions(run.folder / f"captions_{phase}_{it}.txt",
                   nearest_captions(ema_set.texts, run.data.train_text, run.data.train.captions))
    return record


def checkpoint_config(run: Run) -> dict:
    return {**{k: v for k, v in vars(run.args).items()}, "text_dim": run.data.text_dim, "git_sha": git_sha()}


@dataclass
class PhaseLoop:
    """Everything a phase's loop carries from one iteration to the next (what resume restores)."""
    synthetic: SyntheticSet
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    sampler: MiniBatchSampler
    cycle: ExpertCycle
    generator: torch.Generator
    starts: StartSampler
    keep_choice: Optional[KeepChoice] = None  # --keep_graphs auto's timings and choice
    batching_choice: Optional[BatchingChoice] = None  # --segment_batching auto's

    def state_dict(self, device: torch.device) -> dict:
        return {"synthetic": self.synthetic.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "sampler": self.sampler.state_dict(), "cycle": self.cycle.state_dict(),
                "generator": self.generator.get_state(),
                "keep_choice": self.keep_choice.state_dict() if self.keep_choice is not None else None,
                "batching_choice": self.batching_choice.state_dict() if self.batching_choice is not None else None}

    def load_state_dict(self, state: dict, device: torch.device, rates: SyntheticRates) -> None:
        """Restore the loop; the optimizer then takes ``rates`` (the flags of this start), so a resume
        with a lower --lr_img after a NaN stop really steps at the lower rate."""
        self.synthetic.load_state_dict(state["synthetic"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, fresh in zip(self.optimizer.param_groups, self.synthetic.param_groups(rates)):
            group["lr"], group["momentum"] = fresh["lr"], fresh["momentum"]
        self.ema.load_state_dict({"decay": state["ema"]["decay"],
                                  "shadow": {k: v.to(device) for k, v in state["ema"]["shadow"].items()}})
        self.sampler.load_state_dict(state["sampler"])
        self.cycle.load_state_dict(state["cycle"])
        self.generator.set_state(state["generator"])
        if self.keep_choice is not None and state.get("keep_choice"):
            self.keep_choice.load_state_dict(state["keep_choice"])
        if self.batching_choice is not None and state.get("batching_choice"):
            self.batching_choice.load_state_dict(state["batching_choice"])


def global_rng_state(device: torch.device) -> dict:
    """The global generators, which head dropout and blend draws use between checkpoints."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_global_rng(state: dict, device: torch.device) -> None:
    rng = state.get("rng") or (state.get("loop") or {})  # states before 2026-12 kept it in the loop only
    if rng.get("torch_rng") is not None:
        torch.set_rng_state(rng["torch_rng"])
    if rng.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda_rng"], device)


def save_resume_state(run: Run, phase: int, it: int, finished: List[FrozenSubset],
                      loop: Optional[PhaseLoop] = None) -> None:
    """``latest.pt``: where to continue (phase, iteration), the finished subsets, the loop's state and
    the global generators' (at a phase's end too: the next phase's dropout masks come from them)."""
    state = {"phase": phase, "iteration": it, "finished": [asdict(s) for s in finished], "args": vars(run.args),
             "loop": loop.state_dict(run.device) if loop is not None else None,
             "rng": global_rng_state(run.device)}
    checkpoint.save_state(run.latest, state)


def check_finite(result, synthetic: SyntheticSet, run: Run, phase: int, it: int) -> None:
    bad = not math.isfinite(result.loss) or any(
        p.grad is not None and not torch.isfinite(p.grad).all() for p in synthetic.parameters())
    if bad:
        raise FloatingPointError(nan_stop_message(run, phase, it, f"the matching loss or its gradient is NaN/Inf "
                                                                  f"(loss {result.loss})"))


def check_stepped_set(synthetic: SyntheticSet, run: Run, phase: int, it: int) -> None:
    """The step itself can overflow a finite gradient (a huge rate): nothing non-finite reaches the EMA."""
    bad = [name for name, p in synthetic.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(nan_stop_message(run, phase, it, f"the synthetic set's step made {', '.join(bad)} "
                                                                  f"NaN/Inf"))


def nan_stop_message(run: Run, phase: int, it: int, what: str) -> str:
    return (f"phase {phase}, iteration {it}: {what}. Stopped; the last good checkpoint is "
            f"{last_checkpoint(run, phase)} and {run.latest.name} holds the state saved with it. Lower --lr_img / "
            f"--lr_txt / --lr_sim / --lr_lr (or set --clamp_lr), then rerun with --resume --name {run.args.name}: "
            f"the resumed run steps at the lowered rates.")


def last_checkpoint(run: Run, phase: int):
    saved = run.files.checkpoints(phase)
    return saved[-1] if saved else "none yet"


def out_of_memory_message(run: Run, phase: int, it: int, cached_bytes: int = 0) -> str:
    args = run.args
    cache = (f", lower --expert_cache_gb ({cached_bytes / GIB:.1f} GiB of expert snapshots are kept on the GPU; "
             f"0 keeps none)" if cached_bytes else "")
    lower = ("Give --keep_graphs a count below the kept_graphs the progress bar showed" if args.keep_graphs == AUTO
             else "Lower --keep_graphs")
    return (f"phase {phase}, iteration {it}: out of GPU memory in the matching step (--keep_graphs {args.keep_graphs}, "
            f"--mini_batch_size {args.mini_batch_size}, --syn_steps {args.syn_steps}). {lower} first "
            f"(0 keeps memory constant in --syn_steps){cache}, then --mini_batch_size, and rerun with --resume "
            f"--name {args.name}: it continues from the last checkpoint ({last_checkpoint(run, phase)}).")


def synthetic_rates(args: argparse.Namespace) -> SyntheticRates:
    return SyntheticRates(args.lr_img, args.lr_txt, args.lr_lr, args.lr_sim, args.momentum_syn, args.momentum_lr,
                          args.momentum_sim)


def start_ranges(spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer, mode: str) -> StartRanges:
    """The phase's range for both sides, or under ``dynamic`` each side's own (logged)."""
    window = (spec.min_start, spec.max_start)
    if mode != "dynamic":
        return StartRanges(window, window)
    experts = buffer.experts()
    last = min(e.num_snapshots for e in experts) - 1
    if last < 1:
        raise trajectories.TrajectoryError(f"--async_starts dynamic needs experts of at least two snapshots; "
                                           f"{buffer.folder} holds {last + 1}")
    change = {side: mean_change_per_epoch(experts, side, last, lambda e, s, t: e.flat(s, t))
              for side in trajectories.SIDES}
    ranges = dynamic_ranges(change["image"], change["text"], *window)
    log.info("phase %d asynchronous starts: image from %s, text from %s (per-epoch change image %s, text %s)",
             spec.index, ranges.image, ranges.text, [f"{c:.3g}" for c in change["image"]],
             [f"{c:.3g}" for c in change["text"]])
    return ranges


def start_phase(run: Run, spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer) -> PhaseLoop:
    args = run.args
    generator = torch.Generator().manual_seed(args.seed * 1000 + spec.index)
    synthetic = initial_set(spec, args, run.data, generator, run.joint).to(run.device)
    starts = StartSampler(start_ranges(spec, buffer, args.async_starts), args.async_starts != "off", generator)
    return PhaseLoop(synthetic, torch.optim.SGD(synthetic.param_groups(synthetic_rates(args)), lr=0.0),
                     ExponentialMovingAverage(synthetic, args.ema_decay),
                     MiniBatchSampler(spec.num_queries, args.mini_batch_size, generator),
                     ExpertCycle(buffer.experts(), generator), generator, starts)


def distinct_segments(loop: PhaseLoop) -> int:
    """Experts times start snapshots (per side, for asynchronous starts) a phase can draw from."""
    starts = loop.starts
    image, text = starts.ranges.image, starts.ranges.text
    pairs = (image[1] - image[0]) * ((text[1] - text[0]) if starts.asynchronous else 1)
    return len(loop.cycle.experts) * pairs


def warn_repeated_segments(count: int, loop: PhaseLoop, spec: PhaseSpec) -> None:
    distinct = distinct_segments(loop)
    if count > distinct:
        log.warning("--segments_per_iter %d exceeds the %d distinct segments phase %d can draw (%d experts x its "
                    "start snapshots): some repeat in every iteration, which costs time and adds nothing; give at "
                    "most %d, or more experts or a wider --min_start_epoch/--max_start_epoch", count, distinct,
                    spec.index, len(loop.cycle.experts), distinct)


def draw_segments(loop: PhaseLoop, count: int):
    """The iteration's draws from the phase's generator, in the order :mod:`distill_utils.segments`
    documents: each segment's expert and start (the mini-batches and the seeds follow)."""
    return [(loop.cycle.next(), loop.starts.draw()) for _ in range(count)]


def segment_batching(flag: str, matcher: TrajectoryMatcher, own: int, ranks, timeout_s: float):
    """What --segment_batching asks for, as match_segments takes it (False where it cannot apply)."""
    if own == 1 or flag == SEQUENTIAL:
        return False
    if not supports_batching(matcher):
        log.info("segments run one after another: this image encoder draws its own dropout, which batching "
                 "cannot give it")
        return False
    if flag == BATCHED:
        return True
    choice = BatchingChoice()
    if ranks.distributed:  # every rank batches alike, by the ranks' summed timings
        choice.agree = lambda times: sum_across([times], ranks, timeout_s)
    return choice


def run_phase(run: Run, spec: PhaseSpec, buffer: trajectories.TrajectoryBuffer, student, finished, state) -> FrozenSubset:
    args, device, ranks = run.args, run.device, run.ranks
    loop = start_phase(run, spec, buffer)
    synthetic, optimizer, ema, sampler = loop.synthetic, loop.optimizer, loop.ema, loop.sampler
    matcher = TrajectoryMatcher(student, MultilabelContrastiveLoss(args.loss_type), args.syn_steps, args.keep_graphs,
                                blend=args.blend, normalization=args.match_norm,
                                autocast=torch.bfloat16 if args.student_autocast == "bf16" else None)
    if matcher.keep_choice is not None:
        loop.keep_choice = matcher.keep_choice
        if ranks.distributed:  # every rank keeps or recomputes alike, by the ranks' summed timings
            matcher.keep_choice.agree = lambda times: sum_across([times], ranks, args.dist_timeout)
    snapshots = SnapshotCache.from_flag(device, args.expert_cache_gb)
    count, mine = args.segments_per_iter, share_of(args.segments_per_iter, ranks)
    warn_repeated_segments(count, loop, spec)
    batching = segment_batching(args.segment_batching, matcher, len(mine), ranks, args.dist_timeout)
    if isinstance(batching, BatchingChoice):
        loop.batching_choice = batching
    it, skip_eval_at = 0, None
    if state is not None and state["phase"] == spec.index and state["loop"] is not None:
        loop.load_state_dict(state["loop"], device, synthetic_rates(args))
        it = skip_eval_at = state["iteration"]  # evaluated and saved just before that state was written
        log.info("resuming phase %d at iteration %d", spec.index, it)
    ema_set = copy.deepcopy(synthetic)
    loss = None
    with progress(total=spec.iterations, initial=it, desc=f"phase {spec.index}", unit="it",
                  disable=not ranks.main) as bar:
        while True:
            due = it == spec.iterations or (it % args.eval_it == 0 and (it > 0 or args.eval_init))
            if due and it != skip_eval_at and ranks.main:
                evaluate_and_save(run, finished, ema.copy_to(ema_set), spec.index, it, loss)
                save_resume_state(run, spec.index, it, finished, loop)
            if it == spec.iterations:
                break
            draws = draw_segments(loop, count)
            batches = [sampler.next().to(device) for _ in range(args.syn_steps)]
            seeds = draw_seeds(loop.generator, count)
            own = [Segment(*segment_ends(snapshots, expert, epochs, args.expert_epochs), seeds[j])
                   for j, (expert, epochs) in enumerate(draws) if j in mine]
            optimizer.zero_grad(set_to_none=True)
            try:
                result = match_segments(matcher, synthetic, own, count, batches, ranks, args.dist_timeout,
                                        batching)
            except torch.OutOfMemoryError:
                raise MemoryError(out_of_memory_message(run, spec.index, it, snapshots.kept_bytes)) from None
            check_finite(result, synthetic, run, spec.index, it)
            snapshots.settle_budget()
            optimizer.step()
            if args.clamp_lr is not None:
                with torch.no_grad():
                    synthetic.syn_lr_img.clamp_(min=args.clamp_lr)
                    synthetic.syn_lr_txt.clamp_(min=args.clamp_lr)
            check_stepped_set(synthetic, run, spec.index, it)
            ema.update(synthetic)
            loss = result.loss
            it += 1
            bar.set_postfix(loss=f"{loss:.4f}", lr_img=f"{synthetic.syn_lr_img.item():.4g}",
                            kept_graphs=f"{result.kept_graphs}/{args.syn_steps}", refresh=False)
            bar.update()  # redraws at the bar's own pace (a log file: once a minute)
            if it % 10 == 0 and ranks.main:
                run.metrics.log({"phase": spec.index, "iteration": it, "matching_loss": loss,
                                 "kept_graphs": result.kept_graphs, "syn_lr_img": synthetic.syn_lr_img.item(),
                                 "syn_lr_txt": synthetic.syn_lr_txt.item(), **{
                                     f"loss_{side}": v for side, v in result.per_side.items()}})
    log.info("phase %d expert snapshots: %s", spec.index, snapshots.describe())
    return FrozenSubset.from_set(ema.copy_to(ema_set))


def segment_ends(snapshots: SnapshotCache, expert, epochs: dict, expert_epochs: int):
    """A segment's start snapshot and target (``expert_epochs`` later) on both sides."""
    start = {side: snapshots.get(expert, side, epochs[side]) for side in trajectories.SIDES}
    target = {side: snapshots.get(expert, side, epochs[side] + expert_epochs) for side in trajectories.SIDES}
    return start, target


# Flags that fix the shape or meaning of what a run folder holds; --resume refuses to change them.
FIXED_ON_RESUME = ("dataset", "image_encoder", "text_encoder", "image_trainable", "out_embedding", "image_size",
                   "subset_num", "num_queries", "sim_type", "sim_rank", "alpha", "learn_sim")


def run_folder(args: argparse.Namespace) -> Path:
    return Path(args.logged_dir) / args.dataset / args.name


def previous_state(args: argparse.Namespace, run: RunFolder) -> Optional[dict]:
    """The state to resume from (None: start at the beginning); refuses to start over an earlier run,
    finished or not, and to resume one whose resume state is gone (its checkpoints would be overwritten)."""
    if run.started():
        if not args.resume:
            raise checkpoint.CheckpointError(
                f"run folder {run.path} already holds a run: pass --resume to continue it, or another --name; an "
                f"earlier run is never overwritten")
        return checkpoint.load_state(run.latest)
    saved = run.checkpoints()
    if saved:
        raise checkpoint.CheckpointError(
            f"run folder {run.path} holds checkpoints ({saved[-1].name} and {len(saved) - 1} more) but no "
            f"{run.LATEST}, so it can be neither continued nor restarted without overwriting them. Pass another "
            f"--name (eval.py --run {run.path} still evaluates what is there), or move the folder away.")
    if run.holds_run() and not args.resume:
        raise checkpoint.CheckpointError(
            f"run folder {run.path} holds the start of an earlier run that never reached its first checkpoint "
            f"({run.ARGS}): pass --resume to start it again from the beginning, or another --name")
    if args.resume:
        log.warning("--resume: %s has no %s (the run never reached its first checkpoint); starting it from the "
                    "beginning", run.path, run.LATEST)
    return None


def changed_flags(before: dict, now: dict) -> dict:
    """Flags whose value differs; a flag the run's start did not record (added to the code since) is
    not a change: every new flag's default keeps the earlier behaviour."""
    keys = sorted(set(before) - {"resume", "git_sha"})
    return {k: [before.get(k), now.get(k)] for k in keys if comparable(before.get(k)) != comparable(now.get(k))}


def check_resumable(state: dict, args: argparse.Namespace, folder: Path) -> dict:
    """Refuse flags that would not fit the saved state (checked from the flags alone, before any data is
    loaded); return every changed flag {name: [old, new]}."""
    changes = changed_flags(state.get("args", {}), vars(args))
    fixed = {k: v for k, v in changes.items() if k in FIXED_ON_RESUME}
    if fixed:
        listed = "; ".join(f"--{k} was {old} and is now {new}" for k, (old, new) in fixed.items())
        original = " ".join(f"--{k} {_flag_value(old)}" for k, (old, _) in fixed.items())
        raise checkpoint.CheckpointError(
            f"--resume of {folder} with flags that do not fit its saved state: {listed}. Resume with the run's "
            f"own values ({original}), or start a new run with another --name.")
    return changes


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def already_finished(run: RunFolder, state: dict, args: argparse.Namespace) -> Path:
    """A resume of a finished run has nothing left to do: it returns at once, and refuses flags that
    would decide another result (they could not change what the folder holds)."""
    differences = differing_flags(state.get("args", {}), vars(args))
    if differences:
        raise checkpoint.CheckpointError(
            f"--resume of {run.path}: that run has finished, so these changed flags could not change its result: "
            f"{describe_differences(differences)}. Pass another --name to make a run with them, or resume with the "
            f"run's own flags (args_history.jsonl's last line) to leave it as it is.")
    log.info("%s has finished every phase; nothing left to do", run.path)
    return run.path


def record_start(run: RunFolder, args: argparse.Namespace, state: Optional[dict], changes: dict) -> None:
    """``args.json`` keeps the flags the run started with; every start, resumes included, adds a line to
    ``args_history.jsonl`` with the flags it changed. A resume drops the metrics lines logged after its
    state was saved, so metrics.jsonl reads as one uninterrupted run."""
    if changes:
        log.warning("--resume with changed flags (recorded in args_history.jsonl): %s",
                    ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items()))
    if state is None:
        run.args_json.unlink(missing_ok=True)  # a start from the beginning: its own flags, not a dead start's
    else:
        run.trim_metrics(state["phase"], state["iteration"])
    resumed_at = None if state is None else {"phase": state["phase"], "iteration": state["iteration"]}
    run.record_start(vars(args), resumed_at, changes, git_sha())
    record_experts(run, [Path(folder) for folder in args.buffer_path[:args.subset_num]], resumed=state is not None)


def record_experts(run: RunFolder, folders: Sequence[Path], resumed: bool) -> None:
    """A run records the experts it starts from (``experts.json``), so a later call can tell a run made
    from other experts; a resume keeps the record of the start and names what changed since."""
    identity = trajectories.experts_identity(folders)
    recorded = run.recorded_experts() if resumed else None
    if recorded is None:
        run.record_experts(identity)
        return
    changed = trajectories.identity_changes(recorded, identity)
    if changed:
        log.warning("the experts changed since this run started (%s stays the record of its start): %s",
                    run.experts_record.name, " | ".join(changed))


def trajectory_kind(folder: Path) -> Optional[str]:
    """"shortcut" for a folder convexify.py wrote, "normal" for one buffer.py wrote, None if unknown."""
    try:
        meta = trajectories.read_meta(folder)
    except trajectories.TrajectoryError:
        meta = None
    if meta is not None:
        return "shortcut" if "shortcut" in meta else "normal"
    return "shortcut" if folder.name.startswith("convexified") else None


def check_sizes(specs: Sequence[PhaseSpec], train_pairs: int) -> None:
    for spec in specs:
        if spec.num_queries > train_pairs:
            raise DataError(f"--num_queries {spec.num_queries} (phase {spec.index}) exceeds the {train_pairs} "
                            f"training pairs of the dataset: pass at most {train_pairs}")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Distil; return the run folder. Under torchrun every process runs this; rank 0 takes the run
    folder and prepares the run, the others follow it (:func:`follow_rank0`)."""
    setup_logging()
    args = parse_args(argv)
    ranks = ranks_from_environment()
    specs = phase_specs(args)
    check_method_fits(args.method, args, [trajectory_kind(Path(spec.buffer_path)) for spec in specs],
                      given_flags(sys.argv[1:] if argv is None else argv))
    if not ranks.distributed:
        return distill_locked(args, specs, Handshake(SINGLE, args.dist_timeout))
    if not ranks.main:
        logging.getLogger("ptmst").setLevel(logging.WARNING)  # rank 0 logs the run
    start_group(ranks, rank_device(args.device, ranks), args.dist_timeout)
    try:
        handshake = Handshake(ranks, args.dist_timeout)
        if ranks.main:
            with handshake:
                return distill_locked(args, specs, handshake)
        return follow_rank0(args, specs, handshake)
    finally:
        stop_group(ranks)


def rank_device(name: Optional[str], ranks: Ranks) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES),
    or the CPU."""
    if not ranks.distributed:
        return resolve_device(name)
    if name is not None and name.startswith("cuda:") and ranks.distributed:
        raise UsageError(f"--device {name}: under torchrun every process takes cuda:LOCAL_RANK itself; pass --device "
                         f"cuda (or nothing) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    device = resolve_device(None if name == "cuda" else name)
    if name == "cuda" and device.type != "cuda":
        device = resolve_device(name)  # CUDA is not available: resolve_device says so
    return device


class Handshake:
    """What rank 0 tells the other processes once it has prepared the run (or failed to): the run's
    name, whether it resumed, whether it had already finished, or the error that stopped it, so that
    no process waits on a rank 0 that quit. For one process it does nothing."""

    def __init__(self, ranks: Ranks, timeout_s: float):
        self.ranks, self.timeout_s, self.sent = ranks, timeout_s, False

    def send(self, **news) -> None:
        if not self.sent:
            self.sent = True
            share_from_rank0(news, self.ranks, self.timeout_s)

    def receive(self) -> dict:
        news = share_from_rank0(None, self.ranks, self.timeout_s)
        if news.get("error"):
            raise UsageError(f"rank {self.ranks.rank}: rank 0 stopped before the run began: {news['error']}")
        return news

    def __enter__(self) -> "Handshake":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None and not self.sent:
            self.send(error=user_message(error) or type(error).__name__)
        return False


def distill_locked(args: argparse.Namespace, specs: Sequence[PhaseSpec], handshake: Handshake) -> Path:
    folder = writable_folder(run_folder(args), "--logged_dir")
    try:
        with folder_lock(folder, wait=False, owner=this_process()):
            return distill_in(RunFolder(folder), args, specs, handshake)
    except FolderBusy as busy:
        raise UsageError(f"run folder {folder} is in use by {busy.owner or 'another process'}: a run (or a resume) "
                         f"of it is still going. Wait for it to finish, or use another --name.") from None


def follow_rank0(args: argparse.Namespace, specs: Sequence[PhaseSpec], handshake: Handshake) -> Path:
    """A process other than rank 0: it waits for rank 0 to check and claim the run folder, then
    reads the same resume state, loads the same data and runs the same phases, writing nothing."""
    news = handshake.receive()
    args.name = news["name"]  # a default name holds rank 0's clock
    folder = run_folder(args)
    if news["finished"]:
        return folder
    state = checkpoint.load_state(RunFolder(folder).latest) if news["resumed"] else None
    setting = prepare(args, specs, state, handshake.ranks)
    wait_for_all(handshake.ranks, "waiting for every rank to read the run's state", args.dist_timeout)
    return run_phases(setting, folder, specs, state)


def distill_in(run_folder: RunFolder, args: argparse.Namespace, specs: Sequence[PhaseSpec],
               handshake: Handshake) -> Path:
    """The run, with its folder locked: resume state, experts, data, student, then the phases."""
    folder = run_folder.path
    state = previous_state(args, run_folder)
    changes = check_resumable(state, args, folder) if state is not None else {}
    if state is not None and state["phase"] >= len(specs):
        done = already_finished(run_folder, state, args)
        handshake.send(name=args.name, finished=True, resumed=True)
        return done
    setting = prepare(args, specs, state, handshake.ranks)
    record_start(run_folder, args, state, changes)
    if handshake.ranks.distributed:
        log.info("%d processes (torchrun), %d segment(s) per iteration each", handshake.ranks.world,
                 args.segments_per_iter // handshake.ranks.world)
    handshake.send(name=args.name, finished=False, resumed=state is not None)
    wait_for_all(handshake.ranks, "waiting for every rank to read the run's state", args.dist_timeout)
    return run_phases(setting, folder, specs, state)


@dataclass
class Prepared:
    """What every process builds before the phases: experts, data, student, benchmarks (rank 0's)."""
    args: argparse.Namespace
    buffers: list
    device: torch.device
    data: DataContext
    config: object
    student: torch.nn.Module
    test: Optional[RetrievalBenchmark]
    val: Optional[RetrievalBenchmark]
    joint: Optional[JointFeatures]
    ranks: Ranks


def prepare(args: argparse.Namespace, specs: Sequence[PhaseSpec], state: Optional[dict], ranks: Ranks) -> Prepared:
    buffers = open_buffers(specs, args.expert_epochs)
    device = rank_device(args.device, ranks)
    enable_fast_math(device)
    data = load_data(args, device, augment=False, need_val=args.eval_protocol == "val")
    check_sizes(specs, len(data.train))
    config = model_config(args, data.text_dim)
    student = config.build(seed=args.seed).to(device)
    expected = trajectories.ExpectedShapes(
        image=trajectories.parameter_shapes(student.side_named_parameters("image")),
        text=trajectories.parameter_shapes(student.side_named_parameters("text")))
    for buffer in buffers:
        buffer.set_expected(expected)  # every expert checked before the first iteration
    test, val = (split_benchmarks(data, device, args.batch_size_test, args.num_workers) if ranks.main
                 else (None, None))  # only rank 0 evaluates
    joint = (training_pair_features(student, data, device, args.batch_size_test, args.num_workers)
             if args.pair_init == "prototype" else None)
    return Prepared(args, buffers, device, data, config, student, test, val, joint, ranks)


class _NoMetrics:
    """The metrics of a process other than rank 0: it writes none."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run_phases(setting: Prepared, folder: Path, specs: Sequence[PhaseSpec], state: Optional[dict]) -> Path:
    args, device = setting.args, setting.device
    metrics = (MetricsLogger(RunFolder(folder).metrics, not args.disabled_wandb, args.wandb_project, args.name,
                             vars(args)) if setting.ranks.main else _NoMetrics())
    run = Run(args, folder, setting.data, setting.config, device, setting.test, setting.val, metrics,
              eval_settings(args), setting.joint, setting.ranks)
    # the phases' global stream starts here, whatever the set-up drew (a text cache built or read), and a
    # resume continues it from where its state was saved, at a phase's end as well as inside one
    torch.manual_seed(args.seed)
    if state is not None:
        restore_global_rng(state, device)
    finished = [FrozenSubset(**s) for s in state["finished"]] if state else []
    try:
        for spec, buffer in zip(specs, setting.buffers):
            if spec.index < len(finished):
                continue
            finished.append(run_phase(run, spec, buffer, setting.student, finished, state))
            if setting.ranks.main:
                save_resume_state(run, spec.index + 1, 0, finished)
    finally:
        run.metrics.close()
    log.info("done: %s", folder)
    return folder
