"""Evaluate saved distilled sets against baselines at the same budget (``eval.py``).

Rows of the table: the distilled phases (``--ckpt_path``, in phase order), then the ``--baseline`` rows:
as many real training pairs as the distilled set holds, with identity similarity, trained at once as one
subset (as the papers' reference rows are), chosen at random (``random``) or by a coreset selection
(``herding``, ``kcenter``, ``forgetting``: see :mod:`distill_utils.students.coresets`); the same random pairs cut
into the phases' sizes and trained one after the other under the run's student schedule
(``random_split``: what the schedule costs before any distillation); and the full training set (``full``,
its students' epochs, learning rate and batch chosen on the val split: :mod:`distill_utils.students.full_data`).
Every row is mean ± std over ``--num_eval`` students. ``--student_image_encoder`` trains every row's students with
another image encoder than the distiller's (cross-architecture evaluation).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from networks import DualEncoderConfig

from ..runtime import checkpoint
from ..outputs import export
from ..runtime.atomic import text_writer, write_all
from ..experts import trajectories
from ..students.baselines import (LABELS, CoresetSelector, baseline_label, baseline_subsets,
                                   check_baselines)
from ..students.coresets import CORESETS
from ..data.context import DataContext
from ..runtime.errors import UsageError, writable_folder
from ..students.evaluation import evaluate_subsets, format_table
from ..students.full_data import FullDataSettings, full_data_protocols
from ..students.retrieval import split_benchmarks
from ..runtime.runs import RunFolder
from ..runtime.runlog import resolve_device, setup_logging
from ..runtime.speed import enable_fast_math
from ..distillation.synthetic import FrozenSubset

from .cli import add_bool_flag, check_eval_args, eval_settings, positive, script_parser
from .context import load_data, model_config

log = logging.getLogger("ptmst.eval")
MODEL_KEYS = ("image_encoder", "text_encoder", "image_trainable", "image_size", "out_embedding")
BASELINES = ("random", "random_split", *CORESETS, "full")


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
    group.add_argument("--baseline", nargs="*", default=["random"], choices=list(BASELINES),
                       help="reference rows, shown in this order: as many real training pairs as the distilled "
                            "set holds, trained at once, chosen at random; the same random pairs cut into the "
                            "phases' sizes and trained one after the other like the distilled phases "
                            "(random_split); pairs chosen by herding or k-center in the joint embedding of the "
                            "first expert's final snapshot, or as the pairs that expert forgot most often; the "
                            "full training set (its students' hyperparameters chosen on the val split)")
    group.add_argument("--expert_dir", default=None,
                       help="experts (buffer.py's folder) whose first expert herding, kcenter and forgetting "
                            "use (default with --run: the experts behind its first phase's --buffer_path)")
    group.add_argument("--lr_teacher_img", type=positive(float), default=0.1, help="baseline image-side lr")
    group.add_argument("--lr_teacher_txt", type=positive(float), default=0.1, help="baseline text-side lr")
    full = parser.add_argument_group(
        "full-data row (--baseline full)", "every training pair, trained by fresh students; epochs, learning rate "
        "and batch are chosen on the val split from the grid of these lists (one student per configuration, at a "
        "seed of the search's own), then --num_eval students train at the chosen ones")
    full.add_argument("--full_epochs", type=positive(), nargs="+", default=list(FullDataSettings.epochs),
                      help="student epochs to try (one x0.1 decay at half; recall measured at 11 points)")
    full.add_argument("--full_lr_scale", type=positive(float), nargs="+", default=list(FullDataSettings.lr_scales),
                      help="learning rates to try, as multiples of --lr_teacher_img and --lr_teacher_txt")
    full.add_argument("--full_batch", type=positive(), nargs="+", default=list(FullDataSettings.batches),
                      help="batch sizes to try")
    group.add_argument("--num_queries", type=positive(), nargs="+", default=None,
                       help="accepted for the reference's commands; checked against the checkpoints' sizes")
    group.add_argument("--sim_type", default=None, choices=["full", "lowrank"],
                       help="accepted for the reference's commands; the checkpoint's matrix is used")
    group.add_argument("--out_dir", default=None, help="where eval_results.{json,md} go (default: beside the last checkpoint)")
    shared = parser.add_argument_group(
        "export (a distilled set others load without this code: docs/usage.md#exported-sets)")
    shared.add_argument("--export", default=None, metavar="DIR",
                        help="after evaluating, write the set to DIR: PNG images with metadata.jsonl (Hugging Face "
                             "imagefolder), synthetic.safetensors (the exact tensors), a dataset card README.md with "
                             "the recall measured here, args.json and manifest.json")
    shared.add_argument("--overwrite", action="store_true", help="replace an existing --export folder")
    group.add_argument("--synthetic", default=None, metavar="DIR",
                       help="evaluate an exported folder (eval.py --export) instead of --run or --ckpt_path; its "
                            "args.json gives the data and model flags, as a run's does")
    student = parser.add_argument_group(
        "cross-architecture students", "train every row's students with another image encoder than the "
        "distiller's; the synthetic texts are the distiller's text features, so the text encoder stays")
    student.add_argument("--student_image_encoder", default=None,
                         help="image encoder of the students (built-in name or timm model), e.g. convnet")
    add_bool_flag(student, "--student_image_pretrained", default=False,
                  help="start the students' encoder from pretrained weights (--checkpoint_dir or the hub)")
    add_bool_flag(student, "--student_image_trainable", default=True,
                  help="train the students' image encoder (else a frozen encoder under a trained head)")
    student.add_argument("--student_image_size", type=positive(), default=None,
                         help="the students' input side: every image (synthetic, real, test) is resized to it "
                              "(default: --image_size)")
    student.add_argument("--student_text_encoder", default=None,
                         help="accepted only when equal to --text_encoder (synthetic texts are its features)")
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
    if args.overwrite and not args.export:
        parser.error("--overwrite replaces an --export folder: give --export DIR with it, or drop it")
    if args.synthetic is not None:
        return synthetic_args(parser, args, argv)
    if args.run is None:
        if not args.ckpt_path:
            parser.error("pass --run RUN_FOLDER (logged_files/DATASET/RUN) or --ckpt_path with a checkpoint per phase")
        check_eval_args(parser, args)
        return args
    run = RunFolder(Path(args.run))
    recorded = run.recorded_args()
    parser.set_defaults(**{k: recorded[k] for k in RUN_FLAGS if k in recorded})
    if recorded.get("buffer_path"):
        parser.set_defaults(expert_dir=str(trajectories.experts_source(Path(recorded["buffer_path"][0]))))
    args = parser.parse_args(argv)
    check_eval_args(parser, args)
    if not args.ckpt_path:
        args.ckpt_path = run_checkpoints(run, recorded)
    return args


def synthetic_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """Flags for ``--synthetic DIR``: what the export's args.json recorded fills every flag not given here."""
    for flag, given in (("--run", args.run), ("--ckpt_path", args.ckpt_path), ("--export", args.export)):
        if given:
            parser.error(f"--synthetic evaluates an exported folder on its own: drop {flag}")
    recorded_path = Path(args.synthetic) / export.ARGS
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise export.ExportError(f"--synthetic {args.synthetic}: {recorded_path} is missing or unreadable, so this is "
                                 f"not a complete export of eval.py --export: export the run again") from None
    parser.set_defaults(**{k: recorded[k] for k in RUN_FLAGS if k in recorded})
    if recorded.get("expert_dir"):
        parser.set_defaults(expert_dir=recorded["expert_dir"])
    args = parser.parse_args(argv)
    check_eval_args(parser, args)
    args.ckpt_path, args.recorded = [], recorded
    return args


