"""Methods side by side under one protocol (``bash sh/ablation.sh``).

One set of experts (plus, for RepBlend's frozen image encoder, one set trained the same way with
the encoder frozen), then for every budget, method and seed one distillation at equal budget, every
final set evaluated by the same fresh students: test recall at the measurement chosen on the val split
(val protocol), and the best test measurement beside it (paper protocol), mean ± std over seeds.
Each method runs as its authors run it: MTT-VL and LoRS one phase without EMA; PTM-ST as in the authors'
recipes (one phase up to 100 pairs, else two phases on their own shortcut endpoints, each phase as many
iterations as a one-phase method gets, EMA 0.99; ``--ptmst_layout``, ``--ptmst_endpoints``,
``--ptmst_iterations`` and ``--ptmst_ema`` bring back other structures). Real training pairs of each budget
are the reference rows: a random subset, the same random pairs split into PTM-ST's phases and trained under
its student schedule, the herding, k-center and forgetting coresets (``--coresets``, selected with the
first expert), and the full training set (its students' epochs, learning rate and batch chosen on val).
``--students NAME ...`` adds a cross-architecture table: every method's sets and every reference row
trained by students of each listed image encoder.
``--dataset stamps`` (``openclipart``, or ``folder``) among the pass-through flags switches to the real-image
settings (``quickstart.STAMPS``, ``OPENCLIPART``: frozen ImageNet EfficientNet-Lite0, MiniLM, budgets 20 50 100).
``--iterations N`` sets a one-phase method's distillation iterations (and each PTM-ST phase's).
Writes a report folder: README.md (tables laid out like the papers': budgets as column groups of IR@1/5/10,
TR@1/5/10 and their mean; time per method; settings), results.json, matplotlib plots (PNG) of mean
recall against budget and across students, and each method's synthetic images.

Reuse is by fingerprint: each run's folder is ``{method}_b{budget}_s{seed}_{digest}``, the digest taken
over every flag that decides its result (the experts' folders are fingerprinted the same way, and
their digests enter the runs' through --buffer_path). A finished run is reused and a cut run resumes
only when its flags equal the requested ones; a call with a changed flag makes new runs beside the old
ones, and the report names the runs it was built from.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from networks.image_encoders import is_known_image_encoder, unknown_image_encoder_message

from ..runtime import checkpoint
from ..outputs import export
from ..experts import trajectories
from ..data import build_datasets
from ..runtime.errors import UsageError
from ..runtime.runs import RunFolder, find_matching_run
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import writable_folder
from ..students.evaluation import EvalSettings, both_protocols, train_student
from ..students.full_data import FullDataSettings, choose_recipe, pair_source, recipe_of, recipe_students
from ..runtime.progress import progress
from ..students.retrieval import split_benchmarks
from ..runtime.runlog import resolve_device, setup_logging

from . import buffer, distill
from .cli import run_script
from .context import folder_split, load_data, model_config
from ..students.coresets import CORESETS
from ..outputs.plots import grouped_bars, lines_with_error_bars
from .evaluate import CoresetSelector, random_generator, random_subsets
from .methods import METHODS
from .quickstart import (OPENCLIPART, PRESETS as QUICKSTART, STAMPS, Settings, common_flags, generate_data,
                         make_shortcuts, pretrain_encoder, top_up_experts)

log = logging.getLogger("ptmst.ablation")
ORDER = ("mttvl", "lors", "ptmst", "amd", "repblend")
FROZEN_RANDOM = "random, frozen encoder"
DISTILL_FLAGS = {option for action in distill.build_parser()._actions for option in action.option_strings}
BUFFER_FLAGS = {option for action in buffer.build_parser()._actions for option in action.option_strings}
# what the ablation itself decides for every run (budgets, seeds, phases, folders, expert counts)
OWNED = {"--seed", "--name", "--logged_dir", "--method", "--buffer_path", "--num_queries", "--Iteration",
         "--subset_num", "--min_start_epoch", "--max_start_epoch", "--resume", "--num_experts", "--train_epochs",
         "--help", "-h"}


def flag_groups(extra: Sequence[str]) -> List[List[str]]:
    """``--flag value ...`` groups of the pass-through arguments."""
    groups: List[List[str]] = []
    for token in extra:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def flags_for(known: set, groups: Sequence[List[str]]) -> List[str]:
    """The pass-through groups a script's parser knows, flattened."""
    return [token for group in groups if group[0].split("=", 1)[0] in known for token in group]


@dataclass(frozen=True)
class Plan:
    """What the ablation runs; the model, data and learning rates come from the quick start's settings."""
    seeds: Tuple[int, ...] = (0, 1, 2)
    budgets: Tuple[int, ...] = (20, 40)
    methods: Tuple[str, ...] = ORDER
    quickstart: Settings = field(default_factory=Settings)
    frozen_out_embedding: int = 256  # projection width of RepBlend's frozen-encoder model (2048 is NFNet-sized)
    coresets: Tuple[str, ...] = CORESETS
    students: Tuple[str, ...] = ()   # image encoders of the cross-architecture table
    lr_search: int = 0               # configurations of the learning rates tried per method and budget (0: none)
    # PTM-ST as its authors run it (published) or as this comparison first ran it (even, shared, split):
    ptmst_layout: str = "published"  # published: one phase up to 100 pairs, two above; even: every phase, equal shares
    ptmst_endpoints: str = "own"     # own: each phase its shortcut (settings.phases); shared: the first phase's
    ptmst_iterations: str = "per_phase"  # per_phase: each phase as many as a one-phase method; split: shared out
    ptmst_ema: float = 0.99          # the authors' EMA decay of PTM-ST's saved set
    full_data: bool = True           # the full training set as a row (students' recipe chosen on val)
    one_phase_ema: float = 0.0       # MTT-VL's and LoRS's authors keep no EMA: the last iterate is the set


