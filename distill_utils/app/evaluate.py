"""Evaluate saved distilled sets against baselines at the same budget (``eval.py``).

Rows of the table: the distilled phases (``--ckpt_path``, in phase order), a random real subset of
the same sizes with identity similarity (``--baseline random``), and optionally the full training
set (``--baseline full``, trained like an expert). Every row is mean ± std over ``--num_eval`` runs.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from .. import checkpoint
from ..atomic import text_writer, write_all
from ..data import DataError
from ..errors import writable_folder
from ..evaluation import StudentRun, evaluate_subsets, format_table, student_seed, summarise
from ..experts import ExpertOptim, make_optimizer, train_one_epoch
from ..losses import MultilabelContrastiveLoss
from ..retrieval import RetrievalBenchmark, split_benchmarks
from ..runs import RunFolder
from ..runlog import resolve_device, seeded, setup_logging
from ..speed import SpeedOptions, enable_fast_math
from ..synthetic import FrozenSubset

from .cli import eval_settings, positive, script_parser
from .context import DataContext, load_data, model_config

log = logging.getLogger("ptmst.eval")
MODEL_KEYS = ("image_encoder", "text_encoder", "image_trainable", "image_size", "out_embedding")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        "eval.py",
        "Train fresh students on distilled sets and report retrieval recall (mean ± std), "
        "beside baselines of the same size.",
        "Examples: python eval.py --run logged_files/flickr/flickr500 (flags and checkpoints from the run's "
        "args.json); python eval.py --dataset flickr --ckpt_path logged_files/flickr/RUN/distilled_0_2000.pt "
        "logged_files/flickr/RUN/distilled_1_2000.pt --image_trainable --baseline random", student_evaluation=True)
    group = parser.add_argument_group("what to evaluate")
    group.add_argument("--run", default=None,
                       help="a distill_ptm-st.py run folder: its args.json gives the data and model flags and "
                            "the last checkpoint of every phase (flags given here still win)")
    group.add_argument("--ckpt_path", nargs="+", default=None, help="distilled_*.pt of each phase, in phase order")
    group.add_argument("--baseline", nargs="*", default=["random"], choices=["random", "full"],
                       help="reference rows: a random real subset of the same sizes, the full training set")
    group.add_argument("--lr_teacher_img", type=positive(float), default=0.1, help="baseline image-side lr")
    group.add_argument("--lr_teacher_txt", type=positive(float), default=0.1, help="baseline text-side lr")
    group.add_argument("--full_epochs", type=positive(), default=10, help="epochs of the full-data baseline")
    group.add_argument("--num_queries", type=positive(), nargs="+", default=None,
                       help="accepted for the reference's commands; checked against the checkpoints' sizes")
    group.add_argument("--sim_type", default=None, choices=["full", "lowrank"],
                       help="accepted for the reference's commands; the checkpoint's matrix is used")
    group.add_argument("--out_dir", default=None, help="where eval_results.{json,md} go (default: beside the last checkpoint)")
    return parser


def check_phase_order(paths: Sequence[str]) -> None:
    """Refuse a checkpoint given twice, or phases out of order (each file records its phase)."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in paths if resolved.count(Path(p).resolve()) > 1})
    if twice:
        raise checkpoint.CheckpointError(f"--ckpt_path names {twice[0]} more than once: give each phase's "
                                         f"checkpoint once, in phase order")
    phases = [checkpoint.recorded_phase(Path(p)) for p in paths]
    if all(phase is not None for phase in phases) and phases != list(range(len(phases))):
        raise checkpoint.CheckpointError(
            f"--ckpt_path gives phases {phases} but students train on phases 0, 1, ... in order: pass "
            f"{' '.join(str(paths[phases.index(k)]) for k in range(len(phases)) if k in phases) or 'them'} "
            f"(one checkpoint per phase, starting at phase 0)")