def check_student_flags(args: argparse.Namespace) -> None:
    """Refuse a student text encoder other than the distiller's, and coresets without experts."""
    if args.student_text_encoder not in (None, args.text_encoder):
        raise UsageError(
            f"--student_text_encoder {args.student_text_encoder}: the distilled texts are features of the "
            f"distiller's text encoder ({args.text_encoder}), so students must read them with it; cross-architecture "
            f"evaluation changes the image encoder only (--student_image_encoder). Drop --student_text_encoder.")
    coresets = [b for b in args.baseline if b in CORESETS]
    if coresets and args.expert_dir is None:
        raise UsageError(f"--baseline {' '.join(coresets)} selects with an expert trained on the full data: pass "
                         f"--expert_dir (buffer.py's folder of experts for this dataset and model), or --run RUN, "
                         f"whose --buffer_path gives it")


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


def student_config(args: argparse.Namespace, text_dim: int) -> Tuple[DualEncoderConfig, str]:
    """The students' model and a label naming it ("" for the distiller's own model)."""
    config = model_config(args, text_dim)
    if args.student_image_encoder is None:
        if args.student_image_size is not None:
            raise UsageError("--student_image_size resizes the images for a student of another architecture: give "
                             "--student_image_encoder too, or drop --student_image_size")
        return config, ""
    size = args.student_image_size or args.image_size
    config = replace(config, image_encoder=args.student_image_encoder, image_trainable=args.student_image_trainable,
                     image_pretrained=args.student_image_pretrained, input_size=None if size == args.image_size else size)
    label = (f"{args.student_image_encoder}{', pretrained' if args.student_image_pretrained else ''}"
             f"{'' if args.student_image_trainable else ', frozen'}, {size} px")
    return config, label


