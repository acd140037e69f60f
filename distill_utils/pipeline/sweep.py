"""A sweep: methods x budgets x seeds distilled from one set of experts, and their sets' students.

The ablation and the studies plan their runs here. Each run's flags come from the plan (the authors'
structure for PTM-ST unless the plan says otherwise), and each run folder is found by the fingerprint of
those flags and the experts it reads: a finished run is reused, a cut one resumes, a changed flag or a
rewritten expert makes a new folder beside the old one.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data import build_datasets
from ..experts import trajectories
from ..outputs import export
from ..runtime import checkpoint
from ..runtime import claims
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import UsageError
from ..runtime.runlog import resolve_device, setup_logging
from ..runtime.runs import RunFolder, find_matching_run, result_flags
from ..students.baselines import CoresetSelector, random_generator, random_subsets
from ..students.coresets import CORESETS
from ..students.evaluation import EvalSettings, both_protocols, train_student
from ..students.full_data import FullDataSettings, choose_recipe, pair_source, recipe_of, recipe_students
from ..students.retrieval import split_benchmarks
from .settings import Settings
from .stages import (Workdir, common_flags, encoder_pretrained, experts_trained, make_shortcuts, pretrain_encoder,
                     top_up_experts)

log = logging.getLogger("ptmst.sweep")


ORDER = ("mttvl", "lors", "ptmst", "amd", "repblend")


FROZEN_RANDOM = "random, frozen encoder"


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


def values_of(groups: Sequence[List[str]], flag: str) -> List[str]:
    """The values the pass-through groups give ``flag`` (``--flag value`` or ``--flag=value``), in order."""
    return [group[1] if len(group) > 1 else group[0].split("=", 1)[-1] for group in groups
            if group[0].split("=", 1)[0] == flag]


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


def distill_flags(plan: Plan, work: Workdir, method: str, budget: int, seed: int, folders: Dict[str, object],
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


def phase_flags(s: Settings, work: Workdir, method: str, seed: int, phases: Phases, logged: Path,
                name: str) -> List[str]:
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


def train_expert_set(plan: Plan, work: Workdir, model: argparse.Namespace, extra: Sequence[str], frozen: bool) -> Path:
    """The plan's experts (reused when made with the same flags): the quick start's recipe, or with the
    image encoder frozen for RepBlend, which matches projection heads. ``extra`` flags (buffer.py's) win."""
    return top_up_experts(plan.quickstart, work, *expert_set_flags(plan, model, extra, frozen))


def expert_set_flags(plan: Plan, model: argparse.Namespace, extra: Sequence[str], frozen: bool) -> Tuple[List, str]:
    frozen_flags = ["--image_trainable", "false", "--out_embedding", str(plan.frozen_out_embedding)] if frozen else []
    return ["--loss_type", model.loss_type, *frozen_flags, *extra], "buffer_frozen_encoder" if frozen else "buffer"


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


def run_for(plan: Plan, work: Workdir, method: str, budget: int, seed: int, folders: Dict[str, object], logged: Path,
            dataset: str, extra: Sequence[str]) -> Tuple[RunFolder, List[str]]:
    """The run folder whose recorded flags are exactly this run's (``{method}_b{budget}_s{seed}_{digest}``)
    and the distiller's flags for it (``extra`` after the plan's, so they win)."""
    return matching_run(work, logged / dataset, f"{method}_b{budget}_s{seed}", lambda name: distill_flags(
        plan, work, method, budget, seed, folders, logged, name) + list(extra))


def matching_run(work: Workdir, parent: Path, base: str, flags_named) -> Tuple[RunFolder, List[str]]:
    """``parent/{base}_{digest}`` for the flags ``flags_named(name)`` gives, and those flags."""
    flags = vars(work.scripts.distill.parse_args(flags_named("unnamed")))
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


def ensure_run(work: Workdir, run: RunFolder, flags: List[str], label: str) -> float:
    """Distil ``run`` unless it finished earlier (a cut one resumes); its distillation seconds, all calls together.
    Two callers of the same run (two sweeps at once, a job and its requeued twin) take turns: the second
    waits for the first and then finds the run finished."""
    if run.finished():  # nothing will be written: no one to wait for
        return ensure_run_alone(work, run, flags, label)
    run.path.mkdir(parents=True, exist_ok=True)
    with claims.folder_lock(run.path, owner=claims.this_process(), name=SWEEP_LOCK):
        return ensure_run_alone(work, run, flags, label)


SWEEP_LOCK = ".sweep.lock"  # beside the distiller's own .lock, which it takes without waiting


def ensure_run_alone(work: Workdir, run: RunFolder, flags: List[str], label: str) -> float:
    started = time.perf_counter()
    refuse_other_experts(run)
    finished = run.finished()
    log.info("%s -> %s%s", label, run.name, " (finished earlier with the same flags: reused)" if finished else
             " (cut earlier with the same flags: resumed)" if run.holds_run() else "")
    if not finished:
        distill_run(work, run, flags + (["--resume"] if run.holds_run() else []))
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


def search_rates(plan: Plan, work: Workdir, folders: Dict[str, object], logged: Path, model: argparse.Namespace,
                 extra: Sequence[str]) -> Dict[Tuple[str, int], dict]:
    """For every method and budget: each configuration distilled at SEARCH_SEED and scored on the val split;
    {(method, budget): {"configs": [...], "scores": [...], "chosen": index}}."""
    configs = search_configs(plan.quickstart, plan.lr_search)
    pairs = [(m, b) for b in plan.budgets for m in plan.methods]
    planned, jobs = [], []
    for number, (method, budget) in enumerate(pairs, 1):
        for k, config in enumerate(configs):
            run, flags = matching_run(work, logged / model.dataset, f"search{k}_{method}_b{budget}", lambda name: (
                distill_flags(plan, work, method, budget, SEARCH_SEED, folders, logged, name) + rate_flags(config)
                + list(extra)))
            planned.append(RunRecord(method, budget, SEARCH_SEED, str(run.path), 0.0))
            jobs.append(Distillation(work.local(), str(run.path), flags, f"search {number}/{len(pairs)}, "
                                     f"configuration {k + 1}/{len(configs)}: {method}, {budget} pairs"))
    work.launcher.run("search", jobs)
    scored = work.launcher.run("search_students", [SetStudents(work.local(), replace(plan, students=()), model,
                                                               record) for record in planned], bar=True)
    outcome = {}
    for number, (method, budget) in enumerate(pairs):
        scores = [val_score(found[(method, budget, SEARCH_SEED)])
                  for found, _ in scored[number * len(configs):(number + 1) * len(configs)]]
        chosen = max(range(len(configs)), key=lambda k: (scores[k], -k))
        log.info("search: %s at %d pairs -> configuration %d %s (val r_mean %.2f)", method, budget, chosen,
                 configs[chosen], scores[chosen])
        outcome[(method, budget)] = {"configs": configs, "scores": scores, "chosen": chosen}
    return outcome


def distill_all(plan: Plan, work: Workdir, folders: Dict[str, object], logged: Path, dataset: str,
                extra: Sequence[str] = (), searched: Optional[Dict[Tuple[str, int], dict]] = None) -> List[RunRecord]:
    """Every budget x method x seed; ``extra`` flags go to every run (after the plan's, so they win),
    with the rates ``searched`` chose for its method and budget."""
    planned = []
    jobs = [(b, m, seed) for b in plan.budgets for m in plan.methods for seed in plan.seeds]
    for number, (budget, method, seed) in enumerate(jobs, 1):  # a log line each: the runs draw their own bars
        chosen = searched.get((method, budget)) if searched else None
        rates = rate_flags(chosen["configs"][chosen["chosen"]]) if chosen else []
        run, flags = run_for(plan, work, method, budget, seed, folders, logged, dataset, rates + list(extra))
        planned.append((RunRecord(method, budget, seed, str(run.path), 0.0), Distillation(
            work.local(), str(run.path), flags, f"run {number}/{len(jobs)}: {method}, {budget} pairs, seed {seed}")))
    seconds = work.launcher.run("distill", [job for _, job in planned])
    return [replace(record, seconds=took) for (record, _), took in zip(planned, seconds)]


@dataclass
class Distillation:
    """One distillation run as a job: reused when finished, resumed when cut. Pre-empted or out of time on
    Slurm, submitit calls :meth:`checkpoint`, which requeues the same job: it resumes from the run's own
    last checkpoint (``latest.pt``), never from anything the job holds."""
    work: Workdir
    run: str
    flags: List[str]
    label: str

    def done(self) -> bool:
        return RunFolder(Path(self.run)).finished()

    def __call__(self) -> float:
        setup_logging()
        return ensure_run(self.work, RunFolder(Path(self.run)), self.flags, self.label)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def distill_run(work: Workdir, run: RunFolder, flags: List[str]) -> None:
    """One distillation; its user errors name the run and the ablation's own way on (the distiller's
    advice of --resume or --name does not apply: the ablation sets both)."""
    try:
        work.scripts.distill.main(flags)
    except (UsageError, FloatingPointError, MemoryError) as error:
        raise UsageError(
            f"ablation run {run.path} stopped: {error} [Within the ablation, --resume and --name are set for you: "
            f"run the same ablation command again to continue a cut run, or pass the changed distill_ptm-st.py "
            f"flags (for example a lower --lr_img) after the ablation's own; runs with other flags go to new "
            f"folders and the report is built from them.]") from None


def export_runs(plan: Plan, work: Workdir, records: Sequence[RunRecord], results: Dict, model: argparse.Namespace,
                folder: Path) -> List[str]:
    """Every run's final set into ``folder/{method}_b{budget}_s{seed}`` (eval.py --export's layout), its card
    carrying the val-protocol recall the report shows; returns the folder names."""
    device = resolve_device(model.device)
    data = work.scripts.load_data(model, device, augment=False)
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


def model_namespace(plan: Plan, work: Workdir, extra: Sequence[str]) -> argparse.Namespace:
    """The data and model flags every run shares (a lors run's, with the pass-through flags)."""
    return work.scripts.distill.parse_args(distill_flags(plan, work, "lors", plan.budgets[0], 0, {"normal": "unused"},
                                            work / "unused", "unused") + list(extra))


def evaluate_all(plan: Plan, work: Workdir, records: Sequence[RunRecord], model: argparse.Namespace,
                 experts: Path) -> Tuple[Dict, Dict[str, float]]:
    """{(row, budget, seed): {"val": summary, "paper": summary}} for every method's runs and the
    reference rows (random subsets, coresets, full data), and the evaluation seconds per row; with
    ``plan.students``, also {(row, budget, seed, student): ...}, the same sets trained by each student.
    Each run's students are built from the flags it recorded and kept in its folder; each set is one job,
    each reference row one more (kept in the workdir)."""
    frozen = next((r.folder for r in records if r.method == "repblend"), None)
    jobs = [SetStudents(work.local(), plan, model, record) for record in records]
    references = [ReferenceRow(work.local(), plan, model, experts, row, frozen)
                  for row in reference_row_names(plan, model, frozen)]
    outcomes = work.launcher.run("students", [*jobs, *references], bar=True)
    _benchmarks.cache_clear()  # the data of this call: not kept after it
    results, seconds = {}, {}
    for record, (found, took) in zip(records, outcomes[:len(jobs)]):
        results.update(found)
        seconds[record.method] = seconds.get(record.method, 0.0) + took
    for found, took in outcomes[len(jobs):]:
        results.update(found)
        seconds.update(took)
    return results, seconds


def reference_row_names(plan: Plan, model: argparse.Namespace, frozen: Optional[str]) -> List[str]:
    """The reference rows of ``plan`` in table order (the random row beside RepBlend's frozen encoder only
    where the others train theirs; forgetting may still drop out, in its job, without a record)."""
    return ["random", *([FROZEN_RANDOM] if frozen and model.image_trainable else []),
            *([RANDOM_SPLIT] if "ptmst" in plan.methods else []), *plan.coresets,
            *([FULL_DATA] if plan.full_data else [])]


@functools.lru_cache(maxsize=1)
def _benchmarks(work: Workdir, flags: str):
    model = argparse.Namespace(**json.loads(flags))
    device = resolve_device(model.device)
    data = work.scripts.load_data(model, device, augment=False, need_val=True)
    test, val = split_benchmarks(data, device, model.batch_size_test, model.num_workers)
    return data, test, val, device


def benchmarks(work: Workdir, model: argparse.Namespace):
    """The data, the test and val benchmarks and the device of ``model``'s flags: loaded once per process,
    however many set evaluations it runs."""
    return _benchmarks(work, json.dumps(vars(model), sort_keys=True, default=str))


STUDENTS_FILE = "students_{digest}.json"  # in a run folder: its students' summaries under one protocol


def read_kept(path: Path, unpack):
    """``unpack`` of the kept students' JSON at ``path``; None where there is none, or (warned) where it
    cannot be read, so that they are trained again."""
    try:
        return unpack(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s cannot be read: training its students again", path)
        return None


@dataclass
class SetStudents:
    """A run's final set trained by ``num_eval`` fresh students (the distiller's model, then each of
    ``plan.students``), as one job; the summaries are kept in the run folder, so a rerun trains none again.
    Returns ({key: summary}, seconds)."""
    work: Workdir
    plan: Plan
    model: argparse.Namespace
    record: RunRecord

    @property
    def label(self) -> str:
        return f"students of {Path(self.record.folder).name}"

    def recorded(self) -> argparse.Namespace:
        return argparse.Namespace(**RunFolder(Path(self.record.folder)).recorded_args())

    def cache(self) -> Path:
        run = RunFolder(Path(self.record.folder))
        recorded = self.recorded()
        key = {"settings": asdict(eval_settings_of(self.plan, recorded, self.record.seed)),
               "students": list(self.plan.students), "flags": result_flags(vars(recorded)),
               "sets": files_by_content(run.final_checkpoints())}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return run.path / STUDENTS_FILE.format(digest=digest)

    def done(self) -> bool:
        return self.kept() is not None

    def key(self, student: Optional[str]) -> tuple:
        r = self.record
        return (r.method, r.budget, r.seed) + ((student,) if student else ())

    def kept(self) -> Optional[Tuple[Dict, float]]:
        return read_kept(self.cache(), lambda kept: (
            {self.key(student): summary for student, summary in kept["summaries"]}, float(kept["seconds"])))

    def __call__(self) -> Tuple[Dict, float]:
        kept = self.kept()
        if kept is not None:
            return kept
        setup_logging()
        started = time.perf_counter()
        data, test, val, device = benchmarks(self.work, self.model)
        recorded = self.recorded()
        settings = eval_settings_of(self.plan, recorded, self.record.seed)
        subsets = load_final(Path(self.record.folder))
        shared = self.work.scripts.model_config(self.model, data.text_dim)
        configs = [(None, self.work.scripts.model_config(recorded, data.text_dim))] + [
            (name, cross_student(shared, name)) for name in self.plan.students]
        found = [(name, students(subsets, config, settings, test, val, device)) for name, config in configs]
        seconds = time.perf_counter() - started
        atomic_write_text(self.cache(), json.dumps({"summaries": found, "seconds": seconds}, default=str))
        return {self.key(name): summary for name, summary in found}, seconds


REFERENCE_FOLDER = "reference_rows"  # in the workdir: each reference row's students, kept by fingerprint


@dataclass
class ReferenceRow:
    """One reference row (``row``) at every budget and seed, as one job: a random subset (or, beside RepBlend,
    with its frozen encoder: the run ``frozen`` recorded it), the random pairs split like PTM-ST, a coreset
    (selected with ``experts``) or the full training set. The results are kept in ``{workdir}/reference_rows/``
    under a digest of everything they depend on, so a second call trains none again. Returns (results,
    seconds per row)."""
    work: Workdir
    plan: Plan
    model: argparse.Namespace
    experts: Path
    row: str
    frozen: Optional[str] = None

    @property
    def label(self) -> str:
        return f"reference row ({self.row})"

    def cache(self) -> Path:
        plan = self.plan
        key = {"row": self.row, "budgets": list(plan.budgets), "seeds": list(plan.seeds),
               "ptmst_sizes": [phase_sizes(plan, "ptmst", b) for b in plan.budgets], "coresets": list(plan.coresets),
               "students": list(plan.students), "full_data": plan.full_data, "settings": asdict(plan.quickstart),
               "flags": result_flags(vars(self.model)), "experts": expert_files(Path(self.experts)),
               "frozen": Path(self.frozen).name if self.frozen else None}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        name = self.row.replace(" ", "-").replace(",", "")
        return Path(self.work) / REFERENCE_FOLDER / f"{name}_{digest}.json"

    def done(self) -> bool:
        return self.kept() is not None

    def kept(self) -> Optional[Tuple[Dict, Dict[str, float]]]:
        return read_kept(self.cache(), lambda kept: (
            {tuple(key): summary for key, summary in kept["results"]}, dict(kept["seconds"])))

    def __call__(self) -> Tuple[Dict, Dict[str, float]]:
        kept = self.kept()
        if kept is not None:
            return kept
        setup_logging()
        results, seconds = self.train()
        path = self.cache()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"results": [[list(key), summary] for key, summary in results.items()],
                                            "seconds": seconds}, default=str))
        return results, seconds

    def train(self) -> Tuple[Dict, Dict[str, float]]:
        plan, model, row = self.plan, self.model, self.row
        data, test, val, device = benchmarks(self.work, model)
        results, seconds = {}, {}
        config = self.work.scripts.model_config(model, data.text_dim)
        if row == FULL_DATA:
            full_rows(plan, model, data, config, test, val, device, results, seconds)
            return results, seconds
        selector = CoresetSelector(data, self.experts, config, device)
        if row in CORESETS and not available_coresets(replace(plan, coresets=(row,)), selector):
            return results, seconds
        if row == FROZEN_RANDOM:
            # RepBlend's student has a frozen image encoder, a different model where the others train theirs
            recorded = argparse.Namespace(**RunFolder(Path(self.frozen)).recorded_args())
            config = self.work.scripts.model_config(recorded, data.text_dim)
        students_of = {} if row == FROZEN_RANDOM else {
            name: cross_student(self.work.scripts.model_config(model, data.text_dim), name) for name in plan.students}

        def score(key, subsets, student, settings):
            started = time.perf_counter()
            results[key] = students(subsets, student, settings, test, val, device)
            seconds[row] = seconds.get(row, 0.0) + time.perf_counter() - started

        for budget in plan.budgets:
            for seed in plan.seeds:
                reals = reference_subsets(row, data, phase_sizes(plan, "ptmst", budget), seed, selector, model)
                settings = eval_settings_of(plan, model, seed)
                score((row, budget, seed), reals, config, settings)
                for name, student in students_of.items():
                    score((row, budget, seed, name), reals, student, settings)
        return results, seconds


