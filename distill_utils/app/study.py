"""Studies of where phased teachers and shortcut trajectories help (``bash sh/study.sh STUDY``).

``teacher_stage`` (the paper's Figure 2a): one-phase distillation (LoRS: normal trajectories, learned
    similarity) with its start window slid along the experts' epochs; the students' recall of each
    distilled set, and the experts' own recall at the window's first epoch, against the window's position.
``gradients`` (Figures 2b and 4): one fixed synthetic set (the seed's initial real pairs) and one fixed
    list of mini-batches; the matcher's exact gradient with respect to the images and to the text
    features from every start epoch, on the normal and on the shortcut trajectories of the same
    experts: its norm against the start epoch, and the cosine similarity between start epochs.
``components`` (the paper's ablation table): BASE (one phase, normal trajectories, no EMA), +EMA, +PTM
    (phases on normal trajectories), +ST (one phase on a shortcut trajectory), PTM+ST; the phased rows
    both at equal total iterations and at the paper's per-phase iterations (each phase as many as a
    one-phase run has in total).
``schedule``: the student schedules of ``--student_schedule`` and ``--phase_lr own`` on PTM-ST's sets and
    on random real subsets split the same way, a one-phase LoRS set beside them.
``scale``: the methods at budgets up to 500 pairs on 10,000 shapes training pairs: MTT-VL, LoRS and PTM-ST
    as the authors run it (one phase up to 100 pairs, above two, 100 + 100 at 200 and 200 + 300 at 500,
    each phase on its own shortcut endpoint with as many iterations as a one-phase method), PTM-ST cut to
    one phase at every budget (the shortcut without the phases), random real pairs, the same pairs split
    like PTM-ST, and the full training set; both protocols, recall against budget, the time of every run.
    ``--preset quick``: seed 0, budgets 50 and 500 (the default's runs of those, reused by a later call).

Every study trains its own experts long enough to have stages (10 epochs, as the paper's) and reuses,
by fingerprint, every run and expert a previous call made with the same flags. Flags of
distill_ptm-st.py and buffer.py given after the study's own are passed to the runs (``--dataset stamps``
switches to the real-photograph settings). The report folder (``WORKDIR/reports/study_NAME_STAMP``) holds
README.md (tables, plots, the exact command, the runs), results.json and the PNG plots.
``--launcher slurm`` (or ``submitit_local``) runs the experts and every distillation as submitit jobs; the
scale study's runs and its sets' students go as job arrays (docs/usage.md, "Sweeps on a Slurm cluster").
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..experts import trajectories
from ..runtime.atomic import atomic_write_text
from ..runtime.errors import writable_folder
from ..students.evaluation import EvalSettings
from ..distillation.losses import MultilabelContrastiveLoss
from ..distillation.matching import MiniBatchSampler, TrajectoryMatcher
from ..distillation.phases import PhaseSpec, initial_set
from ..outputs.plots import grouped_bars, heatmaps, lines_with_error_bars
from ..runtime.progress import progress
from ..students.retrieval import split_benchmarks
from ..runtime.runlog import resolve_device, seeded, setup_logging
from ..runtime.runs import RunFolder

from ..pipeline.reports import paper_table, publish, report_stamp, table
from ..pipeline.settings import QUICKSTART, STAMPS, TEN_EPOCH_SHAPES, Settings
from ..pipeline.stages import Workdir, generate_data
from ..pipeline.sweep import (FULL_DATA, OWNED, RANDOM_SPLIT, Distillation, Experts, Phases, Plan, RunRecord,
                              SetStudents, check_budgets_fit, distill_all, evaluate_all, even_split, flag_groups,
                              flags_for, values_of, load_final, matching_run, phase_flags, phase_sizes, students)
from ..students.baselines import random_subsets

from .cli import add_launcher_flags, distill_settings, launcher_of, non_negative, positive, run_script, scripts

SCRIPTS = scripts()
DISTILL_FLAGS = SCRIPTS.distill.options()
BUFFER_FLAGS = SCRIPTS.buffer.options()
log = logging.getLogger("ptmst.study")
REAL_DATASETS = ("stamps", "openclipart", "folder")
STUDIES = ("teacher_stage", "gradients", "components", "schedule", "scale")
# ten-epoch experts, the paper's; its Flickr recipe's phases: shortcuts over snapshots 0..5 and 0..7,
# starts from [0, 2) and [1, 3)
TEN_EPOCHS = dict(train_epochs=10, phases=((0, 6, 0, 2), (0, 8, 1, 3)))
SMOKE = replace(QUICKSTART["smoke"], train_epochs=4, phases=((0, 3, 0, 1), (0, 4, 1, 2)))
# the scale study's shapes: 10,000 training pairs, so 500 pairs are 5% of them; the experts' batch grows with
# the data so that an epoch stays 10 steps (its displacement reachable in 8 student steps, as the quick start's)
SCALE = replace(TEN_EPOCH_SHAPES, num_train=2000, num_val=200, num_test=400, expert_batch=1024)
SCALE_METHODS = ("mttvl", "lors", "ptmst")
ONE_PHASE_PTMST = "ptmst, one phase"  # PTM-ST's first phase alone at the whole budget: the shortcut, no phases


@dataclass(frozen=True)
class StudyPlan:
    settings: Settings
    seeds: Tuple[int, ...] = (0, 1, 2)
    budgets: Tuple[int, ...] = (40,)
    iterations: int = 200            # a one-phase run's; PTM-ST's phases share them (or each gets them)
    windows: Tuple[int, ...] = ()    # teacher_stage: first start epoch of each window (default: every one)
    width: int = 2                   # teacher_stage: start epochs per window
    experts: int = 5                 # gradients: experts whose gradients are averaged
    schedules: Tuple[str, ...] = ("paper", "own", "restart", "union")


def default_plan(study: str, settings: Settings) -> StudyPlan:
    s = replace(settings, **TEN_EPOCHS) if settings is not SMOKE else settings
    # 200 one-phase iterations keep the components' 21 runs within 30 minutes on 2 CPU cores; the real
    # photographs' settings have their own (fewer, larger) iterations
    iterations = 200 if s.builtin else sum(s.iterations)
    if study == "teacher_stage":
        return StudyPlan(s, seeds=(0, 1), budgets=(20,), iterations=iterations)
    if study == "gradients":
        return StudyPlan(s, seeds=(0,), budgets=(20,), iterations=iterations)
    if study == "components":
        return StudyPlan(s, seeds=(0, 1, 2), budgets=(40,), iterations=iterations)
    if study == "scale":
        return StudyPlan(SCALE if settings is not SMOKE else s, seeds=(0, 1), budgets=(50, 100, 200, 500),
                         iterations=400)
    return StudyPlan(s, seeds=(0, 1, 2), budgets=(20, 40), iterations=iterations)  # 40 pairs: the components' runs


def smoke_plan(study: str) -> StudyPlan:
    # the scale study's second budget is over 100 pairs, so its smoke run has PTM-ST's two phases
    budgets = (4, 110) if study == "scale" else (4,)
    return replace(default_plan(study, SMOKE), seeds=(0,), budgets=budgets, iterations=2, experts=1)


def quick_plan(study: str) -> StudyPlan:
    return replace(default_plan(study, QUICKSTART["default"]), seeds=(0,), budgets=(50, 500))


# ----------------------------------------------------------------------------------------------- set-up


@dataclass
class Workspace:
    """What every study shares: the folders, the parsed model flags, the experts, data and benchmarks."""
    plan: StudyPlan
    work: Workdir
    extra: List[str]
    model: argparse.Namespace
    normal: Path
    runs: Path
    data: object = None
    test: object = None
    val: object = None
    device: torch.device = None
    records: List[dict] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.plan.settings

    def load(self) -> None:
        """The data and the test and val benchmarks (once)."""
        if self.data is None:
            self.device = resolve_device(self.model.device)
            self.data = self.work.scripts.load_data(self.model, self.device, augment=False, need_val=True)
            self.test, self.val = split_benchmarks(self.data, self.device, self.model.batch_size_test,
                                                   self.model.num_workers)

    def shortcut(self, start: int, end: int) -> Path:
        return self.work.scripts.convexify.main(["--normal_dir", str(self.normal), "--start", str(start),
                                                 "--end", str(end)])

    def shortcuts(self) -> List[Path]:
        return [self.shortcut(start, end) for start, end, _, _ in self.settings.phases]

    def distil(self, base: str, method: str, seed: int, phases: Phases, overrides: Sequence[str] = ()) -> RunFolder:
        """The run of these phases (reused when finished earlier with the same flags), recorded for the report."""
        def flags(name: str) -> List[str]:
            return (phase_flags(self.settings, self.work, method, seed, phases, self.runs, name) + list(overrides)
                    + self.extra)
        run, argv = matching_run(self.work, self.runs / self.model.dataset, base, flags)
        seconds = self.work.launcher.run("distill", [Distillation(self.work.local(), str(run.path), argv, base)])[0]
        self.records.append({"run": str(run.path), "seconds": seconds})
        return run

    def one_phase(self, base: str, seed: int, budget: int, folder: Path, overrides: Sequence[str] = ()) -> RunFolder:
        """A LoRS run of the whole budget on ``folder``, starts from the union of the phases' windows."""
        s = self.settings
        return self.distil(base, "lors", seed, Phases([folder], [min(p[2] for p in s.phases)],
                                                      [max(p[3] for p in s.phases)], [budget],
                                                      [self.plan.iterations]), overrides)

    def phased(self, base: str, seed: int, budget: int, folders: Sequence[Path], iterations: List[int]) -> RunFolder:
        """A PTM-ST run: the settings' phases on ``folders`` (one per phase), the budget split over them."""
        s = self.settings
        return self.distil(base, "ptmst", seed, Phases(list(folders), [p[2] for p in s.phases],
                                                       [p[3] for p in s.phases], even_split(budget, len(s.phases)),
                                                       iterations))

    def score(self, subsets, seed: int, schedule: str = "paper", phase_lr: str = "current") -> Dict[str, dict]:
        """Both protocols' summaries of ``num_eval`` fresh students trained on ``subsets``."""
        self.load()
        m = self.model
        settings = EvalSettings(m.epoch_eval_train, m.batch_train, self.settings.num_eval, m.loss_type, "val",
                                phase_lr, seed, schedule=schedule)
        config = self.work.scripts.model_config(m, self.data.text_dim)
        return students(subsets, config, settings, self.test, self.val, self.device)

    def random(self, sizes: Sequence[int], seed: int):
        self.load()
        return random_subsets(self.data, sizes, self.model.lr_teacher_img, self.model.lr_teacher_txt,
                              torch.Generator().manual_seed(seed + 12345))