# Flags a run folder's args.json supplies to eval.py (what the distiller used), unless given on the command line.
RUN_FLAGS = ("dataset", "image_root", "ann_root", "image_size", "npz_dir", "image_encoder", "text_encoder",
             "image_pretrained", "image_trainable", "checkpoint_dir", "out_embedding", "temperature", "loss_type",
             "lr_teacher_img", "lr_teacher_txt", "seed")


def run_checkpoints(run: RunFolder, recorded: dict) -> List[str]:
    """The last checkpoint of every phase, all of which must exist."""
    folder = run.path
    paths = run.final_checkpoints(recorded)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise checkpoint.CheckpointError(
            f"--run {folder}: {', '.join(missing)} not there yet (the run has not finished every phase); finish it "
            f"with distill_ptm-st.py ... --name {folder.name} --resume, or pass --ckpt_path with the checkpoints "
            f"to evaluate")
    return [str(p) for p in paths]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags; with ``--run``, what the run's latest start recorded fills every flag not given here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None:
        if not args.ckpt_path:
            parser.error("pass --run RUN_FOLDER (logged_files/DATASET/RUN) or --ckpt_path with a checkpoint per phase")
        return args
    run = RunFolder(Path(args.run))
    recorded = run.recorded_args()
    parser.set_defaults(**{k: recorded[k] for k in RUN_FLAGS if k in recorded})
    args = parser.parse_args(argv)
    if not args.ckpt_path:
        args.ckpt_path = run_checkpoints(run, recorded)
    return args


def load_checkpoints(paths: Sequence[str], args: argparse.Namespace, text_dim: int) -> Tuple[List[FrozenSubset], str]:
    """The phases' subsets, checked against the flags, and the name of the method that distilled them
    (PTM-ST for checkpoints from before --method existed)."""
    subsets, config = [], {}
    for path in paths:
        subset, config = checkpoint.load_distilled(Path(path))
        for key in MODEL_KEYS:
            if key in config and config[key] != getattr(args, key):
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} was distilled with --{key} {config[key]} but this run uses --{key} "
                    f"{getattr(args, key)}: pass the same model flags as distill_ptm-st.py used")
        checkpoint.check_fits(subset, Path(path), args.image_size, text_dim)
        subsets.append(subset)
    if args.num_queries is not None and sum(args.num_queries) != sum(len(s) for s in subsets):
        raise checkpoint.CheckpointError(
            f"--num_queries {args.num_queries} (total {sum(args.num_queries)}) but the checkpoints hold "
            f"{[len(s) for s in subsets]} pairs: drop --num_queries or pass the checkpoints of every phase")
    method = config.get("method", "ptmst")
    return subsets, LABELS.get(method, method)


LABELS = {"ptmst": "PTM-ST", "mttvl": "MTT-VL", "lors": "LoRS", "amd": "AMD", "repblend": "RepBlend"}


def random_subsets(data: DataContext, sizes: Sequence[int], lr_img: float, lr_txt: float,
                   generator: torch.Generator) -> List[FrozenSubset]:
    """Real training pairs (test-time transform), identity similarity; distinct across phases when the
    training set holds enough pairs, else distinct within each phase."""
    available = len(data.train)
    if sum(sizes) <= available:
        chunks = torch.randperm(available, generator=generator)[:sum(sizes)].split(list(sizes))
    else:
        if max(sizes) > available:
            raise DataError(f"the random baseline needs {max(sizes)} distinct training pairs for one phase but the "
                            f"dataset has {available}: drop --baseline random or use a larger training set")
        log.warning("the training set has %d pairs, fewer than the %d the phases hold together: each phase's "
                    "random subset is drawn on its own, so they may share pairs", available, sum(sizes))
        chunks = [torch.randperm(available, generator=generator)[:size] for size in sizes]
    subsets = []
    for chunk in chunks:
        images = torch.stack([data.train[i][0] for i in chunk.tolist()])
        subsets.append(FrozenSubset(images, data.train_text[chunk].clone(), torch.eye(len(chunk)), lr_img, lr_txt))
    return subsets