def expert_files(folder: Path) -> List[Tuple[str, str]]:
    """The expert folder's files by name and content fingerprint: a retrained (same sizes, other weights) or
    topped-up set is a different set."""
    return files_by_content(folder.iterdir() if folder.is_dir() else ())


def files_by_content(paths) -> List[Tuple[str, str]]:
    """``(name, content fingerprint)`` of each plain, non-hidden file among ``paths``, in name order; a file
    gone while listing is left out."""
    found = []
    for path in paths:
        path = Path(path)
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            found.append((path.name, trajectories.file_digest(path)))
        except OSError:
            continue
    return sorted(found)


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


def expert_folders(plan: Plan, work: Workdir, model: argparse.Namespace, buffer_flags: Sequence[str],
                   builtin: bool) -> Dict[str, object]:
    """What the plan's methods match, trained (or reused): the pretrained start on built-in data, the experts,
    PTM-ST's shortcuts, RepBlend's frozen-encoder experts. {"normal": folder, "shortcuts": [...], "frozen": folder}."""
    s = plan.quickstart
    if builtin:
        pretrain_encoder(s, work)
    normal = train_expert_set(plan, work, model, buffer_flags, frozen=False)
    folders: Dict[str, object] = {"normal": normal}
    if "ptmst" in plan.methods:
        folders["shortcuts"] = make_shortcuts(s, work, normal)
    if "repblend" in plan.methods:  # a frozen encoder's experts already are what RepBlend matches
        folders["frozen"] = train_expert_set(plan, work, model, buffer_flags, frozen=True) if s.image_trainable \
            else normal
    return folders