def prepare(plan: StudyPlan, work: Workdir, distill_extra: List[str], buffer_extra: List[str],
            builtin: bool) -> Workspace:
    if builtin:
        generate_data(plan.settings, work)
    smallest = min(even_split(min(plan.budgets), len(plan.settings.phases)))  # so every run's mini-batch fits
    model = work.scripts.distill.parse_args(phase_flags(plan.settings, work, "lors", 0, Phases(
        ["unused"], [0], [1], [smallest], [1]), work / "unused", "unused") + distill_extra)
    if not builtin:  # the largest budget is the study's last run: known to fit before the first expert trains
        check_budgets_fit(plan, work, model)
    # the pretrained start and the experts: one job that every run waits for
    normal = work.launcher.run("experts", [Experts(Plan(quickstart=plan.settings, methods=("lors",)), work.local(),
                                                   model, buffer_extra, builtin)])[0]["normal"]
    return Workspace(plan, work, distill_extra, model, normal, work / "study_runs")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def recall(summary: Dict[str, dict], protocol: str = "val", metric: str = "r_mean") -> float:
    return summary[protocol]["selected"]["mean"][metric]


def cell(point: Tuple[float, float]) -> str:
    return "{:.2f} ± {:.2f}".format(*point)


# ------------------------------------------------------------------------------------------ teacher stage


def window_starts(plan: StudyPlan) -> List[int]:
    last = plan.settings.train_epochs - plan.width  # the window's last start plus --expert_epochs 1 must exist
    return list(plan.windows) if plan.windows else list(range(0, last + 1))