# learned step sizes that train (the authors' --lr_lr 0.01 at a student rate of 0.1, scaled to these rates:
# the largest measured to stay finite; docs/findings.md)
SHAPES_LR_LR = 1e-3
# the authors' trajectories: 10-epoch experts, phase 0 matching the shortcut to epoch 6 from starts {0, 1},
# phase 1 the shortcut to epoch 8 from starts {1, 2}; the one-phase methods start anywhere in [0, 3)
TEN_EPOCH_SHAPES = replace(Settings(), train_epochs=10, phases=((0, 6, 0, 2), (0, 8, 1, 3)), lr_lr=SHAPES_LR_LR)
PRESETS: Dict[str, Plan] = {
    "default": Plan(quickstart=TEN_EPOCH_SHAPES),
    "quick": Plan(seeds=(0,), budgets=(40,), quickstart=TEN_EPOCH_SHAPES),
    # a handful of steps, for the test suite
    "smoke": Plan(seeds=(0,), budgets=(4,), quickstart=QUICKSTART["smoke"], frozen_out_embedding=32),
}
# --dataset stamps, openclipart (or folder) among the pass-through flags: real images through a pretrained, frozen
# encoder, each dataset's settings
REAL_PRESETS: Dict[str, Plan] = {
    "default": Plan(budgets=(20, 50, 100), quickstart=STAMPS, frozen_out_embedding=STAMPS.out_embedding),
    "quick": Plan(seeds=(0,), budgets=(50,), quickstart=STAMPS, frozen_out_embedding=STAMPS.out_embedding),
    "smoke": Plan(seeds=(0,), budgets=(4,), frozen_out_embedding=STAMPS.out_embedding, quickstart=replace(
        STAMPS, image_size=32, num_experts=1, train_epochs=3, phases=((0, 3, 0, 1), (0, 3, 0, 2)), iterations=(2, 2),
        eval_it=2, syn_steps=2, mini_batch_size=2, epoch_eval_train=2, num_eval=1, full_epochs=(1,),
        full_lr_scales=(1.0,), full_batches=(8,))),
}
REAL_SETTINGS = {"stamps": STAMPS, "openclipart": OPENCLIPART, "folder": STAMPS}
PTMST_CHOICES = ("ptmst_layout", "ptmst_endpoints", "ptmst_iterations", "ptmst_ema")
FULL_DATA = "full training set"
RANDOM_SPLIT = "random, split like PTM-ST"


def one_phase_window(s: Settings) -> Tuple[int, int]:
    """The start range of the one-phase methods: the union of PTM-ST's phases' ranges."""
    return min(p[2] for p in s.phases), max(p[3] for p in s.phases)


def even_split(total: int, parts: int) -> List[int]:
    """``total`` shared by ``parts`` as evenly as integers allow, the larger shares first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


PUBLISHED_ONE_PHASE = 100  # the authors' 100-pair recipes run one phase; their 200 and 500 run two


def published_sizes(budget: int) -> List[int]:
    """The authors' split of a budget: one phase up to 100 pairs; above, two phases, the first holding half
    (two fifths from 500 pairs on, as their 200 + 299 of Flickr500)."""
    if budget <= PUBLISHED_ONE_PHASE:
        return [budget]
    first = budget * 2 // 5 if budget >= 500 else budget // 2
    return [first, budget - first]


def one_phase_iterations(s: Settings) -> int:
    """What a one-phase method runs: the settings' iterations, all together."""
    return sum(s.iterations)


def phase_sizes(plan: Plan, method: str, budget: int) -> List[int]:
    if method != "ptmst":
        return [budget]
    if plan.ptmst_layout == "published":
        return published_sizes(budget)
    if plan.ptmst_layout == "one":
        return [budget]
    return even_split(budget, len(plan.quickstart.phases))


def phase_iterations(plan: Plan, method: str, budget: int) -> List[int]:
    s, phases = plan.quickstart, len(phase_sizes(plan, method, budget))
    if method != "ptmst":
        return [one_phase_iterations(s)]
    if plan.ptmst_iterations == "per_phase":
        return [one_phase_iterations(s)] * phases
    return even_split(one_phase_iterations(s), phases) if plan.ptmst_layout != "even" else list(s.iterations)


def ema_decay_of(plan: Plan, method: str) -> float:
    return plan.ptmst_ema if method == "ptmst" else plan.one_phase_ema


def ptmst_trajectories(plan: Plan, shortcuts: Sequence, phases: int) -> Tuple[List, List[int], List[int]]:
    """The first ``phases`` phases' shortcut folders and start ranges; with shared endpoints, every phase
    matches the first phase's shortcut."""
    s = plan.quickstart
    paths = [shortcuts[0] if plan.ptmst_endpoints == "shared" else shortcuts[k] for k in range(phases)]
    return paths, [s.phases[k][2] for k in range(phases)], [s.phases[k][3] for k in range(phases)]


def distill_flags(plan: Plan, work: Path, method: str, budget: int, seed: int, folders: Dict[str, object],
                  logged: Path, name: str) -> List[str]:
    s = plan.quickstart
    sizes, iterations = phase_sizes(plan, method, budget), phase_iterations(plan, method, budget)
    if method == "ptmst":
        paths, lows, highs = ptmst_trajectories(plan, folders["shortcuts"], len(sizes))
    else:
        low, high = one_phase_window(s)
        paths, lows, highs = [folders["frozen" if method == "repblend" else "normal"]], [low], [high]
    flags = phase_flags(s, work, method, seed, Phases(paths, lows, highs, sizes, iterations), logged, name)
    flags += ["--ema_decay", str(ema_decay_of(plan, method))]
    if method == "repblend":
        flags += ["--image_trainable", "false", "--out_embedding", str(plan.frozen_out_embedding)]
    return flags


@dataclass(frozen=True)
class Phases:
    """One value per phase: trajectory folder, start range [low, high), pairs, iterations."""
    paths: Sequence
    lows: Sequence[int]
    highs: Sequence[int]
    sizes: Sequence[int]
    iterations: Sequence[int]


def phase_flags(s: Settings, work: Path, method: str, seed: int, phases: Phases, logged: Path, name: str) -> List[str]:
    """The distiller's flags for ``phases`` under the settings' rates, model and evaluation."""
    return common_flags(s, work) + [
        "--method", method, "--seed", str(seed), "--buffer_path", *map(str, phases.paths),
        "--subset_num", str(len(phases.sizes)),
        "--min_start_epoch", *map(str, phases.lows), "--max_start_epoch", *map(str, phases.highs),
        "--num_queries", *map(str, phases.sizes), "--Iteration", *map(str, phases.iterations),
        "--eval_it", str(max(phases.iterations)), "--eval_init", "false", "--num_eval", "1",
        "--syn_steps", str(s.syn_steps), "--mini_batch_size", str(min(s.mini_batch_size, min(phases.sizes))),
        "--keep_graphs", str(s.syn_steps), "--lr_img", str(s.lr_img), "--lr_txt", str(s.lr_txt),
        "--lr_sim", str(s.lr_sim), "--lr_lr", str(s.lr_lr), "--ema_decay", str(s.ema_decay), "--sim_type", s.sim_type,
        "--epoch_eval_train", str(s.epoch_eval_train), "--loss_type", s.loss_type,
        *(["--clamp_lr", str(s.clamp_lr)] if s.clamp_lr is not None else []),
        "--logged_dir", str(logged), "--name", name]


