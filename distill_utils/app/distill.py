"""Phased trajectory matching (``distill_ptm-st.py``).

Each phase k learns its own synthetic subset from scratch against its own (shortcut) trajectories;
when it finishes, its EMA state is frozen and every later evaluation trains students on the
finished subsets first. Table of contents of :func:`main`: parse and validate, claim the run folder
(or resume it), open the expert folders, load data, build the student, then
:func:`distill_utils.distillation.phases.run_phases`, where the phases' loop reads top to bottom.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..data import DataError
from ..distillation.matching import AUTO, NORMALIZATIONS
from ..distillation.methods import METHODS, check_method_fits
from ..distillation.phases import PhaseSpec, Prepared, open_buffers, run_phases, training_pair_features
from ..distillation.segments import BATCHED, SEQUENTIAL
from ..distillation.starts import ASYNC_MODES
from ..experts import trajectories
from ..runtime import checkpoint
from ..runtime.claims import FolderBusy, folder_lock, this_process
from ..runtime.distributed import (SINGLE, Handshake, Ranks, ranks_from_environment, start_group, stop_group,
                                   wait_for_all)
from ..runtime.errors import UsageError, writable_folder
from ..runtime.runlog import git_sha, resolve_device, setup_logging
from ..runtime.runs import RunFolder, comparable, describe_differences, differing_flags
from ..runtime.speed import enable_fast_math
from ..students.retrieval import split_benchmarks

from .cli import (add_bool_flag, apply_preset, check_eval_args, check_per_phase_lists, chosen_method, count_or,
                  distill_settings, finite_float, given_flags, non_negative, positive, script_parser, user_message)
from .context import load_data, model_config

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
    check_method_fits(args.method, vars(args), [trajectory_kind(Path(spec.buffer_path)) for spec in specs],
                      given_flags(sys.argv[1:] if argv is None else argv))
    if not ranks.distributed:
        return distill_locked(args, specs, Handshake(SINGLE, args.dist_timeout, user_message))
    if not ranks.main:
        logging.getLogger("ptmst").setLevel(logging.WARNING)  # rank 0 logs the run
    start_group(ranks, rank_device(args.device, ranks), args.dist_timeout)
    try:
        handshake = Handshake(ranks, args.dist_timeout, user_message)
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
    return Prepared(distill_settings(args), buffers, device, data, config, student, test, val, joint, ranks)