@torch.no_grad()
def expert_recall(ws: Workspace, epochs: Sequence[int]) -> Dict[int, Tuple[float, float]]:
    """Test recall (mean ± std over the experts) of the experts' snapshot at each epoch."""
    ws.load()
    config = ws.work.scripts.model_config(ws.model, ws.data.text_dim)
    model = config.build(seed=0).to(ws.device).eval()
    buffer = trajectories.TrajectoryBuffer(ws.normal)
    out = {}
    for epoch in epochs:
        values = []
        for expert in buffer.experts():
            trajectories.load_snapshot(model, expert, epoch)
            values.append(ws.test.evaluate(model)["r_mean"])
        out[epoch] = mean_std(values)
    return out


def teacher_stage(ws: Workspace, report: Path) -> Tuple[List[str], dict]:
    plan = ws.plan
    budget, starts = plan.budgets[0], window_starts(plan)
    results = {}
    for start in progress(starts, desc="windows", unit="window"):
        for seed in plan.seeds:
            run = ws.distil(f"lors_w{start}-{start + plan.width}_b{budget}_s{seed}", "lors", seed, Phases(
                [ws.normal], [start], [start + plan.width], [budget], [plan.iterations]))
            results[(start, seed)] = ws.score(load_final(run.path), seed)
    randoms = [ws.score(ws.random([budget], seed), seed) for seed in plan.seeds]
    experts = expert_recall(ws, starts)
    distilled = {w: mean_std([recall(results[(w, seed)]) for seed in plan.seeds]) for w in starts}
    paper = {w: mean_std([recall(results[(w, seed)], "paper") for seed in plan.seeds]) for w in starts}
    random_point = mean_std([recall(r) for r in randoms])
    lines_with_error_bars(report / "teacher_stage.png", starts, {
        "distilled set (students, val protocol)": [distilled[w] for w in starts],
        "expert at the window's first epoch (test)": [experts[w] for w in starts],
        f"random subset of {budget} pairs": [random_point] * len(starts)},
        "first start epoch of the window", "mean recall (%)",
        f"one phase, {budget} pairs, windows of {plan.width} start epochs")
    rows = ["| window (start epochs) | distilled, val protocol | distilled, paper protocol | expert at first epoch |",
            "|---|---|---|---|"]
    rows += [f"| [{w}, {w + plan.width}) | {cell(distilled[w])} | {cell(paper[w])} | {cell(experts[w])} |"
             for w in starts]
    best = max(starts, key=lambda w: distilled[w][0])
    text = [
        "## Distilled-set recall against the teacher's stage", "",
        f"One-phase LoRS runs of {budget} pairs, {plan.iterations} iterations each, starts drawn from the window, "
        f"target = start + 1 epoch; each set trained by {ws.settings.num_eval} fresh students per seed, mean ± std "
        f"over seeds {list(plan.seeds)}. The expert column is the test recall of the experts' snapshot at the "
        f"window's first epoch (mean ± std over the experts).", "", *rows, "",
        f"Random real subset of {budget} pairs: {cell(random_point)} (val protocol).", "",
        f"Best window: [{best}, {best + plan.width}) at {distilled[best][0]:.2f}; "
        f"first window {distilled[starts[0]][0]:.2f}, last {distilled[starts[-1]][0]:.2f}.", "",
        "![teacher stage](teacher_stage.png)", ""]
    payload = {"windows": starts, "width": plan.width, "distilled_val": distilled, "distilled_paper": paper,
               "expert_test": experts, "random_val": random_point,
               "per_seed": [{"window": w, "seed": s, **results[(w, s)]} for (w, s) in results]}
    return text, payload


# ----------------------------------------------------------------------------------------------- gradients