def train_expert_set(plan: Plan, work: Path, model: argparse.Namespace, extra: Sequence[str], frozen: bool) -> Path:
    """The plan's experts (reused when made with the same flags): the quick start's recipe, or with the
    image encoder frozen for RepBlend, which matches projection heads. ``extra`` flags (buffer.py's) win."""
    frozen_flags = ["--image_trainable", "false", "--out_embedding", str(plan.frozen_out_embedding)] if frozen else []
    return top_up_experts(plan.quickstart, work, ["--loss_type", model.loss_type, *frozen_flags, *extra],
                          base="buffer_frozen_encoder" if frozen else "buffer")


@dataclass
class RunRecord:
    method: str
    budget: int
    seed: int
    folder: str
    seconds: float  # distillation wall time, all of its calls together


SECONDS_FILE = "ablation_seconds.json"  # in each run folder: the distillation's wall time, kept for reruns


def recorded_seconds(folder: Path) -> float:
    try:
        return float(json.loads((folder / SECONDS_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0


def run_for(plan: Plan, work: Path, method: str, budget: int, seed: int, folders: Dict[str, object], logged: Path,
            dataset: str, extra: Sequence[str]) -> Tuple[RunFolder, List[str]]:
    """The run folder whose recorded flags are exactly this run's (``{method}_b{budget}_s{seed}_{digest}``)
    and the distiller's flags for it (``extra`` after the plan's, so they win)."""
    return matching_run(logged / dataset, f"{method}_b{budget}_s{seed}", lambda name: distill_flags(
        plan, work, method, budget, seed, folders, logged, name) + list(extra))


def matching_run(parent: Path, base: str, flags_named) -> Tuple[RunFolder, List[str]]:
    """``parent/{base}_{digest}`` for the flags ``flags_named(name)`` gives, and those flags."""
    flags = vars(distill.parse_args(flags_named("unnamed")))
    run = for_the_experts_there(find_matching_run(parent, base, flags), flags["buffer_path"][:flags["subset_num"]])
    return run, flags_named(run.name)


def experts_changes(run: RunFolder, identity: Optional[List[dict]] = None) -> List[str]:
    """What changed in the experts since ``run`` recorded them ([] for a run without a record):
    against ``identity`` when given, else against its recorded folders as they are now."""
    recorded = run.recorded_experts() if run.holds_run() else None
    if recorded is None:
        return []
    if identity is None:
        identity = trajectories.experts_identity([Path(entry["folder"]) for entry in recorded])
    return trajectories.identity_changes(recorded, identity)


def for_the_experts_there(run: RunFolder, folders: Sequence[str],
                          identity: Optional[List[dict]] = None) -> RunFolder:
    """``run``, unless it was made from other experts than ``folders`` hold now (an expert rewritten,
    added or gone): then a folder of its own for these experts, named by their digest, so neither run is
    paired with experts it was not made from and neither is lost. ``identity``: the folders' experts,
    when computed already."""
    if not run.holds_run() or run.recorded_experts() is None:
        return run
    identity = identity or trajectories.experts_identity([Path(folder) for folder in folders])
    changed = experts_changes(run, identity)
    if not changed:
        return run
    digest = hashlib.sha256(json.dumps([entry["files"] for entry in identity], sort_keys=True).encode()).hexdigest()
    other = RunFolder(run.path.with_name(f"{run.name}_e{digest[:8]}"))
    log.info("%s was made from other experts (%s): this run goes to %s", run.name, " | ".join(changed), other.name)
    return for_the_experts_there(other, folders, identity)


def ensure_run(run: RunFolder, flags: List[str], label: str) -> float:
    """Distil ``run`` unless it finished earlier (a cut one resumes); its distillation seconds, all calls together."""
    started = time.perf_counter()
    refuse_other_experts(run)
    finished = run.finished()
    log.info("%s -> %s%s", label, run.name, " (finished earlier with the same flags: reused)" if finished else
             " (cut earlier with the same flags: resumed)" if run.holds_run() else "")
    if not finished:
        distill_run(run, flags + (["--resume"] if run.holds_run() else []))
        seconds = recorded_seconds(run.path) + time.perf_counter() - started  # a resumed run adds its parts
        atomic_write_text(run.path / SECONDS_FILE, json.dumps({"seconds": seconds}))
    return recorded_seconds(run.path)


def refuse_other_experts(run: RunFolder) -> None:
    """A run made from experts that have changed since (rewritten, gone or added) is neither reused nor
    resumed: its result belongs to the experts it read."""
    changed = experts_changes(run)
    if changed:
        raise UsageError(f"{run.path} was distilled from other experts than the ones there now "
                         f"({' | '.join(changed)}), so its result does not belong to them. Move that run folder "
                         f"away and run the same command again to distil it from the experts there now.")


SEARCHED = ("lr_img", "lr_txt", "lr_lr")  # the synthetic data's and the step sizes' learning rates
SEARCH_SEED = 1000  # the search distils and trains students at a seed of its own, never one the table reports


def search_configs(s: Settings, count: int) -> List[Dict[str, float]]:
    """The same ``count`` configurations for every method: the settings' own rates first, then rates
    drawn log-uniformly from a fixed generator (images and texts within 4x either way, the step sizes'
    rate within 10x; a rate of 0 stays 0)."""
    generator = torch.Generator().manual_seed(0)
    configs = [{name: getattr(s, name) for name in SEARCHED}]
    for _ in range(count - 1):
        u = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
        configs.append({"lr_img": float(f"{s.lr_img * 4 ** u[0]:.4g}"), "lr_txt": float(f"{s.lr_txt * 4 ** u[1]:.4g}"),
                        "lr_lr": float(f"{s.lr_lr * 10 ** u[2]:.4g}")})
    return configs[:count]


def rate_flags(config: Dict[str, float]) -> List[str]:
    return [token for name in SEARCHED for token in (f"--{name}", str(config[name]))]


def val_score(summary: Dict[str, dict]) -> float:
    """What the search ranks by: the students' mean r_mean on the val split at the point the val
    protocol selects (never test recall)."""
    return summary["val"]["selected_val_r_mean"]


def search_rates(plan: Plan, work: Path, folders: Dict[str, object], logged: Path, model: argparse.Namespace,
                 extra: Sequence[str]) -> Dict[Tuple[str, int], dict]:
    """For every method and budget: each configuration distilled at SEARCH_SEED and scored on the val split;
    {(method, budget): {"configs": [...], "scores": [...], "chosen": index}}."""
    configs = search_configs(plan.quickstart, plan.lr_search)
    device = resolve_device(model.device)
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, model.batch_size_test, model.num_workers)
    outcome = {}
    jobs = [(m, b) for b in plan.budgets for m in plan.methods]
    for number, (method, budget) in enumerate(jobs, 1):
        scores = []
        for k, config in enumerate(configs):
            run, flags = matching_run(logged / model.dataset, f"search{k}_{method}_b{budget}", lambda name: distill_flags(
                plan, work, method, budget, SEARCH_SEED, folders, logged, name) + rate_flags(config) + list(extra))
            ensure_run(run, flags, f"search {number}/{len(jobs)}, configuration {k + 1}/{len(configs)}: {method}, "
                                   f"{budget} pairs")
            recorded = argparse.Namespace(**RunFolder(run.path).recorded_args())
            settings = eval_settings_of(plan, recorded, SEARCH_SEED)
            summary = students(load_final(run.path), model_config(recorded, data.text_dim), settings, test, val, device)
            scores.append(val_score(summary))
        chosen = max(range(len(configs)), key=lambda k: (scores[k], -k))
        log.info("search: %s at %d pairs -> configuration %d %s (val r_mean %.2f)", method, budget, chosen,
                 configs[chosen], scores[chosen])
        outcome[(method, budget)] = {"configs": configs, "scores": scores, "chosen": chosen}
    return outcome


def distill_all(plan: Plan, work: Path, folders: Dict[str, object], logged: Path, dataset: str,
                extra: Sequence[str] = (), searched: Optional[Dict[Tuple[str, int], dict]] = None) -> List[RunRecord]:
    """Every budget x method x seed; ``extra`` flags go to every run (after the plan's, so they win),
    with the rates ``searched`` chose for its method and budget."""
    records = []
    jobs = [(b, m, seed) for b in plan.budgets for m in plan.methods for seed in plan.seeds]
    for number, (budget, method, seed) in enumerate(jobs, 1):  # a log line each: the runs draw their own bars
        chosen = searched.get((method, budget)) if searched else None
        rates = rate_flags(chosen["configs"][chosen["chosen"]]) if chosen else []
        run, flags = run_for(plan, work, method, budget, seed, folders, logged, dataset, rates + list(extra))
        seconds = ensure_run(run, flags, f"run {number}/{len(jobs)}: {method}, {budget} pairs, seed {seed}")
        records.append(RunRecord(method, budget, seed, str(run.path), seconds))
    return records


def distill_run(run: RunFolder, flags: List[str]) -> None:
    """One distillation; its user errors name the run and the ablation's own way on (the distiller's
    advice of --resume or --name does not apply: the ablation sets both)."""
    try:
        distill.main(flags)
    except (UsageError, FloatingPointError, MemoryError) as error:
        raise UsageError(
            f"ablation run {run.path} stopped: {error} [Within the ablation, --resume and --name are set for you: "
            f"run the same ablation command again to continue a cut run, or pass the changed distill_ptm-st.py "
            f"flags (for example a lower --lr_img) after the ablation's own; runs with other flags go to new "
            f"folders and the report is built from them.]") from None


def export_runs(plan: Plan, records: Sequence[RunRecord], results: Dict, model: argparse.Namespace,
                folder: Path) -> List[str]:
    """Every run's final set into ``folder/{method}_b{budget}_s{seed}`` (eval.py --export's layout), its card
    carrying the val-protocol recall the report shows; returns the folder names."""
    device = resolve_device(model.device)
    data = load_data(model, device, augment=False)
    names = []
    for record in records:
        recorded = RunFolder(Path(record.folder)).recorded_args()
        subsets = load_final(Path(record.folder))
        facts = export.CardFacts(method=record.method, dataset=model.dataset, image_encoder=recorded["image_encoder"],
                                 text_encoder=recorded["text_encoder"], iterations=recorded["Iteration"],
                                 flags={**recorded, "run_folder": record.folder},
                                 recall=results[(record.method, record.budget, record.seed)]["val"]["selected"],
                                 protocol="val", num_eval=plan.quickstart.num_eval)
        texts = torch.cat([s.texts for s in subsets])
        name = f"{record.method}_b{record.budget}_s{record.seed}"
        export.write_export(folder / name, subsets, facts,
                            export.nearest_captions(texts, data.train_text, data.train.captions))
        names.append(name)
    return names


def load_final(folder: Path) -> List:
    run = RunFolder(folder)
    return [checkpoint.load_distilled(path)[0] for path in run.final_checkpoints()]


def students(subsets, config, settings: EvalSettings, test, val, device) -> Dict[str, dict]:
    runs = [train_student(subsets, config, settings, test, val, k, device) for k in range(settings.num_eval)]
    return both_protocols(runs)


def model_namespace(plan: Plan, work: Path, extra: Sequence[str]) -> argparse.Namespace:
    """The data and model flags every run shares (a lors run's, with the pass-through flags)."""
    return distill.parse_args(distill_flags(plan, work, "lors", plan.budgets[0], 0, {"normal": "unused"},
                                            work / "unused", "unused") + list(extra))


def evaluate_all(plan: Plan, work: Path, records: Sequence[RunRecord], model: argparse.Namespace,
                 experts: Path) -> Tuple[Dict, Dict[str, float]]:
    """{(row, budget, seed): {"val": summary, "paper": summary}} for every method's runs and the
    reference rows (random subsets, coresets, full data), and the evaluation seconds per row; with
    ``plan.students``, also {(row, budget, seed, student): ...}, the same sets trained by each student.
    Each run's students are built from the flags it recorded."""
    device = resolve_device(model.device)
    data = load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, model.batch_size_test, model.num_workers)
    results, seconds = {}, {}

    def score(key, subsets, config, settings):
        started = time.perf_counter()
        results[key] = students(subsets, config, settings, test, val, device)
        seconds[key[0]] = seconds.get(key[0], 0.0) + time.perf_counter() - started

    student_configs = {name: cross_student(model_config(model, data.text_dim), name) for name in plan.students}
    for record in progress(records, desc="evaluations", unit="set"):
        recorded = argparse.Namespace(**RunFolder(Path(record.folder)).recorded_args())
        settings = eval_settings_of(plan, recorded, record.seed)
        subsets = load_final(Path(record.folder))
        score((record.method, record.budget, record.seed), subsets, model_config(recorded, data.text_dim), settings)
        for name, config in student_configs.items():
            score((record.method, record.budget, record.seed, name), subsets, config, settings)
    # the reference rows: real subsets, trained like every method's students (RepBlend's student
    # has a frozen image encoder, a different model where the others train theirs: it gets its own row)
    references = {"random": model_config(model, data.text_dim)}
    frozen = [r for r in records if r.method == "repblend"]
    if frozen and model.image_trainable:
        recorded = argparse.Namespace(**RunFolder(Path(frozen[0].folder)).recorded_args())
        references[FROZEN_RANDOM] = model_config(recorded, data.text_dim)
    selector = CoresetSelector(data, experts, references["random"], device)
    split = [RANDOM_SPLIT] if "ptmst" in plan.methods else []
    for row in [*references, *split, *available_coresets(plan, selector)]:
        config = references.get(row, references["random"])
        for budget in plan.budgets:
            for seed in plan.seeds:
                reals = reference_subsets(row, data, phase_sizes(plan, "ptmst", budget), seed, selector, model)
                settings = eval_settings_of(plan, model, seed)
                score((row, budget, seed), reals, config, settings)
                if row != FROZEN_RANDOM:
                    for name, student in student_configs.items():
                        score((row, budget, seed, name), reals, student, settings)
    if plan.full_data:
        full_rows(plan, model, data, references["random"], test, val, device, results, seconds)
    return results, seconds


def eval_settings_of(plan: Plan, flags: argparse.Namespace, seed: int) -> EvalSettings:
    return EvalSettings(flags.epoch_eval_train, flags.batch_train, plan.quickstart.num_eval, flags.loss_type, "val",
                        flags.phase_lr, seed, schedule=getattr(flags, "student_schedule", "paper"))


def cross_student(config, image_encoder: str):
    """A student of another image encoder: random weights, trained (it has no pretrained start of its own)."""
    return replace(config, image_encoder=image_encoder, image_trainable=True, image_pretrained=False)


def reference_subsets(row: str, data, ptmst_sizes: Sequence[int], seed: int, selector: CoresetSelector,
                      model: argparse.Namespace):
    """A reference row's real pairs at the budget PTM-ST splits into ``ptmst_sizes``: one subset of them all,
    or for the split row the same random pairs cut into PTM-ST's phases (trained one after the other)."""
    budget = [sum(ptmst_sizes)]
    if row in CORESETS:
        return selector.subsets(row, budget, model.lr_teacher_img, model.lr_teacher_txt, seed)
    return random_subsets(data, ptmst_sizes if row == RANDOM_SPLIT else budget, model.lr_teacher_img,
                          model.lr_teacher_txt, random_generator(seed))


def available_coresets(plan: Plan, selector: CoresetSelector) -> List[str]:
    """The plan's coresets; forgetting is left out, with a warning, when the experts hold no record of it."""
    kept = []
    for kind in plan.coresets:
        if kind == "forgetting":
            try:
                selector.forgetting_record()
            except UsageError as error:
                log.warning("no forgetting row: %s", error)
                continue
        kept.append(kind)
    return kept


def full_data_settings_of(plan: Plan, model: argparse.Namespace) -> FullDataSettings:
    s = plan.quickstart
    return FullDataSettings(epochs=s.full_epochs, lr_scales=s.full_lr_scales, batches=s.full_batches,
                            lr_img=model.lr_teacher_img, lr_txt=model.lr_teacher_txt, num_eval=s.num_eval,
                            loss_type=model.loss_type, num_workers=model.num_workers)


def full_rows(plan: Plan, model: argparse.Namespace, data, config, test, val, device, results: Dict,
              seconds: Dict[str, float]) -> None:
    """The whole training set, its students' epochs, learning rate and batch chosen once on the val split,
    then trained at every seed: one value per seed, shown under every budget."""
    started = time.perf_counter()
    settings = full_data_settings_of(plan, model)
    source = pair_source(data, settings, device)
    chosen, scores = choose_recipe(source, config, settings, test, val, device)
    recipe = recipe_of(settings, settings.grid()[chosen])
    for seed in plan.seeds:
        summary = recipe_students(source, config, recipe, replace(settings, seed=seed), test, val, device)
        for budget in plan.budgets:
            results[(FULL_DATA, budget, seed)] = {**summary, "search": scores, "chosen": chosen}
    seconds[FULL_DATA] = seconds.get(FULL_DATA, 0.0) + time.perf_counter() - started


def report_rows(plan: Plan, results: Dict) -> List[str]:
    """The table's rows in order, those of them that ``results`` holds (forgetting may be left out)."""
    s = plan.quickstart
    rows = ([m for m in ORDER if m in plan.methods] + ["random"]
            + ([FROZEN_RANDOM] if "repblend" in plan.methods and s.image_trainable else [])
            + ([RANDOM_SPLIT] if "ptmst" in plan.methods else []) + list(plan.coresets)
            + ([FULL_DATA] if plan.full_data else []))
    measured = {key[0] for key in results}
    return [row for row in rows if row in measured]


def cross_rows(plan: Plan, results: Dict) -> List[str]:
    return [row for row in report_rows(plan, results) if plan.students and (row, plan.budgets[0], plan.seeds[0],
                                                                            plan.students[0]) in results]


def over_seeds(results: Dict, method: str, budget: int, seeds: Sequence[int], protocol: str,
               metric: str = "r_mean", student: Optional[str] = None) -> Tuple[float, float]:
    """Mean and (population) std over seeds of each seed's mean ``metric`` over its students."""
    values = [results[(method, budget, seed) + ((student,) if student else ())][protocol]["selected"]["mean"][metric]
              for seed in seeds]
    return statistics.fmean(values), statistics.pstdev(values)


def table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str]) -> str:
    lines = ["| method | " + " | ".join(f"{b} pairs" for b in plan.budgets) + " |",
             "|---|" + "---|" * len(plan.budgets)]
    for method in rows:
        cells = ["{:.2f} ± {:.2f}".format(*over_seeds(results, method, b, plan.seeds, protocol)) for b in plan.budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the papers' column order: image retrieval (text -> image) then text retrieval (image -> text)
PAPER_COLUMNS = (("IR@1", "img_r1"), ("IR@5", "img_r5"), ("IR@10", "img_r10"), ("TR@1", "txt_r1"),
                 ("TR@5", "txt_r5"), ("TR@10", "txt_r10"), ("mean", "r_mean"))


def paper_table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str], student: Optional[str] = None) -> str:
    """Budgets as column groups, each IR@1/5/10, TR@1/5/10 and their mean (mean ± std over seeds)."""
    header = ["method"] + [f"{b} pairs: {name}" if k == 0 else name for b in plan.budgets
                           for k, (name, _) in enumerate(PAPER_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for row in rows:
        cells = ["{:.1f} ± {:.1f}".format(*over_seeds(results, row, b, plan.seeds, protocol, key, student))
                 for b in plan.budgets for _, key in PAPER_COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_table(plan: Plan, results: Dict, protocol: str, rows: Sequence[str]) -> str:
    """Mean recall of each row's sets trained by the distiller's model and by each listed student."""
    columns = [(None, "distiller's model")] + [(name, name) for name in plan.students]
    lines = ["| method | " + " | ".join(f"{b} pairs: {label}" if k == 0 else label for b in plan.budgets
                                      for k, (_, label) in enumerate(columns)) + " |",
             "|---|" + "---|" * (len(columns) * len(plan.budgets))]
    for row in rows:
        cells = ["{:.2f} ± {:.2f}".format(*over_seeds(results, row, b, plan.seeds, protocol, student=student))
                 for b in plan.budgets for student, _ in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_plots(plan: Plan, results: Dict, report: Path, rows: Sequence[str]) -> List[str]:
    """recall_vs_budget.png, and cross_architecture.png with students; returns the file names."""
    lines_with_error_bars(report / "recall_vs_budget.png", plan.budgets,
                          {row: [over_seeds(results, row, b, plan.seeds, "val") for b in plan.budgets] for row in rows},
                          "synthetic pairs", "mean recall (%), val protocol", "mean ± std over seeds")
    names = ["recall_vs_budget.png"]
    crossed = cross_rows(plan, results)
    if crossed:
        budget = plan.budgets[-1]
        series = {label: [over_seeds(results, row, budget, plan.seeds, "val", student=student) for row in crossed]
                  for student, label in [(None, "distiller's model")] + [(n, n) for n in plan.students]}
        grouped_bars(report / "cross_architecture.png", crossed, series, "mean recall (%), val protocol",
                     f"{budget} pairs: each set trained by each student")
        names.append("cross_architecture.png")
    return names


def copy_images(records: Sequence[RunRecord], report: Path, seed: int) -> List[str]:
    """The final synthetic images of every method and budget (first seed), one PNG per phase."""
    names = []
    for record in records:
        if record.seed != seed:
            continue
        folder = Path(record.folder)
        for k, iterations in enumerate(RunFolder(folder).recorded_args()["Iteration"]):
            name = f"{record.method}_b{record.budget}_phase{k}.png"
            shutil.copy(folder / f"synthetic_{k}_{iterations}.png", report / "images" / name)
            names.append(name)
    return names


def write_report(plan: Plan, report: Path, results: Dict, records: Sequence[RunRecord], eval_seconds: Dict[str, float],
                 command: str, images: Sequence[str], model: argparse.Namespace,
                 searched: Optional[Dict[Tuple[str, int], dict]] = None) -> Path:
    rows = report_rows(plan, results)
    distill_seconds = {m: sum(r.seconds for r in records if r.method == m) for m in plan.methods}
    s = plan.quickstart
    plots = draw_plots(plan, results, report, rows)
    payload = {"plan": asdict(plan), "command": command,
               "results": [{"method": key[0], "budget": key[1], "seed": key[2],
                            "student": key[3] if len(key) > 3 else None, **protocols}
                           for key, protocols in results.items()],
               "distill_seconds": distill_seconds, "eval_seconds": eval_seconds,
               "lr_search": [{"method": m, "budget": b, **found} for (m, b), found in (searched or {}).items()]}
    atomic_write_text(report / "results.json", json.dumps(payload, indent=1, default=str))
    lines = [
        "# Methods side by side on one codebase", "",
        f"Command: `{command}`", "",
        f"Mean recall (%) on the test split: for each seed, the mean over {s.num_eval} fresh students; "
        f"then mean ± std over seeds {list(plan.seeds)}. Every method distils the same total number of pairs "
        f"from the same experts, as its authors run it: {structure_sentence(plan)} "
        + ("with the learning rates each chose from the same search (below), " if plan.lr_search else
           "with the same learning rates, ")
        + "and is evaluated by the same code.", "",
        "## Val protocol (measurement chosen on the val split; test recall reported)", "",
        table(plan, results, "val", rows), "",
        "## Paper protocol (best of the test measurements, as the papers report)", "",
        table(plan, results, "paper", rows), "",
        "![mean recall against budget](recall_vs_budget.png)", "",
        *coreset_note(plan, rows),
        "## Every recall, laid out as the papers' tables", "",
        "IR: image retrieval (text to image); TR: text retrieval (image to text); mean: of the six.", "",
        "### Val protocol", "", paper_table(plan, results, "val", rows), "",
        "### Paper protocol", "", paper_table(plan, results, "paper", rows), "",
        *cross_section(plan, results), *[f"![{name}]({name})" for name in plots[1:]], "",
        "## Time per method (seconds, all budgets and seeds)", "",
        "| method | distillation | evaluation |", "|---|---|---|",
        *[f"| {m} | {distill_seconds.get(m, 0.0):.0f} | {eval_seconds.get(m, 0.0):.0f} |" for m in rows], "",
        "A run reused from an earlier call counts with the time it took then (0 if that was not recorded).", "",
        "## Learning-rate search", "", *search_section(plan, model, searched or {}),
        "## Runs this report is built from", "",
        "Each folder's name ends in the fingerprint of the flags that decide its result; its args.json and "
        "args_history.jsonl hold them.", "",
        *[f"- `{r.folder}`" for r in records], "",
        "## Exported sets", "",
        "Every run's final set, loadable without this code, is in `exports/{method}_b{budget}_s{seed}/` (PNG images "
        "with metadata.jsonl for `datasets.load_dataset(\"imagefolder\", data_dir=...)`, synthetic.safetensors, a "
        "dataset card with its val-protocol recall); `python eval.py --synthetic FOLDER` evaluates one again.", "",
        "## Synthetic images (first seed)", "",
        *[f"![{name}](images/{name}) `{name}`" for name in images], "",
        "## Settings", "", "```json", json.dumps(asdict(plan), indent=1), "```", ""]
    path = report / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def structure_sentence(plan: Plan) -> str:
    s, one = plan.quickstart, one_phase_iterations(plan.quickstart)
    layout = {"published": "one phase up to 100 pairs, two above (the authors' split)",
              "one": "one phase at every budget (the first phase's shortcut and starts)"}.get(
        plan.ptmst_layout, f"{len(s.phases)} phases of equal shares")
    endpoints = ("each phase on its own shortcut endpoint" if plan.ptmst_endpoints == "own"
                 else "every phase on the first phase's shortcut endpoint")
    iterations = (f"{one} iterations per phase" if plan.ptmst_iterations == "per_phase"
                  else f"{one} iterations shared out over the phases")
    return (f"the one-phase methods {one} iterations, EMA decay {plan.one_phase_ema:g}; PTM-ST {layout}, "
            f"{endpoints}, {iterations}, EMA decay {plan.ptmst_ema:g}.")


def search_section(plan: Plan, model: argparse.Namespace, searched: Dict[Tuple[str, int], dict]) -> List[str]:
    if not searched:
        return ["None for any method: every method uses the same rates "
                f"(--lr_img {model.lr_img} --lr_txt {model.lr_txt} --lr_sim {model.lr_sim} --lr_lr {model.lr_lr}; by "
                "default the quick start's, chosen for PTM-ST before this comparison existed). The search budget is "
                "therefore equal (zero) for every method (--lr_search N gives each the same N configurations).", ""]
    configs = next(iter(searched.values()))["configs"]
    lines = [f"Every method and budget tried the same {len(configs)} configurations (the first is the settings' own "
             f"rates), each distilled at seed {SEARCH_SEED} and trained by {plan.quickstart.num_eval} students at that "
             "seed; the cell is their mean r_mean on the val split at the point the val protocol selects. The "
             "configuration with the highest val score (bold) then ran every reported seed. Test recall never "
             "entered the choice.", "",
             "| configuration | " + " | ".join(SEARCHED) + " |", "|---|" + "---|" * len(SEARCHED),
             *[f"| {k} | " + " | ".join(f"{c[name]:g}" for name in SEARCHED) + " |" for k, c in enumerate(configs)], "",
             "| method | budget | " + " | ".join(f"config {k}" for k in range(len(configs))) + " |",
             "|---|---|" + "---|" * len(configs)]
    for (method, budget), found in searched.items():
        cells = [f"**{v:.2f}**" if k == found["chosen"] else f"{v:.2f}" for k, v in enumerate(found["scores"])]
        lines.append(f"| {method} | {budget} | " + " | ".join(cells) + " |")
    return lines + [""]


def coreset_note(plan: Plan, rows: Sequence[str]) -> List[str]:
    shown = [row for row in rows if row in CORESETS]
    missing = [kind for kind in plan.coresets if kind not in shown]
    lines = []
    if shown:
        lines += [f"Coreset rows ({', '.join(shown)}) select real training pairs with the first expert (its final "
                  "snapshot's joint embedding; its recorded forgetting events): see docs/methods.md.", ""]
    if missing:
        lines += [f"Left out: {', '.join(missing)} (the experts hold no forgetting record: they were trained before "
                  "buffer.py recorded one; see the log).", ""]
    return lines


def cross_section(plan: Plan, results: Dict) -> List[str]:
    rows = cross_rows(plan, results)
    if not rows:
        return []
    return ["## Cross-architecture: each set trained by other students", "",
            "The same distilled sets and reference subsets, trained by students of another image encoder (random "
            "weights, trained, at the distiller's image size). Mean recall (%), mean ± std "
            "over seeds.", "",
            "### Val protocol", "", cross_table(plan, results, "val", rows), "",
            "### Paper protocol", "", cross_table(plan, results, "paper", rows), "",
            *[line for student in plan.students for line in (
                f"### Student {student}: every recall (val protocol)", "",
                paper_table(plan, results, "val", rows, student), "")]]


def report_stamp() -> str:
    return f"{datetime.datetime.now():%Y%m%d_%H%M%S}"


def publish(partial: Path, reports: Path, stamp: str, prefix: str = "ablation") -> Path:
    """Rename the finished ``partial`` folder to ``reports/PREFIX_STAMP`` (``_2``, ``_3``, ... when
    another call of the same second took that name: a rename onto a folder with files fails)."""
    for number in range(1, 1000):
        final = reports / (f"{prefix}_{stamp}" if number == 1 else f"{prefix}_{stamp}_{number}")
        if final.exists():
            continue
        try:
            partial.rename(final)
            return final
        except OSError:
            continue  # taken between the check and the rename
    raise FileExistsError(f"{reports}: {prefix}_{stamp} and 998 numbered variants exist; move old reports away")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ablation", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="./ablation", help="data, experts, runs and reports go here "
                                                                "(shared with the quick start's layout)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="default: seeds 0 1 2, budgets 20 40 (stamps: 20 50 100); quick: seed 0, budget 40 "
                             "(stamps: 50); smoke: tests")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="override the preset's budgets (pairs)")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                        help="override the preset's methods")
    parser.add_argument("--coresets", nargs="+", default=None, choices=[*CORESETS, "none"],
                        help="coreset rows beside the random subset (default: all three; --coresets none: no row)")
    parser.add_argument("--lr_search", type=int, default=0, metavar="N",
                        help="give every method the same N configurations of --lr_img, --lr_txt and --lr_lr (the "
                             "first: the preset's), distilled at a seed of their own and chosen on the val split; "
                             "the chosen one runs the reported seeds (default 0: no search)")
    parser.add_argument("--students", nargs="+", default=None, metavar="IMAGE_ENCODER",
                        help="add a cross-architecture table: every set and reference row trained by students of "
                             "each of these image encoders (built-in names or timm models, e.g. convnet)")
    authors = parser.add_argument_group(
        "PTM-ST's structure", "the defaults are the authors' recipes; the other choices bring back how this "
        "comparison first ran PTM-ST (docs/findings.md: what each change moved)")
    authors.add_argument("--ptmst_layout", choices=["published", "even", "one"], default=None,
                         help="published (default): one phase up to 100 pairs, above that two, split like the "
                              "authors' (half, or 2/5 from 500 pairs: 200 + 300); even: every phase, equal shares; "
                              "one: a single phase at every budget (the shortcut without the phases)")
    authors.add_argument("--ptmst_endpoints", choices=["own", "shared"], default=None,
                         help="own (default): each phase matches its own shortcut endpoint (epochs 6 and 8 of "
                              "10-epoch experts); shared: every phase matches the first phase's")
    authors.add_argument("--ptmst_iterations", choices=["per_phase", "split"], default=None,
                         help="per_phase (default): each phase runs as many iterations as a one-phase method; "
                              "split: the one-phase methods' iterations shared out over the phases")
    authors.add_argument("--ptmst_ema", type=float, default=None, metavar="DECAY",
                         help="EMA decay of PTM-ST's saved set (default 0.99, the authors'; 0: none)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="distillation iterations of a one-phase method (PTM-ST: of each phase, as its authors "
                             "run it; default: the preset's, 400 on shapes, 1000 on real images)")
    args, extra = parser.parse_known_args(argv)
    for flag, values in (("--seeds", args.seeds), ("--budgets", args.budgets), ("--methods", args.methods),
                         ("--coresets", args.coresets), ("--students", args.students)):
        repeated = sorted({v for v in values or () if list(values).count(v) > 1}, key=str)
        if repeated:
            parser.error(f"{flag} names {', '.join(map(str, repeated))} more than once: each seed, budget or method "
                         f"counts once (a repeated seed would count the same runs twice in the mean ± std)")
    groups = flag_groups(extra)
    for group in groups:
        flag = group[0].split("=", 1)[0]
        if flag in OWNED:
            parser.error(f"{flag} is set by the ablation itself for every run (budgets, seeds, phases, folders and "
                         f"expert counts come from --preset, --seeds, --budgets and --methods); drop it")
        if flag not in DISTILL_FLAGS | BUFFER_FLAGS:
            parser.error(f"{flag} is neither an ablation flag nor a flag of distill_ptm-st.py or buffer.py (further "
                         f"flags are passed to the stages that take them; see their --help)")
    args.distill_flags = flags_for(DISTILL_FLAGS, groups)
    args.buffer_flags = flags_for(BUFFER_FLAGS, groups)
    datasets = [group[1] if len(group) > 1 else group[0].split("=", 1)[-1] for group in groups
                if group[0].split("=", 1)[0] == "--dataset"]
    args.builtin_data = not datasets
    # real photographs get the pretrained-encoder settings; any other --dataset runs the shapes settings on it
    real = bool(datasets) and datasets[-1] in REAL_SETTINGS
    if args.coresets and "none" in args.coresets and len(args.coresets) > 1:
        parser.error(f"--coresets {' '.join(args.coresets)}: 'none' means no coreset row; give it alone, or name the "
                     f"coresets to show")
    plan = (REAL_PRESETS if real else PRESETS)[args.preset]
    if real and args.preset != "smoke":
        plan = replace(plan, quickstart=REAL_SETTINGS[datasets[-1]])
    if args.iterations is not None:
        if args.iterations < 2:
            parser.error(f"--iterations {args.iterations}: give at least 2 (a one-phase method's total, split over "
                         f"the settings' phases when PTM-ST shares them)")
        plan = replace(plan, quickstart=replace(plan.quickstart, iterations=tuple(
            even_split(args.iterations, len(plan.quickstart.iterations)))))
    plan = replace(plan, seeds=tuple(args.seeds) if args.seeds else plan.seeds,
                   budgets=tuple(sorted(set(args.budgets))) if args.budgets else plan.budgets,
                   methods=tuple(m for m in ORDER if m in args.methods) if args.methods else plan.methods,
                   coresets=tuple(c for c in CORESETS if c in args.coresets) if args.coresets is not None
                   else plan.coresets, students=tuple(args.students or ()), lr_search=args.lr_search)
    plan = replace(plan, **{name: getattr(args, name) for name in PTMST_CHOICES if getattr(args, name) is not None})
    if not 0.0 <= plan.ptmst_ema < 1.0:
        parser.error(f"--ptmst_ema {plan.ptmst_ema}: an EMA decay lies in [0, 1) (0: the last iterate is the set)")
    if args.lr_search < 0:
        parser.error(f"--lr_search {args.lr_search}: give the number of configurations to try (0: no search)")
    searched = [g[0] for g in groups if g[0].split("=", 1)[0] in {f"--{name}" for name in SEARCHED}]
    if args.lr_search and searched:
        parser.error(f"{searched[0]} is what --lr_search searches: drop one of the two")
    unknown = [name for name in plan.students if not is_known_image_encoder(name)]
    if unknown:
        parser.error(unknown_image_encoder_message(unknown[0]).replace("--image_encoder", "--students"))
    smallest = min(plan.budgets)
    if smallest < 1:
        parser.error(f"--budgets {smallest}: a budget is a number of pairs, at least 1")
    if "ptmst" in plan.methods and plan.ptmst_layout == "even" and smallest < len(plan.quickstart.phases):
        parser.error(f"--budgets {smallest}: PTM-ST splits a budget over {len(plan.quickstart.phases)} phases, so "
                     f"every budget must be at least {len(plan.quickstart.phases)}")
    if plan.quickstart.builtin and max(plan.budgets) > plan.quickstart.num_train * 5:
        parser.error(f"--budgets {max(plan.budgets)} exceeds the {plan.quickstart.num_train * 5} training pairs")
    args.plan = plan
    return args


def check_budgets_fit(plan: Plan, model: argparse.Namespace) -> None:
    """Refuse, before any expert trains, a budget larger than the training split (known once the split is read)."""
    train, _, _ = build_datasets(model.dataset, model.image_root, model.ann_root, model.image_size, augment=False,
                                 split=folder_split(model))
    if max(plan.budgets) > len(train):
        raise UsageError(f"--budgets {max(plan.budgets)} exceeds the {len(train)} training pairs of {model.dataset}: "
                         f"give budgets of at most {len(train)} pairs")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    plan, s = args.plan, args.plan.quickstart
    work = writable_folder(Path(args.workdir), "--workdir")
    (work / "reports").mkdir(parents=True, exist_ok=True)
    # written in a folder of its own and renamed when complete: a report folder is never half written
    report = Path(tempfile.mkdtemp(prefix=".ablation_", suffix=".partial", dir=work / "reports"))
    (report / "images").mkdir()
    if args.builtin_data:  # otherwise --dataset, --image_root, --ann_root and the weights' flags say where
        generate_data(s, work)
        pretrain_encoder(s, work)
    model = model_namespace(plan, work, args.distill_flags)
    check_budgets_fit(plan, model)
    normal = train_expert_set(plan, work, model, args.buffer_flags, frozen=False)
    folders: Dict[str, object] = {"normal": normal}
    if "ptmst" in plan.methods:
        folders["shortcuts"] = make_shortcuts(s, normal)
    if "repblend" in plan.methods:  # a frozen encoder's experts already are what RepBlend matches
        folders["frozen"] = (train_expert_set(plan, work, model, args.buffer_flags, frozen=True)
                             if s.image_trainable else normal)
    logged = work / "ablation_runs"
    searched = search_rates(plan, work, folders, logged, model, args.distill_flags) if plan.lr_search else {}
    records = distill_all(plan, work, folders, logged, model.dataset, args.distill_flags, searched)
    results, eval_seconds = evaluate_all(plan, work, records, model, normal)
    command = "bash sh/ablation.sh " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    export_runs(plan, records, results, model, report / "exports")
    write_report(plan, report, results, records, eval_seconds, command.strip(), copy_images(records, report, plan.seeds[0]),
                 model, searched)
    path = publish(report, work / "reports", report_stamp()) / "README.md"
    rows = report_rows(plan, results)
    print(f"\nreport: {path}\n\nval protocol, mean recall (%), mean ± std over seeds {list(plan.seeds)}\n"
          f"{table(plan, results, 'val', rows)}")
    return path


if __name__ == "__main__":
    run_script(main, outputs={"--workdir": "./ablation"},
               interrupted="interrupted: finished runs are kept in --workdir/ablation_runs and a cut run resumes: run "
                           "the same command again to go on.")