@dataclass
class Experts:
    """:func:`expert_folders` as one job; done (and then run here, quickly) when every expert is trained."""
    plan: Plan
    work: Workdir
    model: argparse.Namespace
    buffer_flags: List[str]
    builtin: bool
    label: str = "experts"

    def done(self) -> bool:
        plan, s = self.plan, self.plan.quickstart
        sets = [False] + ([True] if "repblend" in plan.methods and s.image_trainable else [])
        return ((not self.builtin or encoder_pretrained(s, self.work)) and all(
            experts_trained(s, self.work, *expert_set_flags(plan, self.model, self.buffer_flags, frozen))
            for frozen in sets))

    def __call__(self) -> Dict[str, object]:
        setup_logging()
        return expert_folders(self.plan, self.work, self.model, self.buffer_flags, self.builtin)


def check_budgets_fit(plan: Plan, work: Workdir, model: argparse.Namespace) -> None:
    """Refuse, before any expert trains, a budget larger than the training split (known once the split is read)."""
    train, _, _ = build_datasets(model.dataset, model.image_root, model.ann_root, model.image_size, augment=False,
                                 split=work.scripts.folder_split(model))
    if max(plan.budgets) > len(train):
        raise UsageError(f"--budgets {max(plan.budgets)} exceeds the {len(train)} training pairs of {model.dataset}: "
                         f"give budgets of at most {len(train)} pairs")