def matching_gradient(matcher: TrajectoryMatcher, synthetic, expert, start: int, expert_epochs: int, batches,
                      device: torch.device, seed: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The matcher's exact gradient with respect to the images and the text features (flattened) from
    snapshot ``start`` to ``start + expert_epochs``, dropout drawn from ``seed`` (the same for every start)."""
    begin = {side: expert.flat(side, start).to(device) for side in trajectories.SIDES}
    target = {side: expert.flat(side, start + expert_epochs).to(device) for side in trajectories.SIDES}
    synthetic.zero_grad(set_to_none=True)
    with seeded(seed, device):
        result = matcher.match(synthetic, begin, target, batches)
    return synthetic.images.grad.detach().flatten().clone(), synthetic.texts.grad.detach().flatten().clone(), result.loss


def cosine_matrix(vectors: Sequence[torch.Tensor]) -> List[List[float]]:
    stacked = torch.stack([v.double() for v in vectors])
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (unit @ unit.T).tolist()


def mean_off_diagonal(matrix: Sequence[Sequence[float]]) -> float:
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return statistics.fmean(values) if values else float("nan")


def gradient_directions(ws: Workspace, seed: int, budget: int, folders: Dict[str, Path], count: int):
    """{kind: {"image"|"text": {"norm": [(mean, std) per start], "cosine": mean matrix}, "loss": [...]}}."""
    ws.load()
    m = ws.model
    epochs = m.expert_epochs
    config = ws.work.scripts.model_config(m, ws.data.text_dim)
    student = config.build(seed=seed).to(ws.device)
    spec = PhaseSpec(0, str(folders["normal"]), 0, 1, budget, 0, m.sim_rank[0])
    generator = torch.Generator().manual_seed(seed * 1000)
    synthetic = initial_set(spec, distill_settings(m), ws.data, generator).to(ws.device)
    sampler = MiniBatchSampler(budget, min(m.mini_batch_size, budget), generator)
    batches = [sampler.next().to(ws.device) for _ in range(m.syn_steps)]
    matcher = TrajectoryMatcher(student, MultilabelContrastiveLoss(m.loss_type), m.syn_steps, m.syn_steps,
                                blend=m.blend, normalization=m.match_norm)
    out = {}
    for kind, folder in folders.items():
        experts = trajectories.TrajectoryBuffer(folder).experts()[:count]
        last = min(e.num_snapshots for e in experts) - 1 - epochs
        starts = list(range(0, last + 1))
        per_expert = {"image": [], "text": []}
        losses, steps = [], {"image": [], "text": []}
        for expert in progress(experts, desc=f"{kind} gradients", unit="expert"):
            grads = [matching_gradient(matcher, synthetic, expert, t, epochs, batches, ws.device, seed) for t in starts]
            per_expert["image"].append([g[0] for g in grads])
            per_expert["text"].append([g[1] for g in grads])
            losses.append([g[2] for g in grads])
            for side in steps:  # how far each target lies from its start: what the student has to cover
                steps[side].append([(expert.flat(side, t + epochs) - expert.flat(side, t)).norm().item()
                                    for t in starts])
        out[kind] = {"starts": starts, "loss": [mean_std([row[t] for row in losses]) for t in range(len(starts))]}
        for side, lists in per_expert.items():
            norms = [mean_std([vectors[t].norm().item() for vectors in lists]) for t in range(len(starts))]
            matrices = [cosine_matrix(vectors) for vectors in lists]
            mean_matrix = [[statistics.fmean(mat[i][j] for mat in matrices) for j in range(len(starts))]
                           for i in range(len(starts))]
            out[kind][side] = {"norm": norms, "cosine": mean_matrix, "mean_off_diagonal": mean_off_diagonal(mean_matrix),
                               "target_distance": [mean_std([row[t] for row in steps[side]])
                                                   for t in range(len(starts))]}
    return out


def gradients(ws: Workspace, report: Path) -> Tuple[List[str], dict]:
    plan, s = ws.plan, ws.settings
    seed, budget = plan.seeds[0], plan.budgets[0]
    folders = {"normal": ws.normal, "shortcut": ws.shortcut(0, s.train_epochs + 1)}
    found = gradient_directions(ws, seed, budget, folders, plan.experts)
    starts = found["normal"]["starts"]
    for side in ("image", "text"):
        lines_with_error_bars(report / f"gradient_norm_{side}.png", starts,
                              {kind: found[kind][side]["norm"] for kind in folders}, "start epoch",
                              f"gradient norm, {side} side",
                              f"{budget} initial pairs, mean ± std over {plan.experts} experts")
    heatmaps(report / "gradient_cosine.png",
             {f"{kind}, {side}": found[kind][side]["cosine"] for side in ("image", "text") for kind in folders},
             starts, "start epoch", title="cosine similarity of the matching gradients between start epochs")
    text = ["## Matching gradients along the trajectories", "",
            f"One fixed synthetic set (seed {seed}'s {budget} initial real pairs, step sizes "
            f"{ws.model.lr_teacher_img}/{ws.model.lr_teacher_txt}), one fixed list of {ws.model.syn_steps} mini-batches "
            f"and one dropout draw; from each start epoch t the matcher's exact gradient (target t + "
            f"{ws.model.expert_epochs}) on the normal trajectories and on the shortcut over all "
            f"{s.train_epochs + 1} snapshots, for each of {plan.experts} experts. Norms: mean ± std over the "
            "experts; cosines: the mean over experts of each expert's matrix.", ""]
    for side in ("image", "text"):
        text += [f"### Norm of the gradient w.r.t. the {side} side", "",
                 "| start epoch | " + " | ".join(folders) + " |", "|---|" + "---|" * len(folders)]
        text += [f"| {t} | " + " | ".join("{:.3g} ± {:.2g}".format(*found[k][side]["norm"][i]) for k in folders) + " |"
                 for i, t in enumerate(starts)]
        text += ["", f"![norm, {side}](gradient_norm_{side}.png)", "",
                 f"Distance from start to target on the {side} side (mean over experts): " + "; ".join(
                     f"{k}: " + ", ".join(f"{v[0]:.3g}" for v in found[k][side]["target_distance"]) for k in folders),
                 ""]
    text += ["### Mean cosine similarity between different start epochs", "",
             "| side | " + " | ".join(folders) + " |", "|---|" + "---|" * len(folders),
             *[f"| {side} | " + " | ".join(f"{found[k][side]['mean_off_diagonal']:.3f}" for k in folders) + " |"
               for side in ("image", "text")], "", "![cosine matrices](gradient_cosine.png)", "",
             "Matching loss from each start epoch (mean over experts): " + "; ".join(
                 f"{k}: " + ", ".join(f"{v[0]:.3f}" for v in found[k]["loss"]) for k in folders), ""]
    return text, {"seed": seed, "budget": budget, "folders": {k: str(v) for k, v in folders.items()}, **found}


# ---------------------------------------------------------------------------------------------- components

def component_runs(ws: Workspace, budget: int, seed: int, shortcuts: List[Path]) -> Dict[str, RunFolder]:
    """Each component's run; the phased rows at equal total and at per-phase iterations."""
    total, phases = ws.plan.iterations, len(ws.settings.phases)
    runs = {"BASE": ws.one_phase(f"base_b{budget}_s{seed}", seed, budget, ws.normal, ["--ema_decay", "0"]),
            "+EMA": ws.one_phase(f"lors_b{budget}_s{seed}", seed, budget, ws.normal),
            "+ST": ws.one_phase(f"st_b{budget}_s{seed}", seed, budget, shortcuts[0])}
    for regime, each in (("equal", even_split(total, phases)), ("per-phase", [total] * phases)):
        runs[f"+PTM ({regime})"] = ws.phased(f"ptm_{regime}_b{budget}_s{seed}", seed, budget, [ws.normal] * phases,
                                             each)
        runs[f"PTM+ST ({regime})"] = ws.phased(f"ptmst_{regime}_b{budget}_s{seed}", seed, budget, shortcuts, each)
    return runs


def components(ws: Workspace, report: Path) -> Tuple[List[str], dict]:
    plan = ws.plan
    shortcuts = ws.shortcuts()
    results: Dict[Tuple[str, int, int], Dict] = {}
    step_sizes: Dict[Tuple[str, int], List[List[Tuple[float, float]]]] = {}
    for budget in plan.budgets:
        for seed in plan.seeds:
            for row, run in component_runs(ws, budget, seed, shortcuts).items():
                subsets = load_final(run.path)
                step_sizes.setdefault((row, budget), []).append([(x.lr_img, x.lr_txt) for x in subsets])
                results[(row, budget, seed)] = ws.score(subsets, seed)
            results[("random", budget, seed)] = ws.score(ws.random(even_split(budget, len(ws.settings.phases)), seed),
                                                         seed)
    rows = ["BASE", "+EMA", "+PTM (equal)", "+ST", "PTM+ST (equal)", "+PTM (per-phase)", "PTM+ST (per-phase)",
            "random"]
    table = {(row, b, p): mean_std([recall(results[(row, b, seed)], p) for seed in plan.seeds])
             for row in rows for b in plan.budgets for p in ("val", "paper")}
    iterations = {"BASE": plan.iterations, "+EMA": plan.iterations, "+ST": plan.iterations,
                  "+PTM (equal)": plan.iterations, "PTM+ST (equal)": plan.iterations,
                  "+PTM (per-phase)": plan.iterations * len(ws.settings.phases),
                  "PTM+ST (per-phase)": plan.iterations * len(ws.settings.phases), "random": 0}
    lines = ["| row | total iterations | " + " | ".join(f"{b} pairs, val | {b} pairs, paper" for b in plan.budgets) + " |",
             "|---|---|" + "---|---|" * len(plan.budgets)]
    lines += [f"| {row} | {iterations[row]} | " + " | ".join(f"{cell(table[(row, b, 'val')])} | {cell(table[(row, b, 'paper')])}"
                                                          for b in plan.budgets) + " |" for row in rows]
    budget = plan.budgets[-1]
    grouped_bars(report / "components.png", rows, {"val protocol": [table[(r, budget, "val")] for r in rows],
                                                   "paper protocol": [table[(r, budget, "paper")] for r in rows]},
                 "mean recall (%)", f"{budget} pairs, mean ± std over seeds {list(plan.seeds)}")
    text = ["## Components at equal and at per-phase iterations", "",
            f"BASE: one phase of {plan.iterations} iterations on normal trajectories, no EMA (--ema_decay 0); +EMA: the "
            f"same with --ema_decay {ws.settings.ema_decay}; +ST: one phase on the shortcut over snapshots "
            f"{ws.settings.phases[0][0]}..{ws.settings.phases[0][1] - 1}; +PTM: {len(ws.settings.phases)} phases on the "
            f"normal trajectories, start ranges {[(p[2], p[3]) for p in ws.settings.phases]}; PTM+ST: those phases on "
            "their shortcuts (PTM-ST). 'equal': the phases share the one-phase total; 'per-phase': each phase gets it, "
            "as in the paper's recipes. Every row but BASE keeps the EMA; every set evaluated by "
            f"{ws.settings.num_eval} students per seed under the paper's student schedule; mean ± std over seeds "
            f"{list(plan.seeds)}.", "", *lines, "", "![components](components.png)", "",
            *learned_step_sizes(step_sizes, ws.model.lr_teacher_img, ws.model.lr_teacher_txt)]
    payload = {"table": {f"{r}|{b}|{p}": v for (r, b, p), v in table.items()}, "iterations": iterations,
               "step_sizes": [{"row": r, "budget": b, "per_seed": v} for (r, b), v in step_sizes.items()],
               "per_seed": [{"row": r, "budget": b, "seed": s, **v} for (r, b, s), v in results.items()]}
    return text, payload


def learned_step_sizes(step_sizes: Dict[Tuple[str, int], List[List[Tuple[float, float]]]], img: float,
                       txt: float) -> List[str]:
    """Markdown: each row's learned step sizes after distillation, per phase, mean over seeds."""
    lines = [f"Learned step sizes at the end of distillation (image / text, each phase; mean over seeds; both start "
             f"at {img} / {txt}):", "", "| row | budget | step sizes |", "|---|---|---|"]
    for (row, budget), seeds in step_sizes.items():
        phases = zip(*seeds)
        cells = ["{:.3f} / {:.3f}".format(statistics.fmean(p[0] for p in phase), statistics.fmean(p[1] for p in phase))
                 for phase in phases]
        lines.append(f"| {row} | {budget} | " + ", ".join(cells) + " |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ schedule

SCHEDULE_VARIANTS = {  # label: (--student_schedule, --phase_lr)
    "paper": ("paper", "current"), "own": ("paper", "own"), "restart": ("restart", "current"),
    "union": ("union", "current")}


def schedule(ws: Workspace, report: Path) -> Tuple[List[str], dict]:
    plan, s = ws.plan, ws.settings
    shortcuts = ws.shortcuts()
    phases = len(s.phases)
    variants = list(plan.schedules)
    results = {}
    for budget in plan.budgets:
        for seed in plan.seeds:  # the components study's runs of the same names and flags, reused
            ptmst = load_final(ws.phased(f"ptmst_equal_b{budget}_s{seed}", seed, budget, shortcuts,
                                         even_split(plan.iterations, phases)).path)
            lors = load_final(ws.one_phase(f"lors_b{budget}_s{seed}", seed, budget, ws.normal).path)
            reals = ws.random(even_split(budget, len(s.phases)), seed)
            for variant in variants:
                chosen, phase_lr = SCHEDULE_VARIANTS[variant]
                results[("PTM-ST", variant, budget, seed)] = ws.score(ptmst, seed, chosen, phase_lr)
                results[("random, split", variant, budget, seed)] = ws.score(reals, seed, chosen, phase_lr)
            results[("LoRS (one phase)", "paper", budget, seed)] = ws.score(lors, seed)
    rows = [("PTM-ST", v) for v in variants] + [("random, split", v) for v in variants] + [("LoRS (one phase)", "paper")]
    table = {(r, v, b, p): mean_std([recall(results[(r, v, b, seed)], p) for seed in plan.seeds])
             for r, v in rows for b in plan.budgets for p in ("val", "paper")}
    lines = ["| set | schedule | " + " | ".join(f"{b} pairs, val | {b} pairs, paper" for b in plan.budgets) + " |",
             "|---|---|" + "---|---|" * len(plan.budgets)]
    lines += [f"| {r} | {v} | " + " | ".join(f"{cell(table[(r, v, b, 'val')])} | {cell(table[(r, v, b, 'paper')])}"
                                             for b in plan.budgets) + " |" for r, v in rows]
    lines_with_error_bars(report / "schedule.png", list(plan.budgets), {
        f"{r}, {v}": [table[(r, v, b, "val")] for b in plan.budgets] for r, v in rows},
        "synthetic pairs", "mean recall (%), val protocol", f"mean ± std over seeds {list(plan.seeds)}")
    text = ["## Student schedules", "",
            "paper: the phases' subsets one after the other, one x0.1 decay at epoch epochs//2 + 1 counted across "
            "them (it fires inside the first), every subset at the last phase's learned step sizes; own: the same, each "
            "subset at its own phase's step sizes (--phase_lr own); restart: the decay restarts with each subset "
            "(--student_schedule restart); union: all subsets at once, similarity block-diagonal over the phases "
            f"(--student_schedule union). 'random, split': random real pairs split as PTM-ST splits its budget "
            f"({' + '.join(map(str, even_split(plan.budgets[-1], len(s.phases))))} at {plan.budgets[-1]} pairs), at the "
            "initial step sizes (so 'own' equals 'paper' there). LoRS: one phase, the same total iterations "
            f"({plan.iterations}).", "", *lines, "", "![schedules](schedule.png)", ""]
    payload = {"table": {f"{r}|{v}|{b}|{p}": x for (r, v, b, p), x in table.items()},
               "per_seed": [{"set": r, "schedule": v, "budget": b, "seed": sd, **x}
                            for (r, v, b, sd), x in results.items()]}
    return text, payload


# --------------------------------------------------------------------------------------------------- scale


def scale_plan(plan: StudyPlan) -> Plan:
    """The ablation's plan of the scale study: its methods, the authors' PTM-ST, no coresets, full data."""
    s = replace(plan.settings, iterations=tuple(even_split(plan.iterations, len(plan.settings.phases))))
    return Plan(seeds=plan.seeds, budgets=plan.budgets, methods=SCALE_METHODS, quickstart=s, coresets=())


def scale_records(ws: Workspace, plan: Plan) -> List[RunRecord]:
    """Every method's runs, then PTM-ST cut to one phase (at up to 100 pairs the same runs, reused)."""
    folders = {"normal": ws.normal, "shortcuts": ws.shortcuts()}
    runs = ws.runs / "scale"
    records = distill_all(plan, ws.work, folders, runs, ws.model.dataset, ws.extra)
    one = distill_all(replace(plan, methods=("ptmst",), ptmst_layout="one"), ws.work, folders, runs,
                      ws.model.dataset, ws.extra)
    records += [replace(r, method=ONE_PHASE_PTMST) for r in one]
    ws.records += [{"run": r.folder, "seconds": r.seconds} for r in records]
    return records


def scale_rows(results: Dict) -> List[str]:
    rows = [*SCALE_METHODS, ONE_PHASE_PTMST, "random", RANDOM_SPLIT, FULL_DATA]
    return [row for row in rows if any(key[0] == row for key in results)]


def difference(results: Dict, plan: Plan, row: str, other: str, budget: int, protocol: str = "val"):
    """Mean and std over seeds of the per-seed difference ``row - other`` of mean recall."""
    values = [recall(results[(row, budget, seed)], protocol) - recall(results[(other, budget, seed)], protocol)
              for seed in plan.seeds]
    return mean_std(values)


def best_one_phase(results: Dict, plan: Plan, budget: int, protocol: str = "val") -> str:
    return max(("mttvl", "lors"), key=lambda m: statistics.fmean(recall(results[(m, budget, s)], protocol)
                                                               for s in plan.seeds))


def payoff_lines(results: Dict, plan: Plan) -> List[str]:
    """Per budget: PTM-ST's phase sizes, what the phases add over the same shortcut as one phase, PTM-ST
    against the better one-phase method, and what the split schedule does to random real pairs."""
    lines = ["| budget | PTM-ST phases (pairs) | PTM-ST - PTM-ST as one phase | PTM-ST - best of MTT-VL/LoRS "
             "| random split - random |", "|---|---|---|---|---|"]
    for budget in plan.budgets:
        sizes = phase_sizes(plan, "ptmst", budget)
        best = best_one_phase(results, plan, budget)
        phases = (cell(difference(results, plan, "ptmst", ONE_PHASE_PTMST, budget)) if len(sizes) > 1
                  else "(the same run)")
        lines.append(f"| {budget} | {' + '.join(map(str, sizes))} | {phases} | "
                     f"{cell(difference(results, plan, 'ptmst', best, budget))} ({best}) | "
                     f"{cell(difference(results, plan, RANDOM_SPLIT, 'random', budget))} |")
    return lines


def payoff_sentence(results: Dict, plan: Plan) -> str:
    """Where the phases first beat the same shortcut run as one phase by more than the seeds' spread."""
    phased = [b for b in plan.budgets if len(phase_sizes(plan, "ptmst", b)) > 1]
    gains = {b: difference(results, plan, "ptmst", ONE_PHASE_PTMST, b) for b in phased}
    paying = [b for b in phased if gains[b][0] > gains[b][1]]
    if not phased:
        return "No budget here is large enough for the authors' phases (over 100 pairs)."
    if not paying:
        return (f"The phases pay off at no budget measured: at {', '.join(map(str, phased))} pairs PTM-ST's two "
                "phases do not beat its first phase run alone at the whole budget by more than the seeds' spread "
                "(val protocol).")
    first = paying[0]
    return (f"The phases first pay off at {first} pairs (phases of {' + '.join(map(str, phase_sizes(plan, 'ptmst', first)))}"
            f"): PTM-ST beats its first phase run alone at the whole budget by more than the seeds' spread "
            f"(val protocol); budgets where they do: {', '.join(map(str, paying))}.")


def scale(ws: Workspace, report: Path) -> Tuple[List[str], dict]:
    plan = scale_plan(ws.plan)
    records = scale_records(ws, plan)
    results, eval_seconds, run_eval = {}, {}, {}
    step_sizes: Dict[Tuple[str, int], List[List[Tuple[float, float]]]] = {}
    evaluated = ws.work.launcher.run("students", [SetStudents(ws.work.local(), plan, ws.model, record)
                                                  for record in records], bar=True)
    for record, (found, took) in zip(records, evaluated):
        subsets = load_final(Path(record.folder))
        step_sizes.setdefault((record.method, record.budget), []).append(
            [(float(x.lr_img), float(x.lr_txt)) for x in subsets])
        results.update(found)
        run_eval[record.folder] = took
        eval_seconds[record.method] = eval_seconds.get(record.method, 0.0) + took
    references, reference_seconds = evaluate_all(plan, ws.work, [], ws.model, ws.normal)
    results.update(references)
    eval_seconds.update(reference_seconds)
    rows = scale_rows(results)
    lines_with_error_bars(report / "recall_vs_budget.png", list(plan.budgets),
                          {row: [mean_std([recall(results[(row, b, s)]) for s in plan.seeds]) for b in plan.budgets]
                           for row in rows}, "synthetic pairs (budget)", "mean recall (%), val protocol",
                          f"{ws.settings.num_train * 5} training pairs; mean ± std over seeds {list(plan.seeds)}")
    s = plan.quickstart
    distill_seconds = {row: sum(r.seconds for r in records if r.method == row) for row in rows}
    text = [
        f"## Recall against budget at {plan.quickstart.num_train * 5:,} training pairs", "",
        f"Shapes with {s.num_train * 5} training pairs ({s.num_train} images x 5 captions), {s.num_val} val and "
        f"{s.num_test} test images; {s.num_experts} experts of {s.train_epochs} epochs. MTT-VL and LoRS: one phase "
        f"of {plan.quickstart.iterations[0] + plan.quickstart.iterations[1]} iterations, starts in "
        f"[{min(p[2] for p in s.phases)}, {max(p[3] for p in s.phases)}), no EMA. PTM-ST as its authors run it: one "
        "phase up to 100 pairs, two above (half each; two fifths and three fifths from 500 pairs), each phase on "
        f"its own shortcut ({', '.join(f'snapshots {p[0]}..{p[1]}, starts [{p[2]}, {p[3]})' for p in s.phases)}) "
        f"with the one-phase methods' iterations, EMA {plan.ptmst_ema}. '{ONE_PHASE_PTMST}': PTM-ST's first phase "
        "alone holding the whole budget (the shortcut, no phases; at up to 100 pairs it is PTM-ST's own run). "
        f"'{RANDOM_SPLIT}': the random row's pairs cut into PTM-ST's phase sizes and trained under its student "
        f"schedule. Every set trained by {s.num_eval} fresh students per seed; mean ± std over seeds "
        f"{list(plan.seeds)}.", "",
        "### Val protocol (measurement chosen on val, test recall reported)", "",
        table(plan, results, "val", rows), "",
        "### Paper protocol (best of the test measurements)", "",
        table(plan, results, "paper", rows), "",
        "![recall against budget](recall_vs_budget.png)", "",
        "## Where the phases pay off", "",
        "Differences of mean recall (val protocol), per seed then mean ± std over seeds.", "",
        *payoff_lines(results, plan), "", payoff_sentence(results, plan), "",
        "## Learned step sizes", "",
        "The distilled sets' students train at these rates (PTM-ST's: every subset at the last phase's, the paper's "
        f"schedule); the random and full-data rows at the experts' {ws.model.lr_teacher_img} / "
        f"{ws.model.lr_teacher_txt}.", "",
        *learned_step_sizes(step_sizes, ws.model.lr_teacher_img, ws.model.lr_teacher_txt),
        "## Every recall, laid out as the papers' tables (val protocol)", "",
        paper_table(plan, results, "val", rows), "",
        "## Time", "",
        "| row | distillation (s, all budgets and seeds) | students (s) |", "|---|---|---|",
        *[f"| {row} | {distill_seconds.get(row, 0.0):.0f} | {eval_seconds.get(row, 0.0):.0f} |" for row in rows], "",
        "| run | distillation (s) | students (s) |", "|---|---|---|",
        *[f"| `{Path(r.folder).name}` | {r.seconds:.0f} | {run_eval[r.folder]:.0f} |" for r in records], "",
        "A run or evaluation reused from an earlier call counts with the time it took then.", ""]
    payload = {"rows": rows, "budgets": list(plan.budgets), "seeds": list(plan.seeds),
               "phase_sizes": {b: phase_sizes(plan, "ptmst", b) for b in plan.budgets},
               "table": {f"{r}|{b}|{p}": mean_std([recall(results[(r, b, sd)], p) for sd in plan.seeds])
                         for r in rows for b in plan.budgets for p in ("val", "paper")},
               "distill_seconds": distill_seconds, "eval_seconds": eval_seconds,
               "step_sizes": [{"row": r, "budget": b, "per_seed": v} for (r, b), v in step_sizes.items()],
               "run_seconds": {r.folder: {"distill": r.seconds, "students": run_eval[r.folder]} for r in records},
               "per_seed": [{"row": k[0], "budget": k[1], "seed": k[2], **v} for k, v in results.items()]}
    return text, payload


STUDY_FUNCTIONS = {"teacher_stage": teacher_stage, "gradients": gradients, "components": components,
                   "schedule": schedule, "scale": scale}


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="study", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=STUDIES, help="which study")
    parser.add_argument("--workdir", default="./study", help="data, experts, runs and reports go here (the "
                                                               "quick start's and the ablation's layout: a shared "
                                                               "workdir reuses their data and encoder)")
    parser.add_argument("--preset", default="default", choices=["default", "quick", "smoke"],
                        help="quick (scale only): seed 0, budgets 50 and 500; smoke: the test suite's")
    parser.add_argument("--seeds", type=non_negative(), nargs="+", default=None, help="override the study's seeds")
    parser.add_argument("--budgets", type=positive(), nargs="+", default=None, help="override the study's budgets (pairs)")
    parser.add_argument("--iterations", type=positive(), default=None,
                        help="iterations of a one-phase run (phased runs share them, or each phase gets them)")
    parser.add_argument("--windows", type=non_negative(), nargs="+", default=None,
                        help="teacher_stage: first start epoch of each window (default: every window that fits)")
    parser.add_argument("--width", type=positive(), default=None, help="teacher_stage: start epochs per window (default 2)")
    parser.add_argument("--experts", type=positive(), default=None, help="gradients: experts averaged (default 5)")
    parser.add_argument("--schedules", nargs="+", default=None, choices=list(SCHEDULE_VARIANTS),
                        help="schedule: the student schedules compared (default: all four)")
    add_launcher_flags(parser)
    args, extra = parser.parse_known_args(argv)
    groups = flag_groups(extra)
    for group in groups:
        flag = group[0].split("=", 1)[0]
        if flag in OWNED | {"--ema_decay", "--iterations"}:
            parser.error(f"{flag} is set by the study itself for every run (seeds, budgets, phases, folders and "
                         f"iterations come from the study's own flags); drop it")
        if flag not in DISTILL_FLAGS | BUFFER_FLAGS:
            parser.error(f"{flag} is neither a study flag nor a flag of distill_ptm-st.py or buffer.py (see "
                         f"`bash sh/study.sh {args.study} --help` and their --help)")
    args.distill_flags, args.buffer_flags = flags_for(DISTILL_FLAGS, groups), flags_for(BUFFER_FLAGS, groups)
    datasets = values_of(groups, "--dataset")
    args.builtin_data = not datasets
    real = bool(datasets) and datasets[-1] in REAL_DATASETS
    if args.study == "scale" and datasets:
        parser.error(f"--dataset {datasets[-1]}: the scale study generates its own 10,000 shapes pairs (budgets up to "
                     "500 pairs must be a small fraction of the data); for real images run the ablation "
                     "(bash sh/ablation.sh --dataset stamps, or openclipart) and drop --dataset here")
    if args.preset == "quick" and args.study != "scale":
        parser.error(f"--preset quick is the scale study's (seed 0, budgets 50 and 500); {args.study} has default and "
                     f"smoke: narrow it with --seeds and --budgets instead")
    if args.preset == "smoke":
        plan = smoke_plan(args.study)
    elif args.preset == "quick":
        plan = quick_plan(args.study)
    else:
        plan = default_plan(args.study, STAMPS if real else QUICKSTART["default"])
    plan = replace(plan, seeds=tuple(args.seeds) if args.seeds else plan.seeds,
                   budgets=tuple(sorted(set(args.budgets))) if args.budgets else plan.budgets,
                   iterations=plan.iterations if args.iterations is None else args.iterations,
                   windows=tuple(args.windows) if args.windows else plan.windows,
                   width=plan.width if args.width is None else args.width,
                   experts=plan.experts if args.experts is None else args.experts,
                   schedules=tuple(args.schedules) if args.schedules else plan.schedules)
    for flag, owner in (("windows", "teacher_stage"), ("width", "teacher_stage"), ("experts", "gradients"),
                        ("schedules", "schedule")):
        if getattr(args, flag) is not None and args.study != owner:
            parser.error(f"--{flag} is the {owner} study's flag and changes nothing in {args.study}: drop it")
    check_plan(parser, args.study, plan)
    args.plan = plan
    return args


def check_plan(parser: argparse.ArgumentParser, study: str, plan: StudyPlan) -> None:
    s = plan.settings
    phases = len(s.phases)
    if min(plan.budgets) < phases:
        parser.error(f"--budgets {min(plan.budgets)}: PTM-ST splits a budget over {phases} phases, so every budget "
                     f"must be at least {phases}")
    if max(plan.budgets) > s.num_train * 5 and s.builtin:
        parser.error(f"--budgets {max(plan.budgets)} exceeds the {s.num_train * 5} training pairs")
    if plan.iterations < phases:
        parser.error(f"--iterations {plan.iterations}: the phases share them, so give at least {phases}")
    last = s.train_epochs - plan.width
    bad = [w for w in plan.windows if not 0 <= w <= last]
    if bad:
        parser.error(f"--windows {bad[0]}: a window [w, w + {plan.width}) needs snapshot w + {plan.width} of "
                     f"{s.train_epochs}-epoch experts, so w must be in 0..{last}")


def write_report(report: Path, study: str, command: str, text: List[str], payload: dict, ws: Workspace,
                 seconds: float) -> Path:
    records = ws.records
    unique = {r["run"]: r["seconds"] for r in records}
    atomic_write_text(report / "results.json", json.dumps(
        {"study": study, "command": command, "plan": asdict(ws.plan), "seconds": seconds, "runs": unique,
         "experts": str(ws.normal), **payload}, indent=1, default=str))
    lines = [f"# Study: {study}", "", f"Command: `{command}`", "",
             f"Wall time of this call: {seconds / 60:.1f} min (runs reused from earlier calls count as 0 here; "
             "their own times are listed below). Experts: "
             f"{ws.settings.num_experts} x {ws.settings.train_epochs} epochs in `{ws.normal}`.", "",
             *text,
             "## Runs this report is built from", "",
             "Each folder's name ends in the fingerprint of the flags that decide its result; its args.json holds "
             "them (the distillation seconds are those the run took when it was made).", "",
             *[f"- `{run}` ({secs:.0f} s)" for run, secs in unique.items()], "",
             "## Settings", "", "```json", json.dumps(asdict(ws.plan), indent=1), "```", ""]
    path = report / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    folder = writable_folder(Path(args.workdir), "--workdir")
    work = Workdir(folder, SCRIPTS, launcher_of(args, folder))
    (work / "reports").mkdir(parents=True, exist_ok=True)
    report = Path(tempfile.mkdtemp(prefix=f".study_{args.study}_", suffix=".partial", dir=work / "reports"))
    ws = prepare(args.plan, work, args.distill_flags, args.buffer_flags, args.builtin_data)
    text, payload = STUDY_FUNCTIONS[args.study](ws, report)
    command = "bash sh/study.sh " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    write_report(report, args.study, command.strip(), text, payload, ws, time.perf_counter() - started)
    path = publish(report, work / "reports", report_stamp(), prefix=f"study_{args.study}") / "README.md"
    print(f"\nreport: {path}")
    return path


if __name__ == "__main__":
    run_script(main, outputs={"--workdir": "./study"},
               interrupted="interrupted: finished runs are kept in --workdir/study_runs and a cut run resumes: "
                           "run the same command again to go on.")