def full_data_settings(args: argparse.Namespace) -> FullDataSettings:
    return FullDataSettings(epochs=tuple(args.full_epochs), lr_scales=tuple(args.full_lr_scale),
                            batches=tuple(args.full_batch), lr_img=args.lr_teacher_img, lr_txt=args.lr_teacher_txt,
                            num_eval=args.num_eval, loss_type=args.loss_type, seed=args.seed,
                            num_workers=args.num_workers)


def results_stem(args: argparse.Namespace) -> str:
    """``eval_results``, or ``eval_results_student_NAME`` for other students (so neither replaces the other)."""
    stem = "eval_results"
    if args.student_image_encoder is not None:
        stem += "_student_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in args.student_image_encoder)
    if args.student_schedule != "paper":
        stem += f"_schedule_{args.student_schedule}"
    return stem


def write_results(folder: Path, rows: Dict[str, dict], args: argparse.Namespace, student: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    payload = {"rows": rows, "protocol": args.eval_protocol, "phase_lr": args.phase_lr,
               "student_schedule": args.student_schedule, "num_eval": args.num_eval,
               "ckpt_path": args.ckpt_path, "epoch_eval_train": args.epoch_eval_train,
               "student": student or "the distiller's model", "expert_dir": args.expert_dir}
    stem = results_stem(args)
    students = f"students: {student}\n\n" if student else ""
    write_all([(folder / f"{stem}.json", text_writer(json.dumps(payload, indent=1))),
               (folder / f"{stem}.md", text_writer(
                   f"# Retrieval recall (%), mean ± std over {args.num_eval} students\n\n{students}"
                   f"protocol: {args.eval_protocol}, step sizes: {args.phase_lr}, schedule: {args.student_schedule}\n\n"
                   f"{table}\n"))])
    return folder / f"{stem}.md"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Evaluate; return ``{row name: {"mean": ..., "std": ...}}``."""
    setup_logging()
    args = parse_args(argv)
    if args.export:
        export.check_target(Path(args.export), args.overwrite)  # before any student trains
    synthetic = export.load_export(Path(args.synthetic)) if args.synthetic else None
    for path in args.ckpt_path:  # before loading any data
        if not Path(path).is_file():
            what = "is a folder, not a checkpoint file" if Path(path).is_dir() else "does not exist"
            raise checkpoint.CheckpointError(f"--ckpt_path {path} {what}: pass the distilled_PHASE_IT.pt files of "
                                             f"a run (logged_files/DATASET/RUN/), one per phase, in phase order")
    check_phase_order(args.ckpt_path)
    check_student_flags(args)
    # an export is shared as it is: its evaluations go beside it, never into it
    beside = Path(f"{args.synthetic.rstrip('/')}_evaluations") if args.synthetic else Path(args.ckpt_path[-1]).parent
    out_dir = writable_folder(Path(args.out_dir) if args.out_dir else beside, "--out_dir")
    device = resolve_device(args.device)
    enable_fast_math(device)
    data = load_data(args, device, augment=False, need_val=args.eval_protocol == "val" or "full" in args.baseline)
    if synthetic is not None:
        subsets, method = synthetic[0], LABELS.get(args.recorded.get("method", "ptmst"), "PTM-ST")
        for subset in subsets:
            checkpoint.check_fits(subset, Path(args.synthetic) / export.TENSORS, args.image_size, data.text_dim)
    else:
        subsets, method = load_checkpoints(args.ckpt_path, args, data.text_dim)
    config, student = student_config(args, data.text_dim)
    test, val = split_benchmarks(data, device, args.batch_size_test, args.num_workers)
    settings = eval_settings(args)
    sizes = [len(s) for s in subsets]
    selector = CoresetSelector(data, Path(args.expert_dir), model_config(args, data.text_dim), device) \
        if args.expert_dir else None
    check_baselines(args.baseline, sizes, len(data.train), selector)  # before the first student trains
    suffix = f", student {student}" if student else ""
    rows = {f"{method} ({sum(sizes)} pairs){suffix}": evaluate_subsets(subsets, config, settings, test, val, device,
                                                                      "distilled set")["selected"]}
    for baseline in [b for b in BASELINES if b in args.baseline and b != "full"]:
        reals = baseline_subsets(baseline, data, sizes, args.lr_teacher_img, args.lr_teacher_txt, args.seed,
                                 selector)
        rows[f"{baseline_label(baseline, sizes)} ({sum(sizes)} pairs){suffix}"] = evaluate_subsets(
            reals, config, settings, test, val, device, f"{baseline} subset")["selected"]
    if "full" in args.baseline:
        found = full_data_protocols(data, config, full_data_settings(args), test, val, device)
        rows[f"full training set ({len(data.train)} pairs){suffix}"] = found[
            "val" if args.eval_protocol == "val" else "paper"]["selected"]
    print(format_table(rows), flush=True)  # before writing: a failed write must not lose the table
    out = write_results(out_dir, rows, args, student)
    print(f"written to {out} and {out.with_suffix('.json')}")
    if args.export:
        folder = export_set(args, subsets, data, method, next(iter(rows.values())))
        print(f"exported to {folder} (load it with datasets.load_dataset('imagefolder', data_dir=...) or "
              f"eval.py --synthetic {folder})")
    return rows


def export_flags(args: argparse.Namespace) -> dict:
    """The flags the export records: the run's own (with --run), else this call's data and model flags."""
    folder = RunFolder(Path(args.run) if args.run else Path(args.ckpt_path[-1]).parent)
    try:
        flags = folder.recorded_args()
    except UsageError:  # checkpoints without their run folder's flags: this call's flags say what is known
        flags = {}
    flags.update({k: getattr(args, k) for k in RUN_FLAGS})  # what this evaluation used wins
    return {**flags, "expert_dir": args.expert_dir, "ckpt_path": list(args.ckpt_path)}


def export_set(args: argparse.Namespace, subsets: Sequence[FrozenSubset], data: DataContext, method: str,
               distilled: dict) -> Path:
    flags = export_flags(args)
    facts = export.CardFacts(method=method, dataset=args.dataset, image_encoder=args.image_encoder,
                             text_encoder=args.text_encoder, iterations=flags.get("Iteration") or (), flags=flags,
                             recall=distilled, protocol=args.eval_protocol, num_eval=args.num_eval)
    texts = torch.cat([s.texts for s in subsets])
    nearest = export.nearest_captions(texts, data.train_text, data.train.captions)
    return export.write_export(Path(args.export), subsets, facts, nearest, args.overwrite)