def full_data_baseline(data: DataContext, args, config, test: RetrievalBenchmark, device) -> dict:
    """Students trained on the whole training set (expert recipe, test-time transform), evaluated at the end."""
    runs = []
    for run in range(args.num_eval):
        seed = student_seed(args.seed, run)
        with seeded(seed, device):
            model = config.build(seed=seed).to(device)
            speed = SpeedOptions.for_device(device).for_model(model)
            speed.prepare_model(model)
            optimizer, _ = make_optimizer(model, ExpertOptim(args.lr_teacher_img, args.lr_teacher_txt,
                                                             epochs=args.full_epochs), speed)
            loader = DataLoader(data.train, batch_size=args.batch_train, shuffle=True, num_workers=args.num_workers,
                                generator=torch.Generator().manual_seed(seed))
            for epoch in range(args.full_epochs):
                train_one_epoch(model, loader, data.train_text, optimizer, MultilabelContrastiveLoss("InfoNCE"),
                                device, speed, desc=f"full-data baseline {run + 1}/{args.num_eval} epoch {epoch + 1}")
            result = test.evaluate(model)
            runs.append(StudentRun(selected=result, last=result))
    return summarise(runs)


def write_results(folder: Path, rows: Dict[str, dict], args: argparse.Namespace) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    payload = {"rows": rows, "protocol": args.eval_protocol, "phase_lr": args.phase_lr, "num_eval": args.num_eval,
               "ckpt_path": args.ckpt_path, "epoch_eval_train": args.epoch_eval_train}
    write_all([(folder / "eval_results.json", text_writer(json.dumps(payload, indent=1))),
               (folder / "eval_results.md", text_writer(
                   f"# Retrieval recall (%), mean ± std over {args.num_eval} students\n\n"
                   f"protocol: {args.eval_protocol}, step sizes: {args.phase_lr}\n\n{table}\n"))])
    return folder / "eval_results.md"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Evaluate; return ``{row name: {"mean": ..., "std": ...}}``."""
    setup_logging()
    args = parse_args(argv)
    for path in args.ckpt_path:  # before loading any data
        if not Path(path).is_file():
            what = "is a folder, not a checkpoint file" if Path(path).is_dir() else "does not exist"
            raise checkpoint.CheckpointError(f"--ckpt_path {path} {what}: pass the distilled_PHASE_IT.pt files of "
                                             f"a run (logged_files/DATASET/RUN/), one per phase, in phase order")
    check_phase_order(args.ckpt_path)
    out_dir = writable_folder(Path(args.out_dir) if args.out_dir else Path(args.ckpt_path[-1]).parent, "--out_dir")
    device = resolve_device(args.device)
    enable_fast_math(device)
    data = load_data(args, device, augment=False, need_val=args.eval_protocol == "val")
    subsets, method = load_checkpoints(args.ckpt_path, args, data.text_dim)
    config = model_config(args, data.text_dim)
    test, val = split_benchmarks(data, device, args.batch_size_test, args.num_workers)
    settings = eval_settings(args)
    sizes = [len(s) for s in subsets]
    rows = {f"{method} ({sum(sizes)} pairs)": evaluate_subsets(subsets, config, settings, test, val, device,
                                                             "distilled set")["selected"]}
    if "random" in args.baseline:
        reals = random_subsets(data, sizes, args.lr_teacher_img, args.lr_teacher_txt,
                               torch.Generator().manual_seed(args.seed + 12345))
        rows[f"random real subset ({sum(sizes)} pairs)"] = evaluate_subsets(
            reals, config, settings, test, val, device, "random subset")["selected"]
    if "full" in args.baseline:
        rows[f"full training set ({len(data.train)} pairs)"] = full_data_baseline(data, args, config, test, device)["selected"]
    print(format_table(rows), flush=True)  # before writing: a failed write must not lose the table
    out = write_results(out_dir, rows, args)
    print(f"written to {out} and {out.with_suffix('.json')}")
    return rows
